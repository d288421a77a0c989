"""Where a no-op sample's time goes in a worker: cProfile of one solo worker, fleet or raw Celery.

``--side fleet`` (the default) enqueues ``--samples`` no-op samples (bench/noop_kind.py) and
runs ``python -m workers.main`` under cProfile with the solo pool (so the task runs in the
profiled main thread); ``--side raw`` sends as many tasks to bench/raw_celery_app.py and runs
its ``celery worker`` the same way (bench/noop_overhead.py's two sides). Once every output
is there (and every fleet record written) the worker is stopped, and the script prints per
sample the calls and cumulative time of each step: Celery's (pop, hand-over, trace, ack,
events) and the fleet runner's (payload check, confine, admit, job, manifest, record). The
time is wall time (``--timer wall``: waits on Redis included) or the process's CPU time
(``--timer cpu``: what the step itself costs, steadier on a busy machine); either is
inflated by the profiler, but comparable between steps, sides and runs. Also the Redis
commands per sample (server-wide counts: other clients of that Redis add to them).

    .venv/bin/python bench/noop_profile.py [--side fleet|raw] [--timer wall|cpu] [--samples 2000]
        [--calls] [--redis URL] [--top N] [--out FILE.prof]
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
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
from bench.noop_overhead import _drop, env_for, stop, wait_files  # noqa: E402

# (label, file suffix, function name): Celery's steps around a task, then SampleRunner.run's.
STEPS = [
    ("kombu: pop and hand over (_brpop_read)", "kombu/transport/redis.py", "_brpop_read"),
    ("  fleet's gate on the message (why_not_a_task)", "workers/transport.py", "why_not_a_task"),
    ("  celery: message to task (task_message_handler)", "celery/worker/strategy.py", "task_message_handler"),
    ("    celery: trace_task", "celery/app/trace.py", "trace_task"),
    ("    kombu: note the delivery (QoS.append)", "kombu/transport/redis.py", "append"),
    ("    kombu: ack", "kombu/transport/redis.py", "ack"),
    ("    celery: events sent", "celery/events/dispatcher.py", "send"),
    ("raw task (touch)", "bench/raw_celery_app.py", "noop"),
    ("fleet task (run_sample, all of it)", "workers/tasks.py", "run_sample"),
    ("SampleRunner.run", "workers/runner.py", "run"),
    ("  payload check (TaskPayload)", "pydantic/main.py", "model_validate"),
    ("  confine", "workers/confinement.py", "confine"),
    ("  payload check (TaskPayload, from a reference's JSON)", "pydantic/main.py", "model_validate_json"),
    ("  admit (done check + gate + claim)", "fleet/admission.py", "admit"),
    ("  admit a reference (expand, check, claim)", "fleet/admission.py", "admit_reference"),
    ("  is_done (before fleet/admission.py)", "fleet/records.py", "is_done"),
    ("  gate (before fleet/admission.py)", "fleet/control.py", "gate"),
    ("  claim (before fleet/admission.py)", "fleet/records.py", "claim"),
    ("  job (touch)", "bench/noop_kind.py", "run"),
    ("  manifest append", "workers/manifest.py", "append"),
    ("  records.complete", "fleet/records.py", "complete"),
    ("  _persist", "workers/runner.py", "_persist"),
    ("redis commands (execute_command)", "redis/client.py", "execute_command"),
    ("redis pipelines (execute)", "redis/client.py", "execute"),
    ("redis scripts (Script.__call__)", "redis/commands/core.py", "__call__"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", choices=["fleet", "raw"], default="fleet")
    ap.add_argument("--timer", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--top", type=int, default=0, help="also print the N functions of most own time")
    ap.add_argument("--out", type=Path, help="keep the profile here")
    ap.add_argument("--calls", action="store_true",
                    help="also profile a run of a third as many samples: Python function calls per sample are the "
                         "difference of the two runs' counts (start-up cancels out; a count, so no machine noise)")
    a = ap.parse_args()
    n = a.samples
    with tempfile.TemporaryDirectory(prefix="noop-prof-") as kept:
        prof = a.out or Path(kept) / "worker.prof"
        calls = _one(a, n, prof)
        report(pstats.Stats(str(prof)), n, calls, a.top)
        if a.calls:
            small = Path(kept) / "small.prof"
            _one(a, n // 3, small)
            big_st, small_st = pstats.Stats(str(prof)), pstats.Stats(str(small))
            per = (big_st.total_calls - small_st.total_calls) / (n - n // 3)  # type: ignore[attr-defined]
            print(f"python function calls per sample: {per:.0f}")


def _one(a: argparse.Namespace, n: int, prof: Path) -> dict[str, int]:
    """One profiled run of ``n`` samples on ``a.side``, its profile in ``prof``; Redis calls by command."""
    with tempfile.TemporaryDirectory(prefix="noop-prof-") as tmp:
        ns = f"bench-prof{a.side}-{uuid.uuid4().hex[:8]}"
        root = Path(tmp) / ns
        root.mkdir()
        exp = root / "experiment.json"
        exp.write_text(json.dumps({"kind": "noop", "name": ns, "count": n, "output": "out"}))
        env = env_for(a.redis, ns, root)
        env["FLEET_WORKER_POOL"] = "solo"
        try:
            return (_profiled_run if a.side == "fleet" else _profiled_raw)(a, n, ns, root, exp, env, prof)
        finally:
            _drop(a.redis, ns)


def _profiled_run(a: argparse.Namespace, n: int, ns: str, root: Path, exp: Path,
                  env: dict[str, str], prof: Path) -> dict[str, int]:
    """Enqueue, run the profiled worker until every record is written; Redis calls by command."""
    r = subprocess.run([sys.executable, "-m", "fleet", "enqueue", str(exp), "--json"], env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise SystemExit(f"enqueue failed: {r.stderr}")
    queues = subprocess.run(
        [sys.executable, "-c", "from fleet.settings import load_settings; from fleet.worker_launch import "
         "worker_command; print(worker_command(load_settings(), ())[0][-1])"],
        env=env, capture_output=True, text=True, check=True).stdout.strip()
    client = redis.Redis.from_url(a.redis)
    calls0 = _commands(client)
    w = subprocess.Popen(_profiled(a.timer, prof, "workers.main", "--name", "prof", "--gpus", "", "--device", "cpu",
                                   "--queues", queues), env=env, cwd=root,
                         stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_files(root / "out", n, 600, worker=w)
        deadline = time.monotonic() + 60
        while client.scard(f"{ns}:done") < n and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(w)
    calls = {k: v - calls0.get(k, 0) for k, v in _commands(client).items() if v > calls0.get(k, 0)}
    return calls


def _profiled_raw(a: argparse.Namespace, n: int, ns: str, root: Path, exp: Path,
                  env: dict[str, str], prof: Path) -> dict[str, int]:
    """bench/noop_overhead.py's raw side under the profiler; Redis calls by command."""
    os.environ.update({k: v for k, v in env.items() if k.startswith("FLEET_")})
    from bench.raw_celery_app import app

    app.conf.broker_url = a.redis
    queue = f"{ns}.q"
    with app.producer_pool.acquire(block=True) as producer:
        for i in range(n):
            app.send_task("raw.noop", args=[str(output_of(root / "out", i))], queue=queue, producer=producer)
    client = redis.Redis.from_url(a.redis)
    calls0 = _commands(client)
    w = subprocess.Popen(_profiled(a.timer, prof, "celery", "-A", "bench.raw_celery_app", "worker", "-P", "solo",
                                   "-c", "1", "-Q", queue, "-n", f"{ns}@%h", "--prefetch-multiplier=1", "-E",
                                   "--without-gossip", "--without-mingle", "-l", "WARNING"), env=env, cwd=REPO,
                         stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_files(root / "out", n, 600, worker=w)
    finally:
        stop(w)
    calls = {k: v - calls0.get(k, 0) for k, v in _commands(client).items() if v > calls0.get(k, 0)}
    return calls


# Runs a module under cProfile with the chosen clock: argv = timer, profile file, module, its args.
_PROFILED = """import cProfile, runpy, sys, time
timer, out, mod = sys.argv[1:4]
sys.argv = [mod] + sys.argv[4:]
p = cProfile.Profile(time.process_time if timer == "cpu" else time.perf_counter)
p.enable()
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    p.disable()
    p.dump_stats(out)
"""


def _profiled(timer: str, prof: Path, module: str, *args: str) -> list[str]:
    """argv of ``python -m module args`` under cProfile with ``timer``'s clock, dumping to ``prof``."""
    return [sys.executable, "-c", _PROFILED, timer, str(prof), module, *args]


def _commands(client: redis.Redis) -> dict[str, int]:
    """Redis's own count of calls per command (the whole server: other clients' too)."""
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}


