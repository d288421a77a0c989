"""Video planning: an experiment expanded into one sample per (category, video, prompt, seed).

Every sample has a deterministic id over everything that decides its output
(docs/ARCHITECTURE.md, "Sample identity"), so planning the same experiment twice gives
the same ids, a changed parameter gives new ones, and "what is left to do" is a set
difference against the completion records.

Planning never decodes a video: it reads each reference video's content identity (size
plus its first and last MiB). Whether a video decodes is checked once per content id by
``fleet.kinds.video.video_file.probe`` and cached in Redis (``check_videos``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring  # == json.dumps(str, ensure_ascii=False)
from pathlib import Path
from typing import Any

from fleet.errors import InputError
from fleet.kinds.base import Columns, KindCache, Plan, PlanContext, Sample
from fleet.kinds.video.dataset import ReferenceVideo, scan_dataset
from fleet.kinds.video.experiment import VIDEO_SUFFIXES, LoadedExperiment
from fleet.kinds.video.prompts import load_prompts
from fleet.kinds.video.video_file import content_id, probe

KIND = "video"
PROBE_OK = "ok"

# The fields every sample shares that decide its output (part of its id and of the payload's shared part).
_OUTPUT_FIELDS = ("mode", "width", "height", "frames", "fps", "steps", "cfg_scale", "negative_prompt", "tiled")


def _common_fields(exp: LoadedExperiment, legacy: bool = False) -> dict:
    """What every sample of the experiment shares that decides its output (part of its id).

    The output root is part of it: two experiments with the same parameters writing to
    different folders make two samples, each its own file. ``legacy``: without it, the id
    samples had before (records written then still count: see fleet.kinds.base.Sample.aliases).
    """
    s = exp.spec
    common = {"kind": "video", "model": exp.model.identity(), **{f: getattr(s, f) for f in _OUTPUT_FIELDS}}
    if s.mode == "motion":
        common["denoising_strength"] = s.denoising_strength
    if not legacy:
        common["output"] = str(exp.output)
    return common


def shared_params(exp: LoadedExperiment) -> dict[str, Any]:
    """The parameters every sample's payload shares (workers read them as VideoParams)."""
    s = exp.spec
    return {
        **{f: getattr(s, f) for f in _OUTPUT_FIELDS},
        "denoising_strength": s.denoising_strength,
        "model": exp.model.model_dump(),
    }


