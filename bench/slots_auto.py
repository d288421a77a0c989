"""Benchmark: `fleet up --slots auto` against hand-picked slot counts on one GPU (issue 13).

    python3 bench/slots_auto.py [--out $OUT/slots_auto.json]         # on a GPU host (about 5 minutes)
    python3 bench/slots_auto.py --device cpu --quick                 # anywhere, to debug

The tiny model at the size of bench/gpu_throughput.py's packed phase (256x256, 33 frames,
20 steps, cfg 5.0). Each setting is a fresh fleet (``fleet up --gpus 0`` in a private state
folder, embedded Redis, free ports) over the same samples (one experiment's plan, only
the output folder differs), auto first:

- ``fixed_K`` for each K of ``--slots`` (default 1,2,3,4): ``--slots-per-gpu K``;
- ``auto``: ``--slots auto --max-slots M``: one worker measures its samples' peak GPU
  memory over its first two samples, then the supervisor starts as many as fit with the
  10 % margin, capped at M. Its slot count and reason are read from ``fleet gpus --json``.

Every fleet runs with ``FLEET_PLACEMENT_INTERVAL_S=1`` and ``FLEET_HEARTBEAT_S=1`` (auto's
growth waits for a heartbeat and a placement cycle; the fixed settings are unaffected).
Throughput is "steady", as in gpu_throughput.py: the samples that end after every worker
has finished its first sample (model loaded), over that window; the plain (N - 1) /
(last end - first end), which for auto includes its measuring phase, is reported too.
Target: auto's steady throughput within 10 % of the best fixed count's (auto / best >= 0.9).

On CPU (``--device cpu``) the workers run on a fake one-GPU inventory, which has no
process of its own: the script lists each worker's pid there holding ``--cpu-peak-mib``
(default 40 % of the fake GPU: 2 slots fit), which is what a worker measures there.
``--quick``: 64x64x5, 2 steps, 12 samples, slots 1,2.

Prints a table; writes every figure as JSON to --out (default $OUT/slots_auto.json).
Exit status 0 when every setting ran (the target is reported, not enforced), 1 otherwise.
"""

from __future__ import annotations

import argparse
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
    build_models,
    exit_on_sigterm,
    fake_gpu_file,
    log,
    out_dir,
    record_stats,
    write_json,
)
from gpu_throughput import experiment_for, gpu_names, ratio  # noqa: E402

TARGET = 0.9  # auto / best fixed, steady throughput
FAKE_TOTAL_MIB = 81559
FAST_CYCLES = {"FLEET_PLACEMENT_INTERVAL_S": "1", "FLEET_HEARTBEAT_S": "1"}


class FakeProcesses(threading.Thread):
    """CPU runs: lists each live worker of the fleet on the fake GPU with ``mib`` of memory, as
    NVML would list a CUDA worker; what auto's workers then measure (workers/peak_memory.py)."""

    def __init__(self, fleet: BenchFleet, path: Path, mib: int) -> None:
        super().__init__(name="fake-processes", daemon=True)
        self.fleet, self.path, self.mib = fleet, path, mib
        self.stop_event = threading.Event()

    def run(self) -> None:
        listed: list[int] = []
        while not self.stop_event.wait(0.2):
            pids = sorted(self.fleet.worker_pids().values())
            if pids == listed:
                continue
            listed = pids
            gpu = json.loads(self.path.read_text())[0]
            procs = [{"pid": p, "used_mib": self.mib, "name": "python3"} for p in pids][: FAKE_TOTAL_MIB // self.mib]
            used = sum(p["used_mib"] for p in procs)
            gpu.update(memory_used_mib=used, memory_free_mib=FAKE_TOTAL_MIB - used, processes=procs)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps([gpu]))
            os.replace(tmp, self.path)  # the supervisor never reads half a file

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