def report(st: pstats.Stats, n: int, calls: dict[str, int], top: int) -> None:
    """Per sample: calls and cumulative wall time of each step, and Redis commands."""
    rows = []
    table = st.stats  # type: ignore[attr-defined]  # (file, line, function) -> (cc, ncalls, tottime, cumtime, callers)
    for label, suffix, name in STEPS:
        hits = [(k, v) for k, v in table.items() if k[0].endswith(suffix) and k[2] == name]
        ncalls = sum(v[1] for _, v in hits)
        cum = sum(v[3] for _, v in hits)
        rows.append({"step": label, "calls_per_sample": round(ncalls / n, 2), "us_per_sample": round(cum / n * 1e6)})
        print(f"{label:42s} {ncalls / n:6.2f} calls {cum / n * 1e6:8.0f} us/sample")
    print("redis commands per sample (server-wide counts, so other clients of this Redis add to them):")
    for cmd, c in sorted(calls.items(), key=lambda kv: -kv[1]):
        if c / n >= 0.05:
            print(f"  {cmd:20s} {c / n:6.2f}")
    if top:
        st.sort_stats("tottime").print_stats(top)
    print(json.dumps({"samples": n, "steps": rows, "redis_per_sample": {k: round(v / n, 2) for k, v in calls.items()
                                                                       if v / n >= 0.05}}))


if __name__ == "__main__":
    main()
