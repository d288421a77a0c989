"""Fleet overhead: no-op samples through the full fleet against raw Celery, in one run.

Both sides run one worker process on the same Redis with the same Celery configuration
(workers.app.configure: JSON, prefetch 1, late acks, events on, the settings' pool) and the
same work per sample: create one empty file (bench.noop_kind.touch). The fleet side is the
real path: `fleet enqueue` of a ``kind: noop`` experiment, then `fleet worker --cpu` (payload
check, claim and lease, job registry, record, manifest line, ack). The raw side is a bare
Celery task (bench/raw_celery_app.py) fed with ``send_task``. The queue is filled before the
worker starts; throughput is taken from the output files' mtimes between the ``--warmup``-th
and the last sample, so start-up is left out.

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


def wait_files(root: Path, n: int, timeout_s: float) -> list[float]:
    """The mtimes (s) of the n outputs, once all exist."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sum(len(os.listdir(d)) for d in root.iterdir() if d.is_dir()) if root.exists() else 0
        if found >= n:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"only {found} of {n} outputs after {timeout_s:.0f} s")
        time.sleep(0.2)
    return sorted(os.stat(output_of(root, i)).st_mtime_ns / 1e9 for i in range(n))


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


def fleet_run(url: str, n: int, warmup: int, work: Path) -> float:
    ns = f"bench-noop-{uuid.uuid4().hex[:8]}"
    root = work / ns
    root.mkdir()
    exp = root / "experiment.json"
    exp.write_text(json.dumps({"kind": "noop", "name": ns, "count": n, "output": "out"}))
    env = env_for(url, ns, root)
    r = subprocess.run([sys.executable, "-m", "fleet", "enqueue", str(exp), "--json"], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode:
        raise SystemExit(f"enqueue failed: {r.stderr}")
    w = subprocess.Popen([sys.executable, "-m", "fleet", "worker", "--cpu"], env=env, cwd=root,
                         stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT)
    try:
        mtimes = wait_files(root / "out", n, 600)
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60
        while client.scard(f"{ns}:done") < n and time.monotonic() < deadline:  # the last record lands after its file
            time.sleep(0.1)
    finally:
        stop(w)
    _drop(url, ns)
    return rate(mtimes, warmup)


def raw_run(url: str, n: int, warmup: int, work: Path) -> float:
    ns = f"bench-raw-{uuid.uuid4().hex[:8]}"
    root = work / ns
    root.mkdir()
    env = env_for(url, ns, root)
    os.environ.update({k: v for k, v in env.items() if k.startswith("FLEET_")})
    from bench.raw_celery_app import app

    app.conf.broker_url = url
    queue = f"{ns}.q"
    with app.producer_pool.acquire(block=True) as producer:
        for i in range(n):
            app.send_task("raw.noop", args=[str(output_of(root / "out", i))], queue=queue, producer=producer)
    pool = os.environ.get("FLEET_WORKER_POOL", "threads")
    w = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.raw_celery_app", "worker", "-P", pool, "-c", "1",
                          "-Q", queue, "-n", f"{ns}@%h", "--prefetch-multiplier=1", "-E", "--without-gossip",
                          "--without-mingle", "-l", "WARNING"], env=env, cwd=REPO,
                         stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT)
    try:
        mtimes = wait_files(root / "out", n, 600)
    finally:
        stop(w)
    _drop(url, ns)
    return rate(mtimes, warmup)


def _drop(url: str, ns: str) -> None:
    client = redis.Redis.from_url(url)
    for k in client.scan_iter(f"{ns}*", count=1000):
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
            runs.append({"raw_per_s": round(raw, 1), "fleet_per_s": round(fl, 1), "ratio": round(fl / raw, 3)})
            print(f"run {i + 1}: raw Celery {raw:.1f}/s, fleet {fl:.1f}/s, fleet/raw {fl / raw:.3f}", flush=True)
    out = {"samples": a.samples, "warmup": a.warmup, "runs": runs, "cores": os.cpu_count(),
           "median_ratio": statistics.median(r["ratio"] for r in runs),
           "median_raw_per_s": statistics.median(r["raw_per_s"] for r in runs),
           "median_fleet_per_s": statistics.median(r["fleet_per_s"] for r in runs)}
    print(json.dumps(out))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
