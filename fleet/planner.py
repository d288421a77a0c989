"""Planning: an experiment expanded into one sample per (category, video, prompt, seed).

Every sample has a deterministic id over everything that decides its output (DESIGN §2),
so planning the same experiment twice gives the same ids, a changed parameter gives new
ones, and "what is left to do" is a set difference against the completion records.

Planning never decodes a video: it reads each reference video's content identity (size
plus its first and last MiB). Whether a video decodes is checked once per content id by
``fleet.video_file.probe`` and cached in Redis (see ``fleet.enqueue``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol
from json.encoder import encode_basestring  # == json.dumps(str, ensure_ascii=False)
from pathlib import Path

from fleet.contract import TASK_VIDEO, VIDEO_SCHEMA
from fleet.dataset import ReferenceVideo, scan_dataset
from fleet.errors import InputError
from fleet.experiment import LoadedExperiment
from fleet.prompts import load_prompts
from fleet.video_file import content_id


@dataclass(frozen=True, slots=True)
class Sample:
    """One planned sample; the payload is built only for samples that will be published."""

    sample_id: str
    category: str
    video: ReferenceVideo
    video_cid: str
    prompt: str
    prompt_index: int
    seed: int
    output_path: str


@dataclass(frozen=True)
class Plan:
    experiment: LoadedExperiment
    samples: list[Sample]
    videos: list[tuple[ReferenceVideo, str]]  # (video, content id), for probing
    task_name: str = TASK_VIDEO


_OUTPUT_FIELDS = ("mode", "width", "height", "frames", "fps", "steps", "cfg_scale", "negative_prompt", "tiled")


def _common_fields(exp: LoadedExperiment) -> dict:
    """What every sample of the experiment shares that decides its output (part of its id)."""
    s = exp.spec
    common = {"kind": "video", "model": exp.model.identity(), **{f: getattr(s, f) for f in _OUTPUT_FIELDS}}
    if s.mode == "motion":
        common["denoising_strength"] = s.denoising_strength
    return common


class ContentIdCache(Protocol):
    """Content ids by file identity (path, size, mtime, inode), so unchanged videos are not read."""

    def get_many(self, stat_keys: list[str]) -> list[str | None]: ...

    def put_many(self, found: dict[str, str]) -> None: ...


def plan_experiment(
    exp: LoadedExperiment, categories: list[str] | None = None, cid_cache: ContentIdCache | None = None
) -> Plan:
    """Every sample of the experiment (optionally of some categories), in a stable order.

    Raises InputError for a prompts file that is malformed or names a missing video,
    and for a video without prompts.
    """
    s = exp.spec
    only = categories or s.categories
    if categories and s.categories:
        outside = [c for c in categories if c not in s.categories]
        if outside:
            raise InputError(f"{exp.path}: category {outside[0]!r} is not among the experiment's categories")
    by_cat = scan_dataset(exp.dataset, only)
    prompts = load_prompts(exp.prompts)
    _check_prompt_names(exp, prompts, scan_dataset(exp.dataset) if only else by_cat)

    videos = [v for vs in by_cat.values() for v in vs]
    cids = _content_ids(videos, cid_cache)
    video_cid = dict(zip((v.path for v in videos), cids))

    common = hashlib.sha256(json.dumps(_common_fields(exp), sort_keys=True).encode()).hexdigest()
    motion = s.mode == "motion"
    # The id of a sample is sha256 over json.dumps([common, cat, video, cid, prompt, prompt_index],
    # ensure_ascii=False) followed by the seed: the JSON is assembled from its parts, each
    # encoded once (what json.dumps does for a list of strings and ints, without its set-up),
    # and the hash of that head is computed once per (video, prompt) and copied per seed.
    enc = encode_basestring
    sha256 = hashlib.sha256
    seeds = [(seed, str(seed).encode(), f"seed_{seed}_prompt_") for seed in s.seeds]
    prompt_json: dict[str, str] = {}
    out_root, size = str(exp.output), f"_{s.width}x{s.height}"
    samples: list[Sample] = []
    append = samples.append
    for cat, vids in by_cat.items():
        cat_dir = os.path.join(out_root, cat)
        for v in vids:
            plist = prompts.for_video(cat, v.name)
            if plist is None:
                raise InputError(f"{exp.prompts}: no prompts for video {v.name!r} of category {cat!r} ({v.path})")
            vcid = video_cid[v.path]
            cid = vcid if motion else ""
            folder = os.path.join(cat_dir, f"ref_{v.name}{size}") + os.sep  # str(exp.output / cat / f"ref_...") + "/"
            head_video = f"[{enc(common)}, {enc(cat)}, {enc(v.name)}, {enc(cid)}, "
            for pi, prompt in enumerate(plist):
                pj = prompt_json.get(prompt)
                if pj is None:
                    pj = prompt_json[prompt] = enc(prompt)
                head = sha256(f"{head_video}{pj}, {pi}]".encode())
                for seed, seed_b, stem in seeds:
                    h = head.copy()
                    h.update(seed_b)
                    append(Sample(h.hexdigest()[:32], cat, v, vcid, prompt, pi, seed, f"{folder}{stem}{pi}.mp4"))
    return Plan(exp, samples, list(zip(videos, cids)))


def _stat_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as e:
        raise InputError(f"{path}: cannot read reference video: {e.strerror or e}") from None
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _content_ids(videos: list[ReferenceVideo], cache: ContentIdCache | None) -> list[str]:
    """Each video's content id: from the cache when the file is unchanged, else read
    (2 MiB per video, in threads: it is I/O-bound) and added to the cache."""
    stat_keys = [_stat_key(v.path) for v in videos] if cache is not None else []
    known = cache.get_many(stat_keys) if cache is not None and videos else [None] * len(videos)
    missing = [i for i, c in enumerate(known) if c is None]
    with ThreadPoolExecutor(max_workers=8) as pool:
        fresh = list(pool.map(lambda i: _cid(videos[i].path), missing))
    out = list(known)
    for i, c in zip(missing, fresh):
        out[i] = c
    if cache is not None and missing:
        cache.put_many({stat_keys[i]: c for i, c in zip(missing, fresh)})
    return out  # type: ignore[return-value]


def _cid(path: Path) -> str:
    try:
        return content_id(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read reference video: {e.strerror or e}") from None


def _check_prompt_names(exp: LoadedExperiment, prompts, by_cat: dict[str, list[ReferenceVideo]]) -> None:
    """Every video the prompts file names must exist (a typo would silently drop samples)."""
    names = {(c, v.name) for c, vs in by_cat.items() for v in vs}
    anywhere = {v for _, v in names}
    for cat in prompts.categories():
        if cat not in by_cat:
            raise InputError(f"{exp.prompts}: names category {cat!r}, which has no folder in {exp.dataset}")
    for cat, video in prompts.named_videos():
        if (video not in anywhere) if cat is None else ((cat, video) not in names):
            where = f"{exp.dataset}" if cat is None else f"{exp.dataset / cat}"
            raise InputError(f"{exp.prompts}: names video {video!r}, which is not in {where}")


def payloads(plan: Plan, todo: list[Sample], route: Callable[[Sample], str]) -> Iterator[tuple[Sample, str, str]]:
    """(sample, queue, payload JSON) for each sample to publish.

    The payload's constant part is serialised once; per sample only its own fields are,
    which keeps 100,000 payloads well under a second.
    """
    head = payload_head(plan)
    enc = encode_basestring  # == json.dumps(str, ensure_ascii=False)
    prompt_json: dict[str, str] = {}
    video, category, video_part = None, None, ""
    for smp in todo:
        if smp.video is not video or smp.category != category:  # a video's samples come together
            video, category = smp.video, smp.category
            video_part = (
                f',"category":{enc(smp.category)},"video":{enc(video.name)},"video_path":{enc(str(video.path))}'
            )
        pj = prompt_json.get(smp.prompt)
        if pj is None:
            pj = prompt_json[smp.prompt] = enc(smp.prompt)
        tail = (
            f',"sample_id":"{smp.sample_id}"{video_part}'
            f',"prompt":{pj},"prompt_index":{smp.prompt_index},"seed":{smp.seed}'
            f',"output_path":{enc(smp.output_path)}}}'
        )
        yield smp, route(smp), head + tail


def payload_head(plan: Plan) -> str:
    """The start every payload of the plan shares (an unclosed JSON object)."""
    exp, s = plan.experiment, plan.experiment.spec
    const = {
        "schema": VIDEO_SCHEMA,
        "experiment": exp.name,
        **{f: getattr(s, f) for f in _OUTPUT_FIELDS},
        "denoising_strength": s.denoising_strength,
        "model": exp.model.model_dump(),
        "memory_mib": exp.memory_mib,
        "attempt": 1,
    }
    return json.dumps(const, ensure_ascii=False)[:-1]