def run_setting(args, work: Path, name: str, exp: Path, n: int, up_args: list[str], deadline: Deadline,
                fake: Path | None) -> dict[str, Any]:
    """One fresh fleet over the experiment; its throughput, and for auto its slot decision."""
    if fake is not None:
        fake_gpu_file(fake, 1, FAKE_TOTAL_MIB)  # no worker listed yet
    fl = BenchFleet(work / name, fake_gpus=fake, extra_env=dict(FAST_CYCLES))
    feeder = FakeProcesses(fl, fake, args.cpu_peak_mib) if fake is not None and name == "auto" else None
    log(f"{name}: fleet up {' '.join(up_args)}; {n} samples")
    t0 = time.time()
    try:
        fl.up(*up_args, timeout_s=min(120, deadline.left()))
        if feeder:
            feeder.start()
        enq = fl.enqueue(exp)
        if enq["enqueued"] != n:
            raise BenchError(f"{name}: enqueued {enq['enqueued']} of {n}")
        recs, _ = fl.wait_done(n, deadline_s=max(5, deadline.left() - 40))
        stats = record_stats(recs)
        out: dict[str, Any] = {
            "samples": len(recs), "up_args": up_args,
            "throughput_steady_per_s": stats["throughput_steady"]["per_s"] if stats["throughput_steady"] else None,
            "steady_window_s": stats["throughput_steady"]["window_s"] if stats["throughput_steady"] else None,
            "throughput_simple_per_s": stats["throughput_simple_per_s"],
            "mean_sample_s": stats["mean_sample_s"], "model_load_s": stats["model_load_s"],
            "workers": {k: {kk: v[kk] for kk in ("samples", "mean_sample_s", "busy_fraction")}
                        for k, v in stats["workers"].items()},
        }
        if name == "auto":
            out.update(auto_decision(fl, min(30.0, max(1.0, deadline.left() - 30))))
        out["process_s"] = round(time.time() - t0, 2)
        return out
    finally:
        if feeder:
            feeder.stop()
        fl.down()