def plan_experiment(exp: LoadedExperiment, categories: list[str] | None = None, ctx: PlanContext | None = None) -> Plan:
    """Every sample of the experiment (optionally of some categories), in a stable order.

    Raises InputError for a prompts file that is malformed or names a missing video,
    and for a video without prompts. ``plan.extra`` maps each video path to its content id.
    """
    ctx = ctx or PlanContext()
    s = exp.spec
    only = categories or s.categories
    if categories and s.categories:
        outside = [c for c in categories if c not in s.categories]
        if outside:
            raise InputError(f"{exp.path}: category {outside[0]!r} is not among the experiment's categories")
    by_cat = scan_dataset(exp.dataset, only)
    if not by_cat:
        raise InputError(f"{exp.dataset}: no category folders (expected <dataset>/<category>/<video>.mp4)")
    empty = [c for c, vs in by_cat.items() if not vs]
    if empty:
        raise InputError(f"{exp.dataset / empty[0]}: category {empty[0]!r} has no videos "
                         f"({', '.join(VIDEO_SUFFIXES)})")
    prompts = load_prompts(exp.prompts)
    _check_prompt_names(exp, prompts, scan_dataset(exp.dataset) if only else by_cat)

    videos = [v for vs in by_cat.values() for v in vs]
    cids = _content_ids(videos, ctx.cache(KIND, "content_ids") if ctx.client is not None else None)
    video_cid = dict(zip((str(v.path) for v in videos), cids))

    common = hashlib.sha256(json.dumps(_common_fields(exp), sort_keys=True).encode()).hexdigest()
    old = hashlib.sha256(json.dumps(_common_fields(exp, legacy=True), sort_keys=True).encode()).hexdigest()
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
    mem, gpus = exp.memory_mib, s.gpus_per_sample
    legacy = ctx.legacy_ids
    # Columns (fleet.kinds.base.Columns): a status or re-run of a million samples reads these;
    # a Sample (deferred: label and body made when read) only for the ones published or shown.
    ids: list[str] = []
    groups: list[str] = []
    outs: list[str] = []
    details: list[tuple] = []
    old_ids: list[str] = []  # with legacy ids only: each sample's id under the old scheme
    for cat, vids in by_cat.items():
        cat_dir = os.path.join(out_root, cat)
        for v in vids:
            plist = prompts.for_video(cat, v.name)
            if plist is None:
                raise InputError(f"{exp.prompts}: no prompts for video {v.name!r} of category {cat!r} ({v.path})")
            vpath = str(v.path)
            cid = video_cid[vpath] if motion else ""
            folder = os.path.join(cat_dir, f"ref_{v.name}{size}") + os.sep  # str(exp.output / cat / f"ref_...") + "/"
            tail_video = f"{enc(cat)}, {enc(v.name)}, {enc(cid)}, "
            head_video = f"[{enc(common)}, {tail_video}"
            old_video = f"[{enc(old)}, {tail_video}"
            v_ref = (cat, v.name, vpath)
            for pi, prompt in enumerate(plist):
                pj = prompt_json.get(prompt)
                if pj is None:
                    pj = prompt_json[prompt] = enc(prompt)
                head = sha256(f"{head_video}{pj}, {pi}]".encode())
                old_head = sha256(f"{old_video}{pj}, {pi}]".encode()) if legacy else None
                for seed, seed_b, stem in seeds:
                    h = head.copy()
                    h.update(seed_b)
                    if old_head is not None:
                        o = old_head.copy()
                        o.update(seed_b)
                        old_ids.append(o.hexdigest()[:32])
                    ids.append(h.hexdigest()[:32])
                    groups.append(cat)
                    outs.append(f"{folder}{stem}{pi}.mp4")
                    details.append((v_ref, prompt, pi, seed))

    def make(at: Sequence[int]) -> list[Sample]:
        deferred = Sample.deferred
        return [deferred(ids[i], groups[i], outs[i], mem, gpus, (old_ids[i],) if old_ids else (), _describe,
                         details[i]) for i in at]

    return Plan(exp, shared=shared_params(exp), extra=video_cid, columns=Columns(ids, groups, outs, make))


def _describe(detail: tuple) -> tuple[str, dict[str, Any]]:
    """A video sample's label and body, made only for the samples that are published."""
    (cat, video, vpath), prompt, pi, seed = detail
    body = {"category": cat, "video": video, "video_path": vpath, "prompt": prompt, "prompt_index": pi, "seed": seed}
    return f"{cat}/{video} seed {seed} prompt {pi}", body


def _stat_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as e:
        raise InputError(f"{path}: cannot read reference video: {e.strerror or e}") from None
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _content_ids(videos: list[ReferenceVideo], cache: KindCache | None) -> list[str]:
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


def check_videos(plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
    """Probe (decode the first frame of) each reference video a sample to do reads.

    Results are cached by content id, so a re-run or a new prompt probes nothing.
    Raises InputError naming the first video that does not decode.
    """
    video_cid: dict[str, str] = plan.extra or {}
    needed = {smp.body["video_path"]: video_cid[smp.body["video_path"]] for smp in todo}
    if not needed:
        return
    cache = ctx.cache(KIND, "probes")
    cids = list(dict.fromkeys(needed.values()))
    known = dict(zip(cids, cache.get_many(cids)))
    to_probe = [(p, c) for p, c in needed.items() if known.get(c) is None]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda pc: (pc, _try_probe(Path(pc[0]))), to_probe))
    for (path, _), err in sorted(results, key=lambda r: str(r[0][0])):
        if err is not None:
            raise err
    cache.put_many({c: PROBE_OK for _, c in to_probe})


def _try_probe(path: Path) -> Exception | None:
    try:
        probe(path)
        return None
    except Exception as e:  # InputError from probe; re-raised in a stable order above
        return e
