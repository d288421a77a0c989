"""Benchmark: fleet's enqueue path (load experiment + plan + skip-check + video probe + publish).

    .venv/bin/python bench/enqueue_bench.py [--samples 100000] [--redis redis://127.0.0.1:6379/0]

Builds a realistic motion-transfer experiment in a temporary folder: real small H.264 mp4
reference videos written with PyAV in 4 categories (names with spaces and Chinese), a
per-category prompts file (50 prompts per video, a "*" default plus explicit entries),
2 seeds, and a model folder with model.json and empty placeholder weight files (planning
never reads weights). 100,000 samples = 1,000 videos x 50 prompts x 2 seeds.

Then, against a real Redis, in a fresh namespace (``bench-<random>``, deleted at the end):

1. ``first``: ``fleet.enqueue.enqueue`` on an empty namespace: plans, skip-checks, probes
   every reference video (first frame decoded, cached in Redis by content id) and
   publishes every sample.                       target (docs/BENCHMARKS.md) <= 5 s
2. ``in_flight``: the same call again, every sample still queued: nothing published.
3. ``all_done``: every sample made done exactly as a worker leaves it (completion record in
   the records hash, id in the done set, output file in place - empty, the skip-check only
   stats it - and the queued hash and queue emptied), then the call again.   target <= 1 s

Each scenario is timed twice: once through the real ``enqueue(...)`` (the headline figure),
then split by calling the same functions in the same order from outside (load_experiment,
plan_experiment, classify, check_inputs, payloads + publish) with the namespace in the same
state. ``av.open`` is counted during the split to show that planning decodes nothing.

Prints a table and, as stdout's last line, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import redis

from fleet.contract import CompletionRecord, Keys, queue_name
from fleet.enqueue import enqueue
from fleet.experiment import load_experiment
from fleet.kept_payloads import head_id, reference
from fleet.kinds.base import PlanContext
from fleet.placement import PlacementPolicy
from fleet.planner import check_inputs, payload_head, plan_experiment, tails
from fleet.priority import queue_length, queue_lists
from fleet.publisher import Outgoing, publish
from fleet.records import classify, drop_stale_queued
from fleet.routing import queue_for_sample

PROMPTS_PER_VIDEO = 50
SEEDS = [42, 142]
CATEGORIES = ["camera motion 镜头运动", "人物动作", "object_motion", "scene transitions"]
NEGATIVE = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的"
TARGETS = {"first": 5.0, "all_done": 1.0}
SCENARIOS = ("first", "in_flight", "all_done")


# ---- dataset -------------------------------------------------------------------------------
def _video_name(cat_index: int, i: int) -> str:
    """A mix of plain, spaced and Chinese names, as in the lab's datasets."""
    kind = i % 4
    if kind == 0:
        return f"clip_{cat_index}_{i:04d}"
    if kind == 1:
        return f"镜头仰角旋转_{i:04d}"
    if kind == 2:
        return f"dolly zoom {i:04d}"
    return f"人物 walk cycle {i:04d}"


