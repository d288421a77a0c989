"""Benchmark: fleet throughput on one GPU against a bare in-process loop, the stage profile, and packed slots.

    python3 bench/gpu_throughput.py [--out $OUT/gpu_throughput.json]      # on a GPU host
    python3 bench/gpu_throughput.py --device cpu --quick                  # anywhere, to debug

The same samples are made every way (planned from one experiment; only the output folder
differs), each way starting from a cold process:

1. ``bare``: one process runs the samples with the video job, ``workers.jobs.video.run``,
   whose ``workers.model_cache.ModelCache`` loads the pipeline once (mp4s written exactly
   as a worker writes them), with the worker's environment (CUDA_VISIBLE_DEVICES=0, one
   CPU thread for torch), one step after the other and no text cache: what a plain loop
   does. Each sample's end is taken when its file is in place.
2. ``fleet``: ``python3 -m fleet.cli up --gpus 0`` (embedded Redis, the supervisor starts
   one worker on GPU 0, Flower) in a private state folder on free ports; ``fleet enqueue``;
   wait (deadline) until every completion record is in; the records' ``finished_at`` are
   the ends; ``fleet down``. The worker as configured by default: each sample's encoding,
   writing and record overlap the next sample's GPU part, prompts are encoded once.
3. ``fleet_sequential``: the same with ``FLEET_FINISH_IN_BACKGROUND=false`` and
   ``FLEET_TEXT_CACHE_ENTRIES=0``: the worker before the overlap, for the attribution.
4. ``packed``: the tiny model at a moderate size, one worker on GPU 0 against two
   (``fleet up --gpus 0 --slots-per-gpu 2``), the same samples.

Throughput = (N - 1) / (last end - first end): the first sample, which pays for loading
the model, is left out the same way on both sides. With two slots both slots' first
samples pay a load, so "steady" counts only what ends after every slot has finished its
first sample (over that window); with one slot the two figures are equal.
Targets (docs/BENCHMARKS.md): fleet / bare >= 1.5 with one slot and the GPU >= 85 % busy
(NVML) under the fleet; fleet_sequential / bare >= 0.97 (the fleet's own cost); packed two
/ one >= 1.3 where the bare loop leaves the GPU idle. NVML utilisation of GPU 0 is sampled
at 10 Hz and averaged over each way's measured window (GPU runs only). The stage profile
(mean seconds per sample of text encoding, other inputs, denoising, VAE decoding, frames to
the host, mp4 encoding, writing, waiting for the previous finish, the previous record's
write) comes from the samples' ``stage_*_s`` metrics, first sample left out.

On CPU (``--device cpu``) the fleet's workers run on a fake one-GPU inventory
(FLEET_FAKE_GPUS), so they are named and queued like GPU workers but compute on the CPU.
``--quick`` uses the tiny model at 64x64x5, 2 steps, everywhere.

Prints a table; writes every figure as JSON to --out (default $OUT/gpu_throughput.json).
Exit status 0 when every phase ran (targets are reported, not enforced), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (  # noqa: E402
    REPO,
    BenchError,
    BenchFleet,
    Deadline,
    UtilSampler,
    bare_threads,
    base_env,
    build_models,
    exit_on_sigterm,
    fake_gpu_file,
    log,
    make_dataset,
    out_dir,
    print_profile,
    record_stats,
    simple_throughput,
    stage_profile,
    write_experiment,
    write_json,
)

SEEDS = [42, 142]
PROMPTS = ["a paper boat drifting on a calm lake at sunset", "一只猫在窗台上伸懒腰"]
TARGET_FLEET_VS_BARE = 1.5  # the overlapped worker against the plain loop
TARGET_BUSY = 0.85  # NVML utilisation of GPU 0 under the overlapped worker
TARGET_SEQUENTIAL_VS_BARE = 0.97  # the fleet's own cost, nothing overlapped
TARGET_PACKED = 1.3


# ---- the bare loop (a child process) ---------------------------------------------------------
def bare_phase(tasks_path: Path, device: str, result_path: Path) -> int:
    """Run the tasks in this process, one resident pipeline; write ends and durations as JSON."""
    import threading

    from fleet.contract import TaskPayload
    from workers.jobs.base import JobContext
    from workers.jobs.video import run as run_video
    from workers.model_cache import ModelCache
    from workers.runner import WORK_DIR_NAME

    tasks = [TaskPayload.model_validate(t) for t in json.loads(tasks_path.read_text())]
    cache = ModelCache()
    stopping = threading.Event()
    gpus = (0,) if device == "cuda" else ()  # as a worker on GPU 0 (CUDA_VISIBLE_DEVICES=0)
    rows = []
    t_start = time.time()
    for task in tasks:
        # The context a worker gives the job (workers/runner.py), the same model cache every sample.
        ctx = JobContext(gpus=gpus, device=device, models=cache, stopping=stopping, attempt=task.attempt,
                         threads=bare_threads(device), work_dir=Path(task.output_root) / WORK_DIR_NAME / task.sample_id)
        t0 = time.monotonic()
        r = run_video(task, ctx)
        rows.append({"end": time.time(), "duration_s": time.monotonic() - t0, "model_load_s": r.model_load_s,
                     "model_loaded": r.model_loaded, "output": r.output_path, "metrics": r.metrics})
    write_json(result_path, {"started": t_start, "samples": rows})
    return 0


# ---- the parent ---------------------------------------------------------------------------------
def plan_tasks(exp_path: Path) -> list[dict]:
    """The task payloads the fleet would publish for the experiment, in publish order."""
    from fleet.experiment import load_experiment
    from fleet.planner import payloads, plan_experiment

    plan = plan_experiment(load_experiment(exp_path))
    return [json.loads(p) for _, _, p in payloads(plan, plan.samples, lambda s: "bench")]


def experiment_for(root: Path, name: str, model_dir: Path, n: int, size: dict[str, Any], output: Path) -> tuple[Path, int]:
    """An experiment of at least ``n`` samples: videos x 2 prompts x 2 seeds (one category)."""
    per_video = len(PROMPTS) * len(SEEDS)
    videos = max(1, math.ceil(n / per_video))
    dataset = make_dataset(root / f"data-{videos}", {"bench": videos})
    exp = write_experiment(root / f"{name}.json", model_dir=model_dir, dataset=dataset, prompts=PROMPTS, seeds=SEEDS,
                           output=output, **size)
    return exp, videos * per_video


def run_bare(args, work: Path, exp_path: Path, n: int, deadline: Deadline) -> dict[str, Any]:
    tasks = plan_tasks(exp_path)
    assert len(tasks) == n, (len(tasks), n)
    for t in tasks:  # the same samples, written elsewhere
        t["output_path"] = str(work / "out-bare" / Path(t["output_path"]).relative_to(exp_output(exp_path)))
        t["output_root"] = str(work / "out-bare")
    tasks_path = work / "bare-tasks.json"
    tasks_path.write_text(json.dumps(tasks, ensure_ascii=False))
    result = work / "bare-result.json"
    env = base_env(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES="0" if args.device == "cuda" else "")
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", "bare", "--tasks", str(tasks_path),
            "--device", args.device, "--result", str(result)]
    log(f"bare: {n} samples in one process on {args.device}")
    t0 = time.time()
    try:
        r = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=max(5, deadline.left() - 30))
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"bare loop: not finished within {deadline.left() - 30:.0f} s") from e
    if r.returncode:
        raise BenchError(f"bare loop: exit {r.returncode}: {(r.stdout[-1000:] + r.stderr[-3000:]).strip()}")
    data = json.loads(result.read_text())
    rows = data["samples"]
    ends = [row["end"] for row in rows]
    steady = [row["duration_s"] - row["model_load_s"] for row in rows]
    return {
        "samples": len(rows),
        "window": [min(ends), max(ends)],  # where throughput is measured (NVML utilisation too)
        "throughput_per_s": simple_throughput(ends),
        "mean_sample_s": round(sum(steady) / len(steady), 4),
        "mean_sample_s_after_first": round(sum(steady[1:]) / max(1, len(steady) - 1), 4),
        "model_load_s": round(sum(row["model_load_s"] for row in rows), 3),
        "first_sample_s": round(rows[0]["duration_s"], 3),
        "profile": stage_profile([row["metrics"] for row in rows[1:]]),
        "process_s": round(time.time() - t0, 2),
    }


def exp_output(exp_path: Path) -> Path:
    return Path(json.loads(exp_path.read_text())["output"]).resolve()


def run_fleet(args, work: Path, name: str, exp_path: Path, n: int, deadline: Deadline, up_args: list[str],
              fake: Path | None, expect_workers: int, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    fl = BenchFleet(work / name, fake_gpus=fake, extra_env=dict(extra_env or {}))
    log(f"{name}: fleet up {' '.join(up_args)}; {n} samples")
    t0 = time.time()
    try:
        fl.up(*up_args, timeout_s=min(120, deadline.left()))
        enq = fl.enqueue(exp_path)
        if enq["enqueued"] != n:
            raise BenchError(f"{name}: enqueued {enq['enqueued']} of {n}")
        recs, _ = fl.wait_done(n, deadline_s=max(5, deadline.left() - 40))
        status = fl.status(exp_path)
        stats = record_stats(recs)
        if len(stats["workers"]) != expect_workers:
            log(f"{name}: WARNING {len(stats['workers'])} workers made samples, expected {expect_workers}")
        out = {
            "samples": len(recs), "enqueue": enq, "status": {k: status[k] for k in ("total", "done", "failed")},
            # Where the steady throughput is measured (every slot past its first sample); NVML too.
            "window": ([recs[-1].finished_at - stats["throughput_steady"]["window_s"], recs[-1].finished_at]
                       if stats["throughput_steady"] else [recs[0].finished_at, recs[-1].finished_at]),
            "throughput_per_s": stats["throughput_simple_per_s"],
            "throughput_steady_per_s": stats["throughput_steady"]["per_s"] if stats["throughput_steady"] else None,
            "mean_sample_s": stats["mean_sample_s"],
            "model_load_s": stats["model_load_s"],
            "workers": {k: {kk: v[kk] for kk in ("gpus", "samples", "model_loads", "mean_sample_s", "busy_fraction",
                                                  "mean_gap_s", "max_gap_s")}
                        for k, v in stats["workers"].items()},
            "busy_fraction_records": stats["busy_fraction_records"],
            "profile": stage_profile([r.metrics for r in recs[1:]]),
            "process_s": round(time.time() - t0, 2),
        }
        return out
    finally:
        fl.down()


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_throughput.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny model, 64x64x5, 2 steps, few samples (debugging)")
    p.add_argument("--phases", default="bare,fleet,fleet_sequential,packed",
                   help="comma-separated subset of bare,fleet,fleet_sequential,packed")
    p.add_argument("--preset", default="bench", help="model of bare/fleet: bench or tiny")
    p.add_argument("--n", type=int, default=12, help="samples of bare/fleet (rounded up to a multiple of 4)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--untiled", action="store_true",
                   help="bare/fleet samples with tiled: false (an untiled VAE decode, 2.6x faster on an H200)")
    p.add_argument("--packed-preset", default="tiny")
    p.add_argument("--packed-n", type=int, default=24)
    p.add_argument("--packed-width", type=int, default=256)
    p.add_argument("--packed-height", type=int, default=256)
    p.add_argument("--packed-frames", type=int, default=33)
    p.add_argument("--packed-steps", type=int, default=20)
    p.add_argument("--packed-slots", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=420, help="wall-clock budget of the whole run")
    p.add_argument("--out", help="JSON result file (default $OUT/gpu_throughput.json)")
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    # internal: the bare loop's child process
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--tasks", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "bare":
        return bare_phase(args.tasks, args.device, args.result)

    if args.quick:
        args.preset, args.packed_preset = "tiny", "tiny"
        args.n, args.packed_n = min(args.n, 4), min(args.packed_n, 8)
        args.width = args.height = args.packed_width = args.packed_height = 64
        args.frames = args.packed_frames = 5
        args.steps = args.packed_steps = 2
        args.cfg = 1.0
    phases = [x for x in args.phases.split(",") if x]
    out_path = out_dir(args.out, "gpu_throughput.json")
    deadline = Deadline(args.budget_s)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fleet-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    fake = fake_gpu_file(work / "fake-gpus.json", 1) if args.device == "cpu" else None
    size = dict(width=args.width, height=args.height, frames=args.frames, steps=args.steps, cfg_scale=args.cfg,
                mode="t2v", fps=15, tiled=not args.untiled)
    psize = dict(width=args.packed_width, height=args.packed_height, frames=args.packed_frames,
                 steps=args.packed_steps, cfg_scale=args.cfg, mode="t2v", fps=15)
    res: dict[str, Any] = {
        "benchmark": "gpu_throughput", "host": socket.gethostname(), "device": args.device, "quick": args.quick,
        "config": {"preset": args.preset, "size": size, "packed_preset": args.packed_preset, "packed_size": psize,
                   "packed_slots": args.packed_slots},
        "gpus": gpu_names() if args.device == "cuda" else [], "phases": {}, "errors": [],
    }
    sampler = UtilSampler(0.1) if args.device == "cuda" else None
    if sampler:
        sampler.start()
    ok = True
    try:
        log(f"building models ({args.preset}, {args.packed_preset}) in {work}")
        models = build_models(work, sorted({args.preset, args.packed_preset}), timeout_s=min(240, deadline.left()))
        res["build_s"] = round(deadline.elapsed(), 1)
        exp_main, n = experiment_for(work, "main", models[args.preset], args.n, size, work / "out-fleet")
        exp_seq, _ = experiment_for(work, "sequential", models[args.preset], args.n, size, work / "out-fleet-seq")
        exp_p1, pn = experiment_for(work, "packed1", models[args.packed_preset], args.packed_n, psize, work / "out-p1")
        exp_p2, _ = experiment_for(work, "packed2", models[args.packed_preset], args.packed_n, psize, work / "out-p2")
        res["config"].update(n=n, packed_n=pn)

        def phase(name: str, fn) -> None:
            nonlocal ok
            try:
                r = fn()
                if sampler and r.get("window"):
                    r["nvml_gpu0"] = sampler.mean_util(0, *r["window"])
                res["phases"][name] = r
            except Exception as e:  # noqa: BLE001 - one phase's fault must not cost the others
                ok = False
                msg = str(e) if isinstance(e, BenchError) else traceback.format_exc()
                log(f"{name}: FAILED: {(msg.splitlines() or [''])[0][:300]}")
                res["errors"].append({"phase": name, "error": msg[-6000:]})
            write_json(out_path, res)

        if "bare" in phases:
            phase("bare", lambda: run_bare(args, work, exp_main, n, deadline))
        if "fleet" in phases:
            deadline.need(30, "fleet")
            phase("fleet", lambda: run_fleet(args, work, "fleet", exp_main, n, deadline, ["--gpus", "0"], fake, 1))
        if "fleet_sequential" in phases:
            deadline.need(30, "fleet_sequential")
            phase("fleet_sequential", lambda: run_fleet(
                args, work, "fleet-seq", exp_seq, n, deadline, ["--gpus", "0"], fake, 1,
                {"FLEET_FINISH_IN_BACKGROUND": "false", "FLEET_TEXT_CACHE_ENTRIES": "0"}))
        if "bare" in phases and "fleet" in phases:
            res["same_files_as_bare"] = same_files(work / "out-bare", work / "out-fleet")
        if "packed" in phases:
            deadline.need(30, "packed, one slot")
            phase("packed_one_slot", lambda: run_fleet(args, work, "packed1", exp_p1, pn, deadline, ["--gpus", "0"], fake, 1))
            deadline.need(30, "packed, several slots")
            phase("packed_slots", lambda: run_fleet(
                args, work, "packed2", exp_p2, pn, deadline,
                ["--gpus", "0", "--slots-per-gpu", str(args.packed_slots), "--max-slots", str(max(4, args.packed_slots))],
                fake, args.packed_slots))
    except BenchError as e:
        ok = False
        log(f"FAILED: {str(e).splitlines()[0][:300]}")
        res["errors"].append({"phase": "setup", "error": str(e)[-6000:]})
    except SystemExit:
        res["errors"].append({"phase": "all", "error": "interrupted (SIGTERM): stopped the fleets and wrote what was done"})
        raise
    finally:
        if sampler:
            sampler.stop()
            res["nvml_error"] = sampler.error
        summarise(res)
        res["total_s"] = round(deadline.elapsed(), 1)
        write_json(out_path, res)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(res)
    log(f"results: {out_path}")
    return 0 if ok else 1


def gpu_names() -> list[dict]:
    from fleet.gpu_inventory import NvmlInventory

    with NvmlInventory() as inv:
        return [{"index": s.index, "name": s.name, "memory_total_mib": s.memory_total_mib} for s in inv.snapshot()]


def same_files(a: Path, b: Path) -> bool | None:
    """Whether the two output trees hold the same mp4s, byte for byte (None: either is empty)."""
    fa, fb = sorted(p.relative_to(a) for p in a.rglob("*.mp4")), sorted(p.relative_to(b) for p in b.rglob("*.mp4"))
    if not fa or not fb:
        return None
    return fa == fb and all((a / x).read_bytes() == (b / x).read_bytes() for x in fa)


def summarise(res: dict) -> None:
    ph = res["phases"]
    bare, fleet, seq = ph.get("bare", {}), ph.get("fleet", {}), ph.get("fleet_sequential", {})
    one, two = ph.get("packed_one_slot", {}), ph.get("packed_slots", {})
    r1 = ratio(fleet.get("throughput_per_s"), bare.get("throughput_per_s"))
    r2 = ratio(two.get("throughput_steady_per_s"), one.get("throughput_steady_per_s"))
    rs = ratio(seq.get("throughput_per_s"), bare.get("throughput_per_s"))
    busy = (fleet.get("nvml_gpu0") or {}).get("busy_fraction")
    res["summary"] = {
        "fleet_vs_bare": r1, "fleet_vs_bare_target": TARGET_FLEET_VS_BARE,
        "fleet_vs_bare_ok": None if r1 is None else r1 >= TARGET_FLEET_VS_BARE,
        "fleet_busy": busy, "fleet_busy_target": TARGET_BUSY, "fleet_busy_ok": None if busy is None else busy >= TARGET_BUSY,
        "bare_busy": (bare.get("nvml_gpu0") or {}).get("busy_fraction"),
        "sequential_vs_bare": rs, "sequential_vs_bare_target": TARGET_SEQUENTIAL_VS_BARE,
        "same_files_as_bare": res.get("same_files_as_bare"),
        "packed_vs_one_slot": r2, "packed_vs_one_slot_simple": ratio(two.get("throughput_per_s"), one.get("throughput_per_s")),
        "packed_target": TARGET_PACKED, "packed_ok": None if r2 is None else r2 >= TARGET_PACKED,
    }


def print_table(res: dict) -> None:
    def f(x: Any, nd: int = 3) -> str:
        if x is None:
            return "-"
        if isinstance(x, list):
            return ",".join(f"{v:.2f}" for v in x) or "-"
        return f"{x:.{nd}f}" if isinstance(x, float) else str(x)

    rows = [("way", "samples", "samples/s", "steady/s", "mean s/sample", "model load s", "GPU0 util %")]
    for name, r in res["phases"].items():
        util = (r.get("nvml_gpu0") or {}).get("mean_util_pct")
        rows.append((name, f(r.get("samples")), f(r.get("throughput_per_s")), f(r.get("throughput_steady_per_s")),
                     f(r.get("mean_sample_s")), f(r.get("model_load_s")), f(util, 1)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    s = res.get("summary", {})
    print_profile(res["phases"])
    print(f"\nfleet / bare (one slot, overlapped): {f(s.get('fleet_vs_bare'), 4)}  (target >= {TARGET_FLEET_VS_BARE}); "
          f"GPU0 busy {f(s.get('fleet_busy'), 3)} (target >= {TARGET_BUSY}; bare {f(s.get('bare_busy'), 3)}); "
          f"same files as bare: {s.get('same_files_as_bare')}")
    print(f"fleet_sequential / bare: {f(s.get('sequential_vs_bare'), 4)}  (target >= {TARGET_SEQUENTIAL_VS_BARE})")
    print(f"packed {res['config']['packed_slots']} slots / one slot (steady): {f(s.get('packed_vs_one_slot'), 4)}  "
          f"(simple {f(s.get('packed_vs_one_slot_simple'), 4)}; target >= {TARGET_PACKED} where the loop leaves the GPU idle)")
    for e in res["errors"]:
        print(f"ERROR in {e['phase']}: {e['error'].splitlines()[0][:300]}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_on_sigterm()
    sys.exit(main())
