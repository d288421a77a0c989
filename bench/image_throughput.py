"""Benchmark: images per second of the fleet against a bare in-process loop over the same prompts.

    python3 bench/image_throughput.py [--out $OUT/image_throughput.json]    # on a GPU host
    python3 bench/image_throughput.py --device cpu --quick                  # anywhere, to debug

The model is ``fleet make-tiny-model --kind image --preset bench``: Z-Image's DiT at its
real width (dim 3840, 30 heads) with 4 of its 30 layers, the full-width Flux VAE decoder,
a tiny text encoder, bf16 (workers/tiny_image_model.py). The same N rows of one prompts
CSV are made both ways, each from a cold process:

1. ``bare``: one process runs the rows with the image job, ``workers.jobs.image.run``, and
   one resident pipeline (PNGs written as a worker writes them), CUDA_VISIBLE_DEVICES=0,
   the torch CPU threads a fleet worker gets by default (gpu_common.bare_threads: all the
   host's CPUs on a GPU, 1 on the CPU), one step after the other and no text cache: what seed 002's
   per-GPU loop does.
2. ``fleet``: ``fleet up --gpus 0`` (embedded Redis, one worker on GPU 0, Flower) in a
   private state folder, ``fleet enqueue``, wait for every record, ``fleet down``; the
   worker as configured by default (each image's PNG encoding, write and record overlap
   the next image's GPU part; prompts encoded once).
3. ``fleet_sequential``: the same with ``FLEET_FINISH_IN_BACKGROUND=false`` and
   ``FLEET_TEXT_CACHE_ENTRIES=0`` (``--phases`` to leave it out).

Throughput = (N - 1) / (last end - first end), the first image (which pays the model
load) left out the same way on both sides. Targets (docs/BENCHMARKS.md): fleet / bare >= 1.5
and GPU 0 >= 85 % busy (NVML, averaged over each way's window) under the fleet;
fleet_sequential / bare >= 0.97. The stage profile (text, inputs, denoise, vae, encode,
write, wait, record_prev; mean seconds per image) comes from the samples' ``stage_*_s``
metrics, the first image left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (  # noqa: E402
    BenchError,
    BenchFleet,
    Deadline,
    UtilSampler,
    bare_threads,
    base_env,
    exit_on_sigterm,
    fake_gpu_file,
    log,
    out_dir,
    print_profile,
    record_stats,
    run,
    simple_throughput,
    stage_profile,
    write_json,
)

TARGET = 1.5  # the overlapped worker against the plain loop
TARGET_BUSY = 0.85  # NVML utilisation of GPU 0 under the overlapped worker
TARGET_SEQUENTIAL = 0.97  # the fleet's own cost, nothing overlapped
SUBJECTS = ["a paper boat on a lake", "a robot in a neon city, rain", "一只猫在窗台上", "a lighthouse in a storm",
            "a bowl of ramen, top view", "a red fox in snow", "an old library, warm light", "a desert at dawn"]


def bare_phase(tasks_path: Path, device: str, result_path: Path) -> int:
    """The child process of the bare loop: every task, one resident pipeline; ends as JSON."""
    import threading

    from fleet.contract import TaskPayload
    from workers.jobs.base import JobContext
    from workers.jobs.image import run as run_image
    from workers.model_cache import ModelCache
    from workers.runner import WORK_DIR_NAME

    tasks = [TaskPayload.model_validate(t) for t in json.loads(tasks_path.read_text())]
    cache, stopping = ModelCache(), threading.Event()
    gpus = (0,) if device == "cuda" else ()
    rows = []
    for task in tasks:
        ctx = JobContext(gpus=gpus, device=device, models=cache, stopping=stopping, attempt=1,
                         threads=bare_threads(device), work_dir=Path(task.output_root) / WORK_DIR_NAME / task.sample_id)
        t0 = time.monotonic()
        r = run_image(task, ctx)
        rows.append({"end": time.time(), "duration_s": time.monotonic() - t0, "model_load_s": r.model_load_s,
                     "metrics": r.metrics})
    write_json(result_path, {"samples": rows})
    return 0


def build_model(work: Path, preset: str, deadline: Deadline) -> Path:
    d = work / f"image-model-{preset}"
    run([sys.executable, "-m", "workers.tiny_model", str(d), "--kind", "image", "--preset", preset],
        base_env(OMP_NUM_THREADS=str(min(8, os.cpu_count() or 1))), min(300, deadline.left()), "building the model")
    return d


def write_experiment(work: Path, model: Path, n: int, args: argparse.Namespace, output: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.csv"
    with open(prompts, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "prompt"])
        w.writerows([(f"{i:06d}", f"{SUBJECTS[i % len(SUBJECTS)]}, variation {i}") for i in range(n)])
    exp = {"kind": "image", "name": "image-bench", "prompts": str(prompts), "seed_start": 42, "width": args.width,
           "height": args.height, "steps": args.steps, "cfg_scale": args.cfg, "dtype": args.dtype,
           "model": {"dir": str(model)}, "output": str(output)}
    if args.truncation is not None:
        exp["cfg_truncation_step"] = args.truncation
    path = work / "image-bench.json"
    path.write_text(json.dumps(exp, ensure_ascii=False, indent=1))
    return path


def run_bare(args: argparse.Namespace, work: Path, exp: Path, n: int, deadline: Deadline) -> dict[str, Any]:
    from fleet.experiment import load_experiment
    from fleet.planner import payloads, plan_experiment

    plan = plan_experiment(load_experiment(exp))
    tasks = [json.loads(p) for _, _, p in payloads(plan, plan.samples, lambda s: "bench")]
    assert len(tasks) == n
    for t in tasks:
        t["output_path"] = str(work / "out-bare" / Path(t["output_path"]).name)
        t["output_root"] = str(work / "out-bare")
    tasks_path, result = work / "bare-tasks.json", work / "bare-result.json"
    tasks_path.write_text(json.dumps(tasks, ensure_ascii=False))
    env = base_env(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES="0" if args.device == "cuda" else "")
    log(f"bare: {n} images in one process on {args.device}")
    run([sys.executable, str(Path(__file__).resolve()), "--phase", "bare", "--tasks", str(tasks_path),
         "--device", args.device, "--result", str(result)], env, max(5, deadline.left() - 30), "bare loop")
    rows = json.loads(result.read_text())["samples"]
    ends = [r["end"] for r in rows]
    return {"samples": len(rows), "window": [min(ends), max(ends)], "throughput_per_s": simple_throughput(ends),
            "mean_sample_s_after_first": round(sum(r["duration_s"] for r in rows[1:]) / max(1, len(rows) - 1), 4),
            "model_load_s": round(sum(r["model_load_s"] for r in rows), 3),
            "profile": stage_profile([r["metrics"] for r in rows[1:]])}


def run_fleet(work: Path, exp: Path, n: int, deadline: Deadline, fake: Path | None, name: str = "fleet",
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    fl = BenchFleet(work / name, fake_gpus=fake, extra_env=dict(extra_env or {}))
    log(f"{name}: up --gpus 0; {n} images")
    try:
        fl.up("--gpus", "0", timeout_s=min(120, deadline.left()))
        enq = fl.enqueue(exp)
        if enq["enqueued"] != n:
            raise BenchError(f"fleet: enqueued {enq['enqueued']} of {n}")
        recs, _ = fl.wait_done(n, deadline_s=max(5, deadline.left() - 40))
        stats = record_stats(recs)
        return {"samples": len(recs), "window": [recs[0].finished_at, recs[-1].finished_at],
                "throughput_per_s": stats["throughput_simple_per_s"], "mean_sample_s": stats["mean_sample_s"],
                "model_load_s": stats["model_load_s"], "busy_fraction_records": stats["busy_fraction_records"],
                "profile": stage_profile([r.metrics for r in recs[1:]])}
    finally:
        fl.down()


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """a's throughput over b's (None when either is missing)."""
    x, y = a.get("throughput_per_s"), b.get("throughput_per_s")
    return round(x / y, 4) if x and y else None


def same_files(a: Path, b: Path) -> bool:
    fa, fb = sorted(a.glob("*.png")), sorted(b.glob("*.png"))
    return [p.name for p in fa] == [p.name for p in fb] and all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/image_throughput.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny model, 64x64, 2 steps, 6 images (debugging)")
    p.add_argument("--preset", default="bench")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--truncation", type=int, default=5, help="cfg_truncation_step (seed 002's speed-up)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--phases", default="bare,fleet,fleet_sequential", help="comma-separated subset of those")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--out")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--tasks", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "bare":
        return bare_phase(args.tasks, args.device, args.result)
    if args.quick:
        args.preset, args.n, args.width, args.height, args.steps, args.dtype = "tiny", 6, 64, 64, 2, "fp32"
    out_path = out_dir(args.out, "image_throughput.json")
    deadline = Deadline(args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="fleet-image-bench-")).resolve()
    fake = fake_gpu_file(work / "fake-gpus.json", 1) if args.device == "cpu" else None
    res: dict[str, Any] = {"benchmark": "image_throughput", "host": socket.gethostname(), "device": args.device,
                           "config": {k: getattr(args, k) for k in ("preset", "n", "width", "height", "steps", "cfg",
                                                                      "truncation", "dtype")},
                           "phases": {}, "errors": []}
    sampler = UtilSampler(0.1) if args.device == "cuda" else None
    if sampler:
        sampler.start()
    ok = True
    try:
        model = build_model(work, args.preset, deadline)
        exp = write_experiment(work, model, args.n, args, work / "out-fleet")
        seq = write_experiment(work / "sequential", model, args.n, args, work / "out-fleet-seq")
        ways = (("bare", lambda: run_bare(args, work, exp, args.n, deadline)),
                ("fleet", lambda: run_fleet(work, exp, args.n, deadline, fake)),
                ("fleet_sequential", lambda: run_fleet(work, seq, args.n, deadline, fake, "fleet-seq", {
                    "FLEET_FINISH_IN_BACKGROUND": "false", "FLEET_TEXT_CACHE_ENTRIES": "0"})))
        for name, fn in ways:
            if name not in args.phases.split(","):
                continue
            try:
                r = fn()
                if sampler:
                    r["nvml_gpu0"] = sampler.mean_util(0, *r["window"])
                res["phases"][name] = r
            except Exception as e:  # noqa: BLE001 - report the phase, go on with the next
                ok = False
                res["errors"].append({"phase": name, "error": (str(e) if isinstance(e, BenchError)
                                                               else traceback.format_exc())[-4000:]})
                log(f"{name}: FAILED: {res['errors'][-1]['error'].splitlines()[0][:300]}")
        ph = res["phases"]
        bare, fleet, sequential = ph.get("bare", {}), ph.get("fleet", {}), ph.get("fleet_sequential", {})
        r, rs = ratio(fleet, bare), ratio(sequential, bare)
        busy = (fleet.get("nvml_gpu0") or {}).get("busy_fraction")
        res["summary"] = {"fleet_vs_bare": r, "target": TARGET, "ok": None if r is None else r >= TARGET,
                          "fleet_busy": busy, "busy_target": TARGET_BUSY,
                          "busy_ok": None if busy is None else busy >= TARGET_BUSY,
                          "bare_busy": (bare.get("nvml_gpu0") or {}).get("busy_fraction"),
                          "sequential_vs_bare": rs, "sequential_target": TARGET_SEQUENTIAL,
                          "same_files_as_bare": same_files(work / "out-bare", work / "out-fleet")}
    except BenchError as e:
        ok = False
        res["errors"].append({"phase": "setup", "error": str(e)[-4000:]})
    finally:
        if sampler:
            sampler.stop()
        res["total_s"] = round(deadline.elapsed(), 1)
        write_json(out_path, res)
        shutil.rmtree(work, ignore_errors=True)
    for name, ph in res["phases"].items():
        util = (ph.get("nvml_gpu0") or {}).get("mean_util_pct")
        print(f"{name:6s} {ph['samples']} images  {ph['throughput_per_s']:.3f}/s  GPU0 util {util}")
    summary = res.get("summary", {})
    print_profile(res["phases"])
    print(f"fleet / bare (overlapped): {summary.get('fleet_vs_bare')} (target >= {TARGET}); GPU0 busy "
          f"{summary.get('fleet_busy')} (target >= {TARGET_BUSY}; bare {summary.get('bare_busy')}); "
          f"same files: {summary.get('same_files_as_bare')}")
    print(f"fleet_sequential / bare: {summary.get('sequential_vs_bare')} (target >= {TARGET_SEQUENTIAL})")
    for e in res["errors"]:
        print(f"ERROR in {e['phase']}: {e['error'].splitlines()[0][:300]}")
    log(f"results: {out_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_on_sigterm()
    sys.exit(main())
