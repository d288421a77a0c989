"""Fleet overhead: no-op samples through the full fleet against raw Celery, in one run.

Both sides run one worker process on the same Redis with the same Celery configuration
(workers.app.configure: JSON, prefetch 1, late acks, events on, the settings' pool) and the
same work per sample: create one empty file (bench.noop_kind.touch). The fleet side is the
real path: `fleet enqueue` of a ``kind: noop`` experiment, then `fleet worker --cpu` (payload
check, claim and lease, job registry, record, manifest line, ack). The raw side is a bare
Celery task (bench/raw_celery_app.py) fed with ``send_task``. The queue is filled before the
worker starts; throughput is taken from the output files' mtimes between the ``--warmup``-th
and the last sample, so start-up is left out. Over the same stretch (from the poll that first
sees ``--warmup`` outputs to the one that sees them all) it reads the CPU time of the worker
process (all its threads, /proc/<pid>/stat) and of the Redis server (INFO cpu; server-wide, so
other clients of that Redis count too): CPU per sample moves far less than throughput when
other work shares the machine.

    .venv/bin/python bench/noop_overhead.py [--samples 3000] [--repeat 3] [--redis URL] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.noop_kind import output_of  # noqa: E402


def env_for(url: str, namespace: str, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_BROKER_URL=url, FLEET_NAMESPACE=namespace, FLEET_OUTPUT_ROOTS=json.dumps([str(root)]),
               FLEET_KINDS=json.dumps({"noop": {"planner": "bench.noop_kind", "job": "bench.noop_kind"}}),
               FLEET_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def wait_files(root: Path, n: int, timeout_s: float, on_poll: Callable[[int], None] | None = None,
               worker: subprocess.Popen | None = None) -> list[float]:
    """The mtimes (s) of the n outputs, once all exist. ``on_poll(found)`` after each look;
    ``worker``: the process making them (its exit ends the wait, with its log's path)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sum(len(os.listdir(d)) for d in root.iterdir() if d.is_dir()) if root.exists() else 0
        if on_poll is not None:
            on_poll(found)
        if found >= n:
            break
        if worker is not None and worker.poll() is not None:
            raise SystemExit(f"the worker exited with status {worker.returncode} after {found} of {n} outputs: see "
                             f"{root.parent / 'worker.log'}")
        if time.monotonic() > deadline:
            raise SystemExit(f"only {found} of {n} outputs after {timeout_s:.0f} s")
        time.sleep(0.2)
    return sorted(os.stat(output_of(root, i)).st_mtime_ns / 1e9 for i in range(n))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class CpuWindow:
    """CPU seconds of the worker and of Redis between the first poll that sees ``warmup``
    outputs and the last poll (the one that sees them all): ``per_sample()`` in ms."""

    def __init__(self, pid: int, client: redis.Redis, warmup: int) -> None:
        self.pid, self.client, self.warmup = pid, client, warmup
        self.start: tuple[int, float, float] | None = None
        self.end: tuple[int, float, float] | None = None

    def __call__(self, found: int) -> None:
        if found < self.warmup:
            return
        point = (found, process_cpu_s(self.pid), redis_cpu_s(self.client))
        if self.start is None:
            self.start = point
        self.end = point

    def per_sample(self) -> tuple[float, float]:
        """(worker, Redis) CPU ms per sample; NaN when the window is empty."""
        if self.start is None or self.end is None or self.end[0] <= self.start[0]:
            return float("nan"), float("nan")
        n = self.end[0] - self.start[0]
        return ((self.end[1] - self.start[1]) / n * 1e3, (self.end[2] - self.start[2]) / n * 1e3)


def rate(mtimes: list[float], warmup: int) -> float:
    """Samples per second between the warmup-th and the last completion."""
    return (len(mtimes) - 1 - warmup) / (mtimes[-1] - mtimes[warmup])


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@dataclass
class Side:
    """One side's run: samples per second, and CPU ms per sample of its worker and of Redis."""

    per_s: float
    worker_cpu_ms: float
    redis_cpu_ms: float


def fleet_run(url: str, n: int, warmup: int, work: Path) -> Side:
    ns = f"bench-noop-{uuid.uuid4().hex[:8]}"
    root = work / ns
    root.mkdir()
    exp = root / "experiment.json"
    exp.write_text(json.dumps({"kind": "noop", "name": ns, "count": n, "output": "out"}))
    env = env_for(url, ns, root)
    client = redis.Redis.from_url(url)
    try:
        r = subprocess.run([sys.executable, "-m", "fleet", "enqueue", str(exp), "--json"], env=env,
                           capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise SystemExit(f"enqueue failed: {r.stderr}")
        w = subprocess.Popen([sys.executable, "-m", "fleet", "worker", "--cpu"], env=env, cwd=root,
                             stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT)
        cpu = CpuWindow(w.pid, client, warmup)  # `fleet worker` execs the worker: same pid
        try:
            mtimes = wait_files(root / "out", n, 600, cpu, w)
            deadline = time.monotonic() + 60
            while client.scard(f"{ns}:done") < n and time.monotonic() < deadline:
                time.sleep(0.1)  # the last record lands after its file
        finally:
            stop(w)
    finally:
        _drop(url, ns)
    return Side(rate(mtimes, warmup), *cpu.per_sample())


def raw_run(url: str, n: int, warmup: int, work: Path) -> Side:
    ns = f"bench-raw-{uuid.uuid4().hex[:8]}"
    root = work / ns
    root.mkdir()
    env = env_for(url, ns, root)
    os.environ.update({k: v for k, v in env.items() if k.startswith("FLEET_")})
    from bench.raw_celery_app import app

    app.conf.broker_url = url
    queue = f"{ns}.q"
    client = redis.Redis.from_url(url)
    try:
        with app.producer_pool.acquire(block=True) as producer:
            for i in range(n):
                app.send_task("raw.noop", args=[str(output_of(root / "out", i))], queue=queue, producer=producer)
        pool = os.environ.get("FLEET_WORKER_POOL", "threads")
        w = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.raw_celery_app", "worker", "-P", pool,
                              "-c", "1", "-Q", queue, "-n", f"{ns}@%h", "--prefetch-multiplier=1", "-E",
                              "--without-gossip", "--without-mingle", "-l", "WARNING"], env=env, cwd=REPO,
                             stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT)
        cpu = CpuWindow(w.pid, client, warmup)
        try:
            mtimes = wait_files(root / "out", n, 600, cpu, w)
        finally:
            stop(w)
    finally:
        _drop(url, ns)
    return Side(rate(mtimes, warmup), *cpu.per_sample())


