"""Benchmark and checks on a host with N >= 2 GPUs: scaling, busy fraction, reserve, multi-GPU workers.

    python3 bench/multi_gpu.py [--out $OUT/multi_gpu.json]               # on a host with 2+ GPUs
    python3 bench/multi_gpu.py --device cpu --quick                      # anywhere (fake 2-GPU inventory)

The workload is seed 001 in miniature: 4 categories with reference videos in proportion
14/33/13/8 (7/16/6/4 videos), one prompt, seeds 42 and 142 (66 samples), motion transfer
with the bench model (DiT of realistic width, real VAE) at 480x272x33, 10 steps: about
1-2 s a sample on an H100. Each part runs a fleet of its own (fresh state folder,
embedded Redis, free ports) and stops it:

1. ``all_gpus``: ``fleet up`` with no GPU list; one worker per GPU is asserted from
   ``fleet gpus --json`` (saved to --gpus-out); the workload runs while NVML utilisation
   of every GPU is sampled at 10 Hz.
2. ``reserve``: ``fleet up --reserve 1``; while a small experiment runs, the GPUs (NVML
   processes) and the fleet workers on each are sampled every second; one GPU must never
   have a fleet worker (nor any process).
3. ``multi_gpu_worker``: a private Redis, ``fleet worker --gpus 0,1`` and one
   ``fleet worker --gpu i`` per GPU; an experiment with ``gpus_per_sample: 2`` (queue
   gpus2) and a single-GPU one are enqueued together. The two-GPU samples must be made by
   the group worker (record gpus [0, 1], its CUDA_VISIBLE_DEVICES "0,1") while single-GPU
   samples complete on the other workers at the same time.
4. ``one_gpu``: ``fleet up --gpus 0``, the same workload (cut short, and marked partial,
   when the time budget runs out: its throughput is a steady rate either way).
5. ``determinism``: samples made on GPU k != 0 in part 1 and on GPU 0 in part 4 are
   decoded (PyAV) and compared frame by frame; and the first two samples are generated
   at once on GPU 0 and GPU 1 (one process each, no mp4) and their raw frames compared,
   which tells the GPUs apart from the encoder.

Figures: throughput = samples/s over the window from the moment every worker has
finished its first sample (model loaded) to the last end ("steady"; the plain
(N-1)/(last end - first end) is reported too). Scaling = steady(N GPUs) / steady(1 GPU),
target >= 0.95 x N. GPU busy fraction with model loads excluded, target >= 0.97, two
ways: from records (sum over each worker of duration_s - model_load_s, over the span from
its first post-load start to its last end) and from NVML utilisation over the same spans.

Writes --out (default $OUT/multi_gpu.json) and --gpus-out (default $OUT/fleet_gpus.json).
Exit status 0 when every part ran and every correctness check passed (throughput targets
are reported, not enforced), 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (  # noqa: E402
    BenchError,
    BenchFleet,
    Deadline,
    ProcGroup,
    UtilSampler,
    base_env,
    build_models,
    exit_on_sigterm,
    fake_gpu_file,
    log,
    make_dataset,
    out_dir,
    record_stats,
    start_redis,
    write_experiment,
    write_json,
)

from fleet.contract import CompletionRecord, Keys, WorkerEntry  # noqa: E402

CATEGORIES = ["camera_motion", "single_object", "multiple_objects", "complex_human_motion"]
PROMPTS = ["a paper boat drifting on a calm lake at sunset", "一只猫在窗台上伸懒腰"]
TARGET_SCALING = 0.95
TARGET_BUSY = 0.97


def n_gpus(args, fake: Path | None) -> int:
    if fake is not None:
        return args.fake_gpus
    from fleet.gpu_inventory import NvmlInventory

    with NvmlInventory() as inv:
        return len(inv.snapshot())


def inventory(fake: Path | None):
    from fleet.gpu_inventory import FakeInventory, NvmlInventory

    return FakeInventory(fake) if fake is not None else NvmlInventory()


# ---- part 1: every GPU ---------------------------------------------------------------------------
def part_all_gpus(args, work: Path, exp: Path, total: int, n: int, fake: Path | None, deadline: Deadline,
                  gpus_out: Path) -> tuple[dict, list[CompletionRecord]]:
    fl = BenchFleet(work / "all", fake_gpus=fake)
    sampler = UtilSampler(0.1) if fake is None else None
    res: dict[str, Any] = {}
    try:
        log(f"all_gpus: fleet up (no GPU list), {n} GPUs expected")
        res["up"] = fl.up(timeout_s=min(120, deadline.left())).strip().splitlines()
        fl.wait_workers(n, timeout_s=min(120, deadline.left()))
        view = fl.gpus_json()
        gpus_out.parent.mkdir(parents=True, exist_ok=True)
        gpus_out.write_text(json.dumps(view, indent=1, ensure_ascii=False))
        per_gpu = {g["index"]: [w["name"] for w in g["fleet_workers"]] for g in view["gpus"]}
        res["workers_per_gpu"] = per_gpu
        res["one_worker_per_gpu"] = len(per_gpu) == n and all(len(v) == 1 for v in per_gpu.values())
        if sampler:
            sampler.start()
        enq = fl.enqueue(exp)
        log(f"all_gpus: enqueued {enq['enqueued']} samples")
        recs, _ = fl.wait_done(total, deadline_s=max(10, deadline.left() - 60))
        res["status"] = fl.status(exp)
        stats = record_stats(recs)
        res.update(stats_summary(stats))
        if sampler:
            sampler.stop()
            nv = {}
            for name, w in stats["workers"].items():
                nv[name] = sampler.mean_util(w["gpus"][0], *w["window"])
            res["nvml"] = nv
            fr = [v["busy_fraction"] for v in nv.values() if v]
            res["busy_fraction_nvml"] = round(sum(fr) / len(fr), 4) if fr else None
            res["nvml_error"] = sampler.error
        return res, recs
    finally:
        if sampler and sampler.is_alive():
            sampler.stop()
        fl.down()


def stats_summary(stats: dict) -> dict:
    return {
        "samples": stats["samples"],
        "throughput_simple_per_s": stats["throughput_simple_per_s"],
        "throughput_steady": stats["throughput_steady"],
        "mean_sample_s": stats["mean_sample_s"],
        "model_load_s": stats["model_load_s"],
        "busy_fraction_records": stats["busy_fraction_records"],
        "busy_fraction_makespan": stats["busy_fraction_makespan"],
        "workers": {k: {kk: v[kk] for kk in ("gpus", "samples", "model_loads", "mean_sample_s", "busy_fraction",
                                             "mean_gap_s", "max_gap_s", "span_s")}
                    for k, v in stats["workers"].items()},
    }


# ---- part 2: reserve ------------------------------------------------------------------------------
class GpuWatcher(threading.Thread):
    """Every second: which GPUs have a fleet worker (heartbeats in Redis) and which any process (NVML)."""

    def __init__(self, fl: BenchFleet, fake: Path | None) -> None:
        super().__init__(name="gpu-watcher", daemon=True)
        self.fl, self.fake = fl, fake
        self.stop_event = threading.Event()
        self.ticks: list[dict] = []
        self.error: str | None = None

    def run(self) -> None:
        client = self.fl.client()
        inv = inventory(self.fake)
        try:
            while not self.stop_event.is_set():
                try:
                    snaps = inv.snapshot()
                    ws = [WorkerEntry.model_validate_json(v) for v in client.hvals(Keys("fleet").workers)]
                    worker_pids = set(self.fl.worker_pids().values())
                    tick = {"t": time.time(), "gpus": {}}
                    for s in snaps:
                        on = [w.name for w in ws if s.index in w.gpus]
                        pids = [p.pid for p in s.processes]
                        tick["gpus"][s.index] = {"fleet_workers": on, "processes": pids,
                                                 "fleet_worker_processes": sorted(set(pids) & worker_pids)}
                    self.ticks.append(tick)
                except Exception as e:  # keep watching; report the last error
                    self.error = f"{type(e).__name__}: {e}"
                self.stop_event.wait(1.0)
        finally:
            inv.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


def part_reserve(args, work: Path, exp: Path, total: int, n: int, fake: Path | None, deadline: Deadline) -> dict:
    fl = BenchFleet(work / "reserve", fake_gpus=fake)
    watcher = GpuWatcher(fl, fake)
    res: dict[str, Any] = {}
    try:
        log("reserve: fleet up --reserve 1")
        res["up"] = fl.up("--reserve", "1", timeout_s=min(120, deadline.left())).strip().splitlines()
        watcher.start()
        enq = fl.enqueue(exp)
        log(f"reserve: enqueued {enq['enqueued']} samples")
        mid = None
        end = time.monotonic() + max(10, deadline.left() - 60)
        while time.monotonic() < end:
            done = fl.client().hlen(fl.keys.records)
            if mid is None and done >= 1:
                mid = fl.gpus_json()  # the CLI's view while the experiment runs
            if done >= total:
                break
            time.sleep(0.5)
        recs, _ = fl.wait_done(total, deadline_s=5)
        watcher.stop()
        all_gpus = set(range(n))
        with_worker = {g for t in watcher.ticks for g, v in t["gpus"].items() if v["fleet_workers"]}
        with_process = {g for t in watcher.ticks for g, v in t["gpus"].items() if v["processes"]}
        never = sorted(all_gpus - with_worker - with_process)
        res.update({
            "samples": len(recs), "ticks": len(watcher.ticks), "watch_error": watcher.error,
            "gpus_with_fleet_worker": sorted(with_worker), "gpus_with_any_process": sorted(with_process),
            "gpus_never_used": never, "record_gpus": sorted({tuple(r.gpus) for r in recs}),
            "fleet_gpus_json_mid_run": mid,
            "ok": len(never) >= 1 and len(watcher.ticks) >= 3 and bool(with_worker),
        })
        return res
    finally:
        if watcher.is_alive():
            watcher.stop()
        fl.down()


# ---- part 3: a worker holding two GPUs --------------------------------------------------------------
def part_multi_gpu_worker(args, work: Path, exp_group: Path, n_group: int, exp_single: Path, n_single: int, n: int,
                          fake: Path | None, deadline: Deadline) -> dict:
    root = work / "group"
    procs = ProcGroup()
    res: dict[str, Any] = {}
    try:
        url = start_redis(procs, root)
        env = base_env(FLEET_BROKER_URL=url, FLEET_STATE_DIR=str(root / "state"), FLEET_OUTPUT_ROOTS=json.dumps([str(work)]))
        if fake is not None:
            env["FLEET_FAKE_GPUS"] = str(fake)
        log("multi_gpu_worker: fleet worker --gpus 0,1 and one fleet worker --gpu i per GPU")
        group = procs.start("worker gpus 0,1", [sys.executable, "-m", "fleet.cli", "worker", "--gpus", "0,1"], env,
                            root / "worker-gpus0-1.log")
        for i in range(n):
            procs.start(f"worker gpu {i}", [sys.executable, "-m", "fleet.cli", "worker", "--gpu", str(i)], env,
                        root / f"worker-gpu{i}.log")
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        keys = Keys("fleet")
        end = time.monotonic() + min(120, deadline.left())
        while client.hlen(keys.workers) < n + 1:
            procs.check_alive()
            if time.monotonic() > end:
                raise BenchError(f"multi_gpu_worker: workers did not register\n{procs.log_tails()}")
            time.sleep(0.2)
        entries = {WorkerEntry.model_validate_json(v).name: WorkerEntry.model_validate_json(v)
                   for v in client.hvals(keys.workers)}
        res["workers"] = {k: {"gpus": list(v.gpus), "queues": v.queues} for k, v in entries.items()}
        for exp in (exp_group, exp_single):
            r = base_env_run(["enqueue", str(exp), "--json"], env, deadline)
            res.setdefault("enqueue", []).append(json.loads(r))
        total = n_group + n_single
        end = time.monotonic() + max(10, deadline.left() - 60)
        while client.hlen(keys.records) < total:
            procs.check_alive()
            if client.hlen(keys.failed):
                raise BenchError(f"multi_gpu_worker: a sample failed: {list(client.hvals(keys.failed))[:1]}\n"
                                 f"{procs.log_tails()}")
            if time.monotonic() > end:
                raise BenchError(f"multi_gpu_worker: {client.hlen(keys.records)} of {total} done\n{procs.log_tails()}")
            time.sleep(0.25)
        recs = [CompletionRecord.model_validate_json(v) for v in client.hvals(keys.records)]
        grp = [r for r in recs if r.experiment == exp_group.stem]
        single = [r for r in recs if r.experiment == exp_single.stem]
        try:
            environ = dict(x.split("=", 1) for x in Path(f"/proc/{group.pid}/environ").read_text().split("\0") if "=" in x)
            cvd = environ.get("CUDA_VISIBLE_DEVICES")
        except OSError:
            cvd = None
        log_text = (root / "worker-gpus0-1.log").read_text(errors="replace")

        def iv(r: CompletionRecord) -> tuple[float, float]:
            return r.finished_at - r.duration_s, r.finished_at

        overlaps = sum(1 for g in grp for s in single if iv(g)[0] < iv(s)[1] and iv(s)[0] < iv(g)[1])
        res.update({
            "group_records": [{"worker": r.worker, "gpus": r.gpus} for r in grp],
            "single_records_by_worker": {w: sum(1 for r in single if r.worker == w) for w in sorted({r.worker for r in single})},
            "single_gpus": sorted({tuple(r.gpus) for r in single}),
            "group_worker_cuda_visible_devices": cvd,
            "group_worker_log_ready_line": next((ln.strip() for ln in log_text.splitlines() if " ready on " in ln), None),
            "overlapping_group_single_pairs": overlaps,
        })
        res["ok"] = (len(grp) == n_group and all(r.gpus == [0, 1] and r.worker.startswith("gpus0-1@") for r in grp)
                     and cvd == "0,1" and len(single) == n_single
                     and all(not r.worker.startswith("gpus") for r in single) and overlaps > 0)
        return res
    finally:
        procs.stop_all()


def base_env_run(args: list[str], env: dict[str, str], deadline: Deadline) -> str:
    from gpu_common import run

    return run([sys.executable, "-m", "fleet.cli", *args], env, min(120, deadline.left()), "fleet " + " ".join(args)).stdout


# ---- part 4: one GPU -----------------------------------------------------------------------------
def part_one_gpu(args, work: Path, exp: Path, total: int, fake: Path | None, deadline: Deadline) -> tuple[dict, list]:
    fl = BenchFleet(work / "one", fake_gpus=fake)
    try:
        log("one_gpu: fleet up --gpus 0")
        fl.up("--gpus", "0", timeout_s=min(120, deadline.left()))
        enq = fl.enqueue(exp)
        log(f"one_gpu: enqueued {enq['enqueued']} samples (cut short if the budget runs out)")
        recs, partial = fl.wait_done(total, deadline_s=max(10, deadline.left() - 45), min_partial=min(total, 6))
        res = stats_summary(record_stats(recs))
        res["partial"] = partial
        return res, recs
    finally:
        fl.down()


# ---- part 5: the same sample on two GPUs ------------------------------------------------------------
def part_determinism(recs_n: list[CompletionRecord], out_n: Path, recs_1: list[CompletionRecord], out_1: Path,
                     max_pairs: int = 4) -> dict:
    import av
    import numpy as np

    one = {Path(r.output_path).relative_to(out_1): r for r in recs_1}
    pairs = []
    for r in recs_n:
        rel = Path(r.output_path).relative_to(out_n)
        if r.gpus != [0] and rel in one and one[rel].gpus == [0]:
            pairs.append((r, one[rel]))
    pairs = pairs[:max_pairs]

    def frames(p: str):
        with av.open(p) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])

    def sha(p: str) -> str:
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    out = []
    for a, b in pairs:
        fa, fb = frames(a.output_path), frames(b.output_path)
        same = fa.shape == fb.shape and bool(np.array_equal(fa, fb))
        out.append({"sample": str(Path(a.output_path).relative_to(out_n)), "gpus": [a.gpus, b.gpus],
                    "frames": list(fa.shape), "identical_frames": same, "identical_files": sha(a.output_path) == sha(b.output_path),
                    "max_abs_diff": None if fa.shape != fb.shape else int(np.abs(fa.astype(int) - fb.astype(int)).max())})
    return {"pairs": out, "ok": bool(out) and all(p["identical_frames"] for p in out)}


def raw_phase(exp: Path, count: int, device: str, result: Path) -> int:
    """Child process: generate the first ``count`` samples of ``exp`` (no mp4) and hash the raw frames."""
    import numpy as np

    from fleet.contract import TaskPayload
    from fleet.experiment import load_experiment
    from fleet.planner import payloads, plan_experiment
    from workers.jobs.video import _generate, params_of
    from workers.model_cache import ModelCache
    from workers.wan_model import load_pipeline

    plan = plan_experiment(load_experiment(exp))
    tasks = [TaskPayload.model_validate_json(pl) for _, _, pl in payloads(plan, plan.samples, lambda s: "raw")][:count]
    cache = ModelCache()
    out = []
    for t in tasks:
        params = params_of(t)
        spec = params.model
        # The video job's cache key (workers/jobs/video.py): kind, model identity, device.
        pipe, _, _ = cache.get("video", spec.model_dump_json(), device, lambda spec=spec: load_pipeline(spec, device))
        frames = np.ascontiguousarray(_generate(params, pipe))  # (T, H, W, 3) uint8, as the job writes them
        out.append({"sample_id": t.sample_id, "shape": list(frames.shape),
                    "sha256": hashlib.sha256(frames.tobytes()).hexdigest(), "mean": float(frames.mean())})
    write_json(result, {"device": device, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "samples": out})
    return 0


def part_raw_frames(work: Path, exp: Path, gpus: list[int], fake: Path | None, deadline: Deadline, count: int = 2) -> dict:
    """The first ``count`` samples generated on each of ``gpus`` at once, one process per GPU; raw frames compared."""
    import subprocess

    procs = []
    for g in gpus:
        env = base_env(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES="" if fake else str(g))
        res_path = work / f"raw-gpu{g}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--phase", "raw", "--exp", str(exp), "--count", str(count),
                "--device", "cpu" if fake else "cuda", "--result", str(res_path)]
        procs.append((g, res_path, subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results = {}
    for g, res_path, pr in procs:
        try:
            outp, _ = pr.communicate(timeout=max(10, deadline.left() - 20))
        except subprocess.TimeoutExpired:
            pr.kill()
            outp, _ = pr.communicate()
            raise BenchError(f"raw frames on GPU {g}: not done in time") from None
        if pr.returncode:
            raise BenchError(f"raw frames on GPU {g}: exit {pr.returncode}: {outp[-3000:]}")
        results[g] = json.loads(res_path.read_text())["samples"]
    ref = results[gpus[0]]
    same = all([a["sha256"] for a in r] == [a["sha256"] for a in ref] for r in results.values())
    return {"gpus": gpus, "samples": {str(g): r for g, r in results.items()}, "identical": same}


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/multi_gpu.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny model, 64x64x5, 2 steps, 2/4/2/1 videos (debugging)")
    p.add_argument("--fake-gpus", type=int, default=2, help="GPUs of the fake inventory (--device cpu)")
    p.add_argument("--parts", default="all_gpus,reserve,multi_gpu_worker,one_gpu,determinism")
    p.add_argument("--preset", default="bench")
    p.add_argument("--videos", default="7,16,6,4", help="videos per category (seed 001: 14/33/13/8)")
    p.add_argument("--prompts", type=int, default=1, choices=[1, 2])
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=272)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--budget-s", type=float, default=440, help="wall-clock budget of the whole run")
    p.add_argument("--out", help="JSON result file (default $OUT/multi_gpu.json)")
    p.add_argument("--gpus-out", help="`fleet gpus --json` of part 1 (default $OUT/fleet_gpus.json)")
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: the raw-frames child
    p.add_argument("--exp", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "raw":
        return raw_phase(args.exp, args.count, args.device, args.result)
    if args.quick:
        # 128x128, not 64x64: x264 (PyAV, CRF, mbtree) encodes identical 64x64 frames into
        # different bytes now and then, which would hide what this compares.
        args.preset, args.videos = "tiny", "2,4,2,1"
        args.width = args.height = 128
        args.frames, args.steps, args.cfg = 5, 2, 1.0
    parts = [x for x in args.parts.split(",") if x]
    out_path = out_dir(args.out, "multi_gpu.json")
    gpus_out = Path(args.gpus_out) if args.gpus_out else out_path.parent / "fleet_gpus.json"
    deadline = Deadline(args.budget_s)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fleet-multi-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    fake = fake_gpu_file(work / "fake-gpus.json", args.fake_gpus) if args.device == "cpu" else None
    counts = [int(x) for x in args.videos.split(",")]
    videos = dict(zip(CATEGORIES, counts))
    size = dict(width=args.width, height=args.height, frames=args.frames, steps=args.steps, cfg_scale=args.cfg,
                mode="motion", denoising_strength=0.7, fps=15)
    res: dict[str, Any] = {"benchmark": "multi_gpu", "host": socket.gethostname(), "device": args.device,
                           "quick": args.quick, "config": {"preset": args.preset, "videos": videos, "size": size},
                           "parts": {}, "errors": []}
    ok = True
    recs_n: list = []
    recs_1: list = []
    try:
        n = n_gpus(args, fake)
        res["n_gpus"] = n
        if n < 2:
            raise BenchError(f"this host has {n} GPU(s); multi_gpu needs 2 or more")
        log(f"{n} GPUs; building the {args.preset} model in {work}")
        models = build_models(work, [args.preset], timeout_s=min(240, deadline.left()))
        model = models[args.preset]
        ds = make_dataset(work, videos)
        prompts = PROMPTS[: args.prompts]
        seeds = [42, 142]
        total = sum(counts) * len(prompts) * len(seeds)
        exp_n = write_experiment(work / "exp-n.json", model_dir=model, dataset=ds, prompts=prompts, seeds=seeds,
                                 output=work / "out-n", **size)
        exp_1 = write_experiment(work / "exp-1.json", model_dir=model, dataset=ds, prompts=prompts, seeds=seeds,
                                 output=work / "out-1", **size)
        small_cat = CATEGORIES[3]
        n_small = videos[small_cat] * len(prompts)
        exp_res = write_experiment(work / "exp-reserve.json", model_dir=model, dataset=ds, prompts=prompts, seeds=seeds,
                                   output=work / "out-reserve", categories=[small_cat], **size)
        exp_grp = write_experiment(work / "exp-group.json", model_dir=model, dataset=ds, prompts=prompts, seeds=[42],
                                   output=work / "out-group", categories=[small_cat], gpus_per_sample=2, **size)
        mid_cat = CATEGORIES[2]
        exp_single = write_experiment(work / "exp-single.json", model_dir=model, dataset=ds, prompts=prompts, seeds=[142],
                                      output=work / "out-single", categories=[mid_cat], **size)
        res["config"].update(samples=total, prompts=len(prompts), seeds=seeds)
        res["build_s"] = round(deadline.elapsed(), 1)

        def part(name: str, fn, need_s: float) -> Any:
            nonlocal ok
            try:
                deadline.need(need_s, name)
                r = fn()
                extra = None
                if isinstance(r, tuple):
                    r, extra = r
                res["parts"][name] = r
                if r.get("ok") is False or r.get("one_worker_per_gpu") is False:
                    ok = False
                    log(f"{name}: CHECK FAILED")
                else:
                    log(f"{name}: done")
                return extra
            except Exception as e:  # noqa: BLE001 - one part's fault must not cost the others
                ok = False
                msg = str(e) if isinstance(e, BenchError) else traceback.format_exc()
                log(f"{name}: FAILED: {(msg.splitlines() or [''])[0][:300]}")
                res["errors"].append({"part": name, "error": msg[-6000:]})
                return None
            finally:
                write_json(out_path, res)

        if "all_gpus" in parts:
            recs_n = part("all_gpus", lambda: part_all_gpus(args, work, exp_n, total, n, fake, deadline, gpus_out), 60) or []
        if "reserve" in parts:
            part("reserve", lambda: part_reserve(args, work, exp_res, n_small * 2, n, fake, deadline), 45)
        if "multi_gpu_worker" in parts:
            part("multi_gpu_worker", lambda: part_multi_gpu_worker(
                args, work, exp_grp, n_small, exp_single, videos[mid_cat] * len(prompts), n, fake, deadline), 45)
        if "one_gpu" in parts:
            recs_1 = part("one_gpu", lambda: part_one_gpu(args, work, exp_1, total, fake, deadline), 45) or []
        if "determinism" in parts:
            def determinism() -> dict:
                r: dict[str, Any] = {}
                if recs_n and recs_1:
                    r["mp4"] = part_determinism(recs_n, work / "out-n", recs_1, work / "out-1")
                r["raw_frames"] = part_raw_frames(work, exp_n, [0, 1], fake, deadline)
                r["ok"] = r["raw_frames"]["identical"] and r.get("mp4", {}).get("ok", True)
                return r

            part("determinism", determinism, 30)
    except BenchError as e:
        ok = False
        log(f"FAILED: {str(e).splitlines()[0][:300]}")
        res["errors"].append({"part": "setup", "error": str(e)[-6000:]})
    except SystemExit:
        res["errors"].append({"part": "all", "error": "interrupted (SIGTERM): stopped the fleets and wrote what was done"})
        raise
    finally:
        summarise(res)
        res["total_s"] = round(deadline.elapsed(), 1)
        write_json(out_path, res)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(res)
    log(f"results: {out_path}, {gpus_out}")
    return 0 if ok else 1


def summarise(res: dict) -> None:
    parts = res["parts"]
    a, one = parts.get("all_gpus", {}), parts.get("one_gpu", {})
    n = res.get("n_gpus") or 0

    def steady(r: dict) -> float | None:
        return (r.get("throughput_steady") or {}).get("per_s")

    sn, s1 = steady(a), steady(one)
    scaling = sn / s1 if sn and s1 else None
    simple = (a.get("throughput_simple_per_s") / one.get("throughput_simple_per_s")
              if a.get("throughput_simple_per_s") and one.get("throughput_simple_per_s") else None)
    res["summary"] = {
        "n_gpus": n,
        "scaling": round(scaling, 4) if scaling else None,
        "scaling_per_gpu": round(scaling / n, 4) if scaling and n else None,
        "scaling_simple": round(simple, 4) if simple else None,
        "scaling_target_per_gpu": TARGET_SCALING,
        "scaling_ok": None if not scaling else scaling / n >= TARGET_SCALING,
        "busy_fraction_records": a.get("busy_fraction_records"),
        "busy_fraction_makespan": a.get("busy_fraction_makespan"),
        "busy_fraction_nvml": a.get("busy_fraction_nvml"),
        "busy_target": TARGET_BUSY,
        "one_worker_per_gpu": a.get("one_worker_per_gpu"),
        "reserve_ok": parts.get("reserve", {}).get("ok"),
        "multi_gpu_worker_ok": parts.get("multi_gpu_worker", {}).get("ok"),
        "determinism_ok": parts.get("determinism", {}).get("ok"),
        "same_raw_frames_on_two_gpus": (parts.get("determinism", {}).get("raw_frames") or {}).get("identical"),
        "same_mp4_frames_on_two_gpus": (parts.get("determinism", {}).get("mp4") or {}).get("ok"),
        "one_gpu_partial": one.get("partial"),
    }


def print_summary(res: dict) -> None:
    s = res.get("summary", {})
    a, one = res["parts"].get("all_gpus", {}), res["parts"].get("one_gpu", {})

    def f(x: Any, nd: int = 3) -> str:
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    print()
    for name, r in (("all GPUs", a), ("one GPU", one)):
        st = r.get("throughput_steady") or {}
        print(f"{name:9} samples {f(r.get('samples'))}  steady {f(st.get('per_s'))}/s over {f(st.get('window_s'), 1)} s  "
              f"simple {f(r.get('throughput_simple_per_s'))}/s  mean {f(r.get('mean_sample_s'))} s/sample  "
              f"loads {r.get('model_load_s')}")
    print(f"scaling on {s.get('n_gpus')} GPUs: {f(s.get('scaling'))} = {f(s.get('scaling_per_gpu'))} x N "
          f"(simple {f(s.get('scaling_simple'))}; target >= {TARGET_SCALING} x N)")
    print(f"GPU busy fraction: records {f(s.get('busy_fraction_records'), 4)} (makespan {f(s.get('busy_fraction_makespan'), 4)}), "
          f"NVML {f(s.get('busy_fraction_nvml'), 4)}  (target >= {TARGET_BUSY})")
    print(f"one worker per GPU: {s.get('one_worker_per_gpu')}   reserve 1: {s.get('reserve_ok')}   "
          f"two-GPU worker: {s.get('multi_gpu_worker_ok')}")
    print(f"same sample on two GPUs: raw frames identical {s.get('same_raw_frames_on_two_gpus')}, "
          f"decoded mp4 frames identical {s.get('same_mp4_frames_on_two_gpus')}")
    for e in res["errors"]:
        print(f"ERROR in {e['part']}: {e['error'].splitlines()[0][:300]}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_on_sigterm()
    sys.exit(main())
