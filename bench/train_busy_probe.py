"""Diagnostic: how busy the tabular trainer's graphed step keeps the GPU, measured four ways.

    python3 bench/train_busy_probe.py [--rows 2000000] [--batch 4096] [--out $OUT/train_busy_probe.json]

Why: the per-epoch NVML readings of bench/train_throughput.py read 32 % for the graphed
step on an H200 while the job's own 1 s telemetry read 100 % for later epochs. An epoch
there lasts 0.1-0.4 s, shorter than the period NVML's utilisation averages over, so a
reading inside an epoch mostly covers the evaluation and checkpoint before it. Here the
trainer's own loop (workers.tabular_trainer: TabularNet, TrainStep, the GPU-held table)
runs for several seconds with nothing else between its steps, and the GPU's busy share
is taken

- ``driver``: from the driver's stamped utilisation samples inside the window
  (``Inventory.utilization_samples``);
- ``polled``: from nvmlDeviceGetUtilizationRates polled at 10 Hz inside the window;
- ``replay_bound``: the step's GPU time (graph replays queued back to back, the host far
  ahead) over the loop's wall time per step: the share an ideal counter would read;
- ``profiler``: kernel time summed by torch.profiler over a profiled stretch, over its wall.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/train_busy_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--seconds", type=float, default=6.0, help="length of the measured loop")
    p.add_argument("--out")
    args = p.parse_args(argv)
    import torch
    from gpu_common import UtilSampler

    from fleet.kinds.train.synthetic_data import CATEGORICAL, LABEL, NUMERIC, write_tabular_data
    from workers.tabular_trainer import Batches, EpochOrder, TabularNet, _GpuBatches, load_table
    from workers.train_step import TrainStep, optimizer_for

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fleet-busy-probe-"))
    write_tabular_data(work / "data", rows=args.rows, parts=4, users=20_000, videos=200_000)
    shards = sorted(str(x) for x in (work / "data").glob("*.csv"))
    data = load_table(shards, LABEL, CATEGORICAL, NUMERIC)
    dev = torch.device("cuda")
    num = (data.num - data.num.mean(0)) / data.num.std(0).clamp_min(1e-6)
    model = TabularNet(data.cardinalities, num.shape[1], 32, [1024, 512, 256]).to(dev)
    settings = {"lr": 0.002, "weight_decay": 0.0}
    opt = optimizer_for(model, settings, dev, True)
    step = TrainStep(model, opt, torch.amp.GradScaler("cuda", enabled=False), torch.bfloat16, dev, args.batch, True)
    table = Batches(data.cat.to(dev), num.to(dev), data.y.to(dev))
    sampler = EpochOrder(torch.arange(len(data.y)), args.batch, 0)
    stopping = threading.Event()

    def loop(seconds: float) -> tuple[int, float]:
        """The trainer's inner loop (workers.tabular_trainer.train) for ``seconds``: steps, wall."""
        steps, t0 = 0, time.monotonic()
        while True:
            sampler.epoch += 1
            for cat, x, y in _GpuBatches(table, sampler, dev):
                cat, x, y = (t.to(dev, non_blocking=True) for t in (cat, x, y))
                step(cat, x, y)
                steps += 1
                if stopping.is_set() or time.monotonic() - t0 >= seconds:
                    torch.cuda.synchronize()
                    return steps, time.monotonic() - t0

    loop(1.0)  # warm-up and capture
    res: dict = {"rows": args.rows, "batch": args.batch, "step_mode": step.mode}
    util = UtilSampler(0.1)
    util.start()
    time.sleep(1.5)  # the sampler's first readings before the window
    t0 = time.time()
    steps, wall = loop(args.seconds)
    t1 = time.time()
    time.sleep(1.5)  # the driver stamps a sample at its period's end
    util.stop()
    res["loop"] = {"steps": steps, "wall_s": round(wall, 3), "step_ms": round(wall / steps * 1e3, 4),
                   "samples_per_s": round(steps * args.batch / wall, 1)}
    res["driver"] = util.driver_util(0, t0, t1)
    res["polled"] = util.mean_util(0, t0 + 1.0, t1)  # a reading's period must lie in the window
    res["driver_samples_tail"] = [(round(t - t0, 3), u) for t, u in util.driver.get(0, []) if t0 - 2 <= t <= t1 + 2]

    # GPU time per step: graph replays queued back to back (the copies into its inputs left out).
    assert step.graph is not None, step.mode
    n = 2000
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        step.graph.replay()
    b.record()
    torch.cuda.synchronize()
    gpu_ms = a.elapsed_time(b) / n
    res["replay_bound"] = {"gpu_step_ms": round(gpu_ms, 4), "busy_pct": round(100 * gpu_ms / (wall / steps * 1e3), 1)}

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ps, pwall = loop(1.0)
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    res["profiler"] = {"steps": ps, "wall_s": round(pwall, 3), "kernel_ms_per_step": round(kernel_us / ps / 1e3, 4),
                       "busy_pct": round(100 * kernel_us / 1e6 / pwall, 1)}
    print(json.dumps(res, indent=1))
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "train_busy_probe.json")
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