def auto_decision(fl: BenchFleet, wait_s: float) -> dict[str, Any]:
    """The supervisor's slots for GPU 0 and why (`fleet gpus --json`), once it is past measuring,
    and the peaks the workers advertise."""
    end = time.monotonic() + wait_s
    while True:
        shown = fl.gpus_json()
        gpu0 = shown["gpus"][0]
        placement = gpu0.get("placement") or {}
        if "measuring" not in str(placement.get("why")) or time.monotonic() > end:
            break
        time.sleep(0.5)
    return {"auto_slots": placement.get("slots"), "auto_reason": placement.get("text"),
            "peaks_mib": {w["name"]: w.get("peak_mib") for w in gpu0["fleet_workers"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/slots_auto.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="64x64x5, 2 steps, 12 samples, slots 1,2 (debugging)")
    p.add_argument("--slots", default="1,2,3,4", help="fixed slot counts to compare auto with")
    p.add_argument("--max-slots", type=int, default=4, help="auto's cap (--max-slots)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--n", type=int, default=64, help="samples per setting (rounded up to a multiple of 4)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--cpu-peak-mib", type=int, default=int(FAKE_TOTAL_MIB * 0.4),
                   help="CPU runs: the memory the fake inventory lists per worker process")
    p.add_argument("--budget-s", type=float, default=540, help="wall-clock budget of the whole run")
    p.add_argument("--out", help="JSON result file (default $OUT/slots_auto.json)")
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.width, args.height, args.frames, args.steps, args.cfg = min(args.n, 12), 64, 64, 5, 2, 1.0
        args.slots = "1,2" if args.slots == p.get_default("slots") else args.slots
    fixed = [int(x) for x in args.slots.split(",") if x]
    out_path = out_dir(args.out, "slots_auto.json")
    deadline = Deadline(args.budget_s)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fleet-slots-auto-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    fake = work / "fake-gpus.json" if args.device == "cpu" else None
    size = dict(width=args.width, height=args.height, frames=args.frames, steps=args.steps, cfg_scale=args.cfg,
                mode="t2v", fps=15)
    res: dict[str, Any] = {
        "benchmark": "slots_auto", "host": socket.gethostname(), "device": args.device, "quick": args.quick,
        "config": {"preset": args.preset, "size": size, "fixed_slots": fixed, "max_slots": args.max_slots,
                   "env": FAST_CYCLES, **({"cpu_peak_mib": args.cpu_peak_mib} if fake else {})},
        "gpus": gpu_names() if args.device == "cuda" else [], "settings": {}, "errors": [],
    }
    ok = True
    try:
        log(f"building the {args.preset} model in {work}")
        model = build_models(work, [args.preset], timeout_s=min(240, deadline.left()))[args.preset]
        # auto first: if the budget runs short, a fixed count is what is lost
        plan = [("auto", ["--gpus", "0", "--slots", "auto", "--max-slots", str(args.max_slots)])]
        plan += [(f"fixed_{k}", ["--gpus", "0", "--slots-per-gpu", str(k), "--max-slots", str(max(k, args.max_slots))])
                 for k in fixed]
        for name, up_args in plan:
            exp, n = experiment_for(work, name, model, args.n, size, work / f"out-{name}")
            res["config"]["n"] = n
            try:
                deadline.need(30, name)
                res["settings"][name] = run_setting(args, work, name, exp, n, up_args, deadline, fake)
            except Exception as e:  # noqa: BLE001 - one setting's fault must not cost the others
                ok = False
                msg = str(e) if isinstance(e, BenchError) else traceback.format_exc()
                log(f"{name}: FAILED: {(msg.splitlines() or [''])[0][:300]}")
                res["errors"].append({"setting": name, "error": msg[-6000:]})
            write_json(out_path, res)
    except BenchError as e:
        ok = False
        log(f"FAILED: {str(e).splitlines()[0][:300]}")
        res["errors"].append({"setting": "setup", "error": str(e)[-6000:]})
    except SystemExit:
        res["errors"].append({"setting": "all", "error": "interrupted (SIGTERM): stopped the fleets, wrote what was done"})
        raise
    finally:
        summarise(res)
        res["total_s"] = round(deadline.elapsed(), 1)
        write_json(out_path, res)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(res)
    log(f"results: {out_path}")
    return 0 if ok else 1


def summarise(res: dict) -> None:
    st = res["settings"]
    fixed = {k: v for k, v in st.items() if k.startswith("fixed_") and v.get("throughput_steady_per_s")}
    best = max(fixed, key=lambda k: fixed[k]["throughput_steady_per_s"]) if fixed else None
    auto = st.get("auto", {})
    r = ratio(auto.get("throughput_steady_per_s"), fixed[best]["throughput_steady_per_s"]) if best else None
    best_simple = max((v.get("throughput_simple_per_s") or 0 for v in fixed.values()), default=0) or None
    res["summary"] = {
        "best_fixed": best, "best_fixed_slots": int(best.split("_")[1]) if best else None,
        "best_fixed_steady_per_s": fixed[best]["throughput_steady_per_s"] if best else None,
        "auto_slots": auto.get("auto_slots"), "auto_reason": auto.get("auto_reason"),
        "auto_steady_per_s": auto.get("throughput_steady_per_s"),
        "auto_vs_best": r, "auto_vs_best_simple": ratio(auto.get("throughput_simple_per_s"), best_simple),
        "target": TARGET, "ok": None if r is None else r >= TARGET,
    }


def print_table(res: dict) -> None:
    def f(x: Any, nd: int = 3) -> str:
        return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)

    rows = [("setting", "samples", "workers", "steady/s", "window s", "simple/s", "mean s/sample")]
    for name, r in res["settings"].items():
        rows.append((name, f(r.get("samples")), f(len(r.get("workers", {}))), f(r.get("throughput_steady_per_s")),
                     f(r.get("steady_window_s"), 1), f(r.get("throughput_simple_per_s")), f(r.get("mean_sample_s"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    s = res.get("summary", {})
    print(f"\nauto: {s.get('auto_reason')}")
    print(f"auto / best fixed ({s.get('best_fixed')}), steady: {f(s.get('auto_vs_best'), 4)} (target >= {TARGET}); "
          f"simple: {f(s.get('auto_vs_best_simple'), 4)}")
    for e in res["errors"]:
        print(f"ERROR in {e['setting']}: {e['error'].splitlines()[0][:300]}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_on_sigterm()
    sys.exit(main())