def _write_video(args: tuple[str, int, int, int, int]) -> None:
    """One small H.264 mp4 (distinct content per seed); runs in a worker process."""
    import av
    import numpy as np

    path, frames, width, height, seed = args
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            img = np.stack(
                [(xs * 255 // (width - 1) + 20 * i + seed) % 256, (ys * 255 // (height - 1) + seed) % 256,
                 np.full_like(xs, (40 * i + 7 * seed) % 256)],
                axis=-1,
            ).astype(np.int16)
            img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _prompt(cat: int, video: str | None, k: int) -> str:
    who = f"the subject of {video}" if video else "the main subject"
    zh = "，镜头缓慢推进，电影感光影" if k % 3 == 0 else ""
    return (f"Prompt {k} for category {cat}: {who} moves through a sunlit street at golden hour, "
            f"camera follows smoothly, shallow depth of field, 35mm film look{zh}")


def build_experiment(root: Path, samples: int, width: int, height: int, frames: int) -> tuple[Path, int]:
    """Write dataset, prompts, model folder and experiment file; returns (experiment path, videos)."""
    per_video = PROMPTS_PER_VIDEO * len(SEEDS)
    n_videos = max(len(CATEGORIES), samples // per_video)
    dataset = root / "dataset"
    jobs, prompts = [], {}
    for c, cat in enumerate(CATEGORIES):
        (dataset / cat).mkdir(parents=True)
        count = n_videos // len(CATEGORIES) + (1 if c < n_videos % len(CATEGORIES) else 0)
        table = {"*": [_prompt(c, None, k) for k in range(PROMPTS_PER_VIDEO)]}
        for i in range(count):
            name = _video_name(c, i)
            jobs.append((str(dataset / cat / f"{name}.mp4"), frames, width, height, c * 100003 + i))
            if i % 5 == 0:  # a fifth of the videos have prompts of their own
                table[name] = [_prompt(c, name, k) for k in range(PROMPTS_PER_VIDEO)]
        prompts[cat] = table
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_write_video, jobs, chunksize=16))
    (root / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False, indent=1), encoding="utf-8")

    model = root / "models" / "Wan2.1-T2V-14B"
    (model / "google" / "umt5-xxl").mkdir(parents=True)
    dit = [f"diffusion_pytorch_model-0000{i}-of-00006.safetensors" for i in range(1, 7)]
    for f in [*dit, "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl/tokenizer.json"]:
        (model / f).touch()
    (model / "model.json").write_text(json.dumps({
        "name": "wan2.1-t2v-14b", "dit": dit, "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
        "vae": "Wan2.1_VAE.pth", "tokenizer": "google/umt5-xxl", "dtype": "bfloat16", "memory_mib": 60000,
    }, indent=1))

    exp = root / "motion transfer 运动迁移.yaml"
    exp.write_text(
        "kind: video\n"
        "name: motion-transfer-bench\n"
        "dataset: dataset\n"
        "prompts: prompts.json\n"
        f"seeds: {SEEDS}\n"
        "mode: motion\n"
        "denoising_strength: 0.7\n"
        f"negative_prompt: \"{NEGATIVE}\"\n"
        "width: 832\nheight: 480\nframes: 81\nfps: 15\nsteps: 50\ncfg_scale: 5.0\n"
        "model: {dir: models/Wan2.1-T2V-14B}\n"
        "output: results\n",
        encoding="utf-8",
    )
    return exp, n_videos


# ---- namespace state -------------------------------------------------------------------------
def wipe(client: redis.Redis, namespace: str) -> None:
    """Delete every key of the namespace (records, sets, hashes, leases) and its queues."""
    for pattern in (f"{namespace}:*", f"{namespace}.q.*"):
        batch = []
        for k in client.scan_iter(match=pattern, count=10000):
            batch.append(k)
            if len(batch) >= 5000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)


def reset_to_fresh(client: redis.Redis, keys: Keys, queue: str) -> None:
    """Back to 'never enqueued': no queued entries, no messages, no cached probes."""
    client.delete(keys.queued, *queue_lists(queue), keys.kind_cache("video", "probes"))


def mark_all_done(client: redis.Redis, keys: Keys, queue: str, exp) -> int:
    """Leave every planned sample as a worker leaves it after success (records.complete), output included."""
    plan = plan_experiment(exp)
    made_dirs: set[str] = set()
    pipe = client.pipeline(transaction=False)
    now = time.time()
    for n, s in enumerate(plan.samples, 1):
        d = os.path.dirname(s.output_path)
        if d not in made_dirs:
            os.makedirs(d, exist_ok=True)
            made_dirs.add(d)
        open(s.output_path, "wb").close()  # a worker renames a finished file into place
        rec = CompletionRecord(
            sample_id=s.sample_id, experiment=exp.name, kind="video", group=s.group, label=s.label,
            output_path=s.output_path, duration_s=180.0, worker="gpu0@bench", hostname="bench", gpus=[0],
            attempt=1, deliveries=1,
            model_loaded=False, model_load_s=0.0, finished_at=now,
        )
        pipe.hset(keys.records, s.sample_id, rec.model_dump_json(by_alias=True))
        pipe.sadd(keys.done, s.sample_id)
        if n % 5000 == 0:
            pipe.execute()
    pipe.execute()
    # claim() removed each id from the queued hash and the worker consumed each message.
    client.delete(keys.queued, *queue_lists(queue), keys.running, keys.deliveries)
    return len(plan.samples)