def _drop(url: str, ns: str) -> None:
    """The run's keys, queues and kombu bindings (``_kombu.binding.<queue>``)."""
    client = redis.Redis.from_url(url)
    for pattern in (f"{ns}*", f"_kombu.binding.{ns}*"):
        for k in client.scan_iter(pattern, count=1000):
            client.delete(k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="noop-bench-") as tmp:
        for i in range(a.repeat):  # alternate, so drift in the machine's load hits both sides alike
            raw = raw_run(a.redis, a.samples, a.warmup, Path(tmp))
            fl = fleet_run(a.redis, a.samples, a.warmup, Path(tmp))
            runs.append({"raw_per_s": round(raw.per_s, 1), "fleet_per_s": round(fl.per_s, 1),
                         "ratio": round(fl.per_s / raw.per_s, 3),
                         "raw_worker_cpu_ms": round(raw.worker_cpu_ms, 3),
                         "fleet_worker_cpu_ms": round(fl.worker_cpu_ms, 3),
                         "raw_redis_cpu_ms": round(raw.redis_cpu_ms, 3),
                         "fleet_redis_cpu_ms": round(fl.redis_cpu_ms, 3)})
            print(f"run {i + 1}: raw Celery {raw.per_s:.1f}/s, fleet {fl.per_s:.1f}/s, fleet/raw "
                  f"{fl.per_s / raw.per_s:.3f}; worker CPU per sample raw {raw.worker_cpu_ms:.2f} ms, fleet "
                  f"{fl.worker_cpu_ms:.2f} ms; Redis CPU per sample raw {raw.redis_cpu_ms:.2f} ms, fleet "
                  f"{fl.redis_cpu_ms:.2f} ms", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = {"samples": a.samples, "warmup": a.warmup, "runs": runs, "cores": os.cpu_count(),
           "median_ratio": med["ratio"], "median_raw_per_s": med["raw_per_s"],
           "median_fleet_per_s": med["fleet_per_s"],
           "median_cpu_ms": {k: v for k, v in med.items() if k.endswith("_cpu_ms")}}
    print(json.dumps(out))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