# ---- measurements ----------------------------------------------------------------------------
def timed_enqueue(client: redis.Redis, namespace: str, exp_path: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of this process, counts) of load_experiment + enqueue."""
    c0, t0 = time.process_time(), time.perf_counter()
    exp = load_experiment(exp_path)
    res = enqueue(client, namespace, exp)
    return time.perf_counter() - t0, time.process_time() - c0, res.as_dict()


def busy_cores(seconds: float = 0.3) -> float:
    """Cores the whole machine keeps busy over a short window (others' load, before a run)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return float("nan")
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def pad_videos(dataset: Path, mib: float) -> None:
    """Grow each mp4 to ``mib`` MiB with a trailing 'free' box (valid MP4, ignored by demuxers),
    so content ids hash as much as they would for real reference videos (2 MiB each)."""
    for f in dataset.rglob("*.mp4"):
        extra = int(mib * (1 << 20)) - f.stat().st_size
        if extra > 8:
            with open(f, "ab") as out:
                out.write(extra.to_bytes(4, "big") + b"free" + bytes(extra - 8))


class _OpenCounter:
    """Counts av.open calls (decodes) while installed; installed around the split run only."""

    def __init__(self) -> None:
        import av

        self.av, self.real, self.calls = av, av.open, 0

    def __enter__(self) -> "_OpenCounter":
        def counting(*a, **kw):
            self.calls += 1
            return self.real(*a, **kw)

        self.av.open = counting
        return self

    def __exit__(self, *exc) -> None:
        self.av.open = self.real

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n


def split_enqueue(client: redis.Redis, namespace: str, exp_path: Path) -> dict:
    """The steps of fleet.enqueue.enqueue, called in the same order, each timed."""
    keys = Keys(namespace)
    out: dict = {}
    with _OpenCounter() as opens:
        t = time.perf_counter()
        exp = load_experiment(exp_path)
        out["load_s"] = time.perf_counter() - t

        t = time.perf_counter()
        plan = plan_experiment(exp, None)
        ids, outs = plan.ids, plan.outputs  # as enqueue reads them (columns: no Sample per sample)
        out["plan_s"] = time.perf_counter() - t
        out["plan_decodes"] = opens.take()

        t = time.perf_counter()
        drop_stale_queued(client, keys, queue_name(namespace, ""))
        out["stale_s"] = time.perf_counter() - t

        t = time.perf_counter()
        state = classify(client, keys, ids, outs)
        todo = plan.at(state.todo)
        out["classify_s"] = time.perf_counter() - t

        probes = keys.kind_cache("video", "probes")
        probed_before = client.hlen(probes)
        t = time.perf_counter()
        check_inputs(plan, todo, PlanContext(client, keys))
        out["probe_s"] = time.perf_counter() - t
        out["probe_decodes"] = opens.take()
        out["videos_probed"] = client.hlen(probes) - probed_before

    t = time.perf_counter()
    policy, classes = PlacementPolicy(), []  # enqueue()'s defaults
    routes = {g: queue_for_sample(g, exp.memory_mib, policy, namespace, classes, exp.spec.gpus_per_sample)
              for g in {smp.group for smp in todo}}
    hid = head_id(payload_head(plan))
    items = (
        Outgoing(queue=q, payload_json=reference(smp.sample_id), sample_id=smp.sample_id, label=smp.label,
                 mark=f"{hid}\t{q}\t{tail}")
        for smp, q, tail in tails(plan, todo, lambda smp: routes[smp.group])
    )
    out["published"] = publish(client, keys, items)
    out["publish_s"] = time.perf_counter() - t
    out["total_s"] = sum(out[k] for k in ("load_s", "plan_s", "stale_s", "classify_s", "probe_s", "publish_s"))
    out["counts"] = {"planned": len(ids), "done": len(state.done), "in_flight": len(state.queued) + len(state.running),
                     "todo": len(todo)}
    return out


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"bench: consistency check failed: {what}")


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=100_000, help="samples to plan (videos x 50 prompts x 2 seeds)")
    ap.add_argument("--redis", default=os.environ.get("FLEET_BROKER_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--repeat", type=int, default=3, help="timed enqueue() calls per scenario; the median is reported")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the experiment (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the experiment folder")
    ap.add_argument("--video-size", default="128x72", help="reference video WxH (even numbers)")
    ap.add_argument("--video-frames", type=int, default=17)
    ap.add_argument("--video-mib", type=float, default=0.0,
                    help="pad each video to this size (MiB) with an MP4 'free' box; content ids then hash real amounts")
    args = ap.parse_args(argv)
    vw, vh = (int(x) for x in args.video_size.lower().split("x"))
    repeat = max(1, args.repeat)

    client = redis.Redis.from_url(args.redis, socket_timeout=120)
    client.ping()
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    keys, queue = Keys(namespace), queue_name(namespace, "gpu")
    root = Path(tempfile.mkdtemp(prefix="fleet-enqueue-bench-", dir=args.workdir))
    cores = os.cpu_count()
    res: dict = {}

    def run(name: str, expect: dict, before_each=None) -> None:
        walls, cpus, loads = [], [], []
        for _ in range(repeat):
            if before_each:
                before_each()
            loads.append(busy_cores())
            wall, cpu, counts = timed_enqueue(client, namespace, exp_path)
            _check(counts == expect, f"{name}: {counts} != {expect}")
            walls.append(wall)
            cpus.append(cpu)
        res[name] = {"wall_s": _median(walls), "walls_s": walls, "cpu_s": _median(cpus), "busy_before": max(loads)}

    try:
        t = time.perf_counter()
        exp_path, n_videos = build_experiment(root, args.samples, vw, vh, args.video_frames)
        if args.video_mib:
            pad_videos(root / "dataset", args.video_mib)
        build_s = time.perf_counter() - t
        video_bytes = sum(f.stat().st_size for f in (root / "dataset").rglob("*.mp4"))
        expected = n_videos * PROMPTS_PER_VIDEO * len(SEEDS)
        print(f"built {n_videos} videos ({video_bytes / n_videos / 1024:.1f} KiB each, {vw}x{vh}x{args.video_frames}), "
              f"{expected} samples in {build_s:.1f} s under {root}; namespace {namespace}", file=sys.stderr)

        # 1. first run: empty namespace (every repetition starts from it again).
        run("first", {"planned": expected, "done": 0, "in_flight": 0, "enqueued": expected},
            before_each=lambda: reset_to_fresh(client, keys, queue))
        _check(queue_length(client, queue) == expected and client.hlen(keys.queued) == expected, "first: queue/queued size")
        _check(client.hlen(keys.kind_cache("video", "probes")) == n_videos, "first: every video probed once")
        # What a queued sample costs Redis: MEMORY USAGE (every element) of the namespace's keys.
        ns_keys = [k for pat in (f"{namespace}:*", f"{namespace}.q.*") for k in client.scan_iter(match=pat, count=10000)]
        res["bytes_per_queued_sample"] = round(sum(client.memory_usage(k, samples=0) or 0 for k in ns_keys) / expected, 1)
        reset_to_fresh(client, keys, queue)
        split = split_enqueue(client, namespace, exp_path)
        _check(split["published"] == expected, "first split published all")
        res["first"]["split"] = split

        # 2. re-run with every sample still queued (in flight).
        run("in_flight", {"planned": expected, "done": 0, "in_flight": expected, "enqueued": 0})
        split = split_enqueue(client, namespace, exp_path)
        _check(split["published"] == 0 and queue_length(client, queue) == expected, "in_flight split")
        res["in_flight"]["split"] = split

        # 3. re-run with every sample done (record + file), as workers leave them.
        t = time.perf_counter()
        mark_all_done(client, keys, queue, load_experiment(exp_path))
        mark_s = time.perf_counter() - t
        run("all_done", {"planned": expected, "done": expected, "in_flight": 0, "enqueued": 0})
        split = split_enqueue(client, namespace, exp_path)
        _check(split["published"] == 0 and queue_length(client, queue) == 0, "all_done split")
        res["all_done"]["split"] = split
        redis_version = client.info("server")["redis_version"]
    finally:
        wipe(client, namespace)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    # ---- report ----
    phases = ["load_s", "plan_s", "stale_s", "classify_s", "probe_s", "publish_s"]
    print(f"\nfleet enqueue bench: {expected} samples ({n_videos} videos of {video_bytes / n_videos / 1024:.0f} KiB "
          f"x {PROMPTS_PER_VIDEO} prompts x {len(SEEDS)} seeds), {cores} cores, Python {platform.python_version()}, "
          f"redis-py {redis.__version__} ({'hiredis' if _hiredis() else 'pure-Python parser'}), "
          f"Redis {redis_version} at {args.redis}")
    print(f"(setup, untimed: dataset {build_s:.1f} s, marking {expected} done with output files {mark_s:.1f} s; "
          f"enqueue() = load_experiment + enqueue, median of {repeat}; phases from one split run)\n")
    head = (f"{'scenario':<10} {'enqueue()':>9} {'target':>8} {'cpu':>7} {'others':>6} |"
            + "".join(f"{p[:-2]:>9}" for p in phases) + f" {'probed':>7} {'published':>9}")
    print(head)
    print("-" * len(head))
    for name in ("first", "in_flight", "all_done"):
        r = res[name]
        sp = r["split"]
        target = (f"{TARGETS[name]:.0f} s " + ("ok" if r["wall_s"] <= TARGETS[name] else "MISS")) if name in TARGETS else "-"
        print(f"{name:<10} {r['wall_s']:>7.3f} s {target:>8} {r['cpu_s']:>5.2f} s {r['busy_before']:>6.2f} |"
              + "".join(f"{sp[p]:>8.3f}s" for p in phases)
              + f" {sp['videos_probed']:>7} {sp['published']:>9}")
    fs = res["first"]["split"]
    print(f"\ncpu = this process's CPU time (Redis's own is not in it); others = cores busy on the machine just "
          f"before a run (max over the repetitions; {cores} = all).")
    print(f"Redis memory per queued sample (MEMORY USAGE of the namespace's keys / {expected}): "
          f"{res['bytes_per_queued_sample']:.0f} B")
    print(f"probe share of the first run (split): {fs['probe_s'] / fs['total_s']:.1%} "
          f"({fs['videos_probed']} videos, first frame each); decodes during planning: "
          f"{sum(res[n]['split']['plan_decodes'] for n in SCENARIOS)}; decodes in re-runs: "
          f"{res['in_flight']['split']['probe_decodes'] + res['all_done']['split']['probe_decodes']}")

    rnd = lambda v: round(v, 4) if isinstance(v, float) else v  # noqa: E731
    summary = {
        "bench": "enqueue",
        "samples": expected,
        "videos": n_videos,
        "video_bytes_avg": video_bytes // n_videos,
        "cores": cores,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "hiredis": _hiredis(),
        "redis": redis_version,
        "repeat": repeat,
        "first_s": rnd(res["first"]["wall_s"]),
        "in_flight_s": rnd(res["in_flight"]["wall_s"]),
        "all_done_s": rnd(res["all_done"]["wall_s"]),
        "targets": {"first_s": TARGETS["first"], "all_done_s": TARGETS["all_done"]},
        "runs": {n: {k: ([rnd(x) for x in v] if isinstance(v, list) else rnd(v)) for k, v in res[n].items() if k != "split"}
                 for n in SCENARIOS},
        "split": {n: {k: rnd(v) for k, v in res[n]["split"].items()} for n in SCENARIOS},
        "probe_share_first": rnd(fs["probe_s"] / fs["total_s"]),
        "bytes_per_queued_sample": res["bytes_per_queued_sample"],
    }
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _hiredis() -> bool:
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return False
    return bool(HIREDIS_AVAILABLE)


if __name__ == "__main__":
    sys.exit(main())
