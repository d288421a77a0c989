"""The fleet runner's own cost per sample, without Celery: ``SampleRunner.run`` on no-op samples.

A worker's per-sample work is Celery's (pop, hand-over, events, ack; the same for a raw
Celery task) plus the runner's (payload check, confine, admission, the job, the manifest
line, the record). This drives the runner directly, in this process, against a Redis, with
a job that creates the output (bench.noop_kind.touch), and reports per sample: the CPU and
wall time of ``run`` minus the job's own (measured inside the job), and the Redis round trips
(commands, pipelines and scripts sent by the runner's client). CPU time is this process's
(``time.process_time``); Redis's own work is not in it. The loop is short enough to repeat,
and steadier than a whole worker's throughput on a shared machine.

    .venv/bin/python bench/runner_overhead.py [--samples 3000] [--repeat 3] [--redis URL]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.noop_kind import output_of, touch  # noqa: E402
from fleet.settings import load_settings  # noqa: E402


def one_run(url: str, n: int, warmup: int) -> dict[str, float]:
    """``warmup`` samples, then ``n`` measured; µs per sample and round trips per sample."""
    from workers.jobs import JobRegistry
    from workers.jobs.base import JobOutcome
    from workers.runner import SampleRunner

    job_cpu = [0.0]
    job_wall = [0.0]

    def job(task, ctx) -> JobOutcome:  # (TaskPayload, JobContext)
        c, w = time.process_time(), time.perf_counter()
        touch(task.output_path)
        job_cpu[0] += time.process_time() - c
        job_wall[0] += time.perf_counter() - w
        return JobOutcome(output_path=task.output_path)

    class NoopJobs(JobRegistry):
        def job(self, kind: str):
            return job

    tmp = Path(tempfile.mkdtemp(prefix="runner-overhead-"))
    ns = f"bench-runner-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    sent = _count_round_trips(client)
    try:
        s = load_settings(broker_url=url, namespace=ns, output_roots=[tmp], state_dir=tmp / "state")
        runner = SampleRunner(s, client, f"bench@{socket.gethostname()}", (), "cpu", jobs=NoopJobs())
        tasks = [{"schema": "fleet.task/1", "kind": "noop", "sample_id": f"{i:032x}", "experiment": ns,
                  "group": "noop", "label": f"noop {i}", "output_path": str(output_of(tmp / "out", i)),
                  "output_root": str(tmp), "body": {}} for i in range(warmup + n)]
        for d in {os.path.dirname(t["output_path"]) for t in tasks}:
            os.makedirs(d, exist_ok=True)
        for t in tasks[:warmup]:
            runner.run(t, "q")
        job_cpu[0] = job_wall[0] = 0.0
        sent.clear()
        c, w = time.process_time(), time.perf_counter()
        outcomes = Counter(runner.run(t, "q") for t in tasks[warmup:])
        cpu, wall = time.process_time() - c, time.perf_counter() - w
        counted = Counter(sent)  # the clean-up below is not the runner's
        if outcomes != Counter(done=n):
            raise SystemExit(f"not every sample was done: {dict(outcomes)}")
    finally:
        for k in client.scan_iter(f"{ns}*", count=1000):
            client.delete(k)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cpu_us": (cpu - job_cpu[0]) / n * 1e6, "wall_us": (wall - job_wall[0]) / n * 1e6,
            "job_cpu_us": job_cpu[0] / n * 1e6, "round_trips": sum(counted.values()) / n,
            **{f"sent_{k.lower()}": v / n for k, v in counted.items()}}


def _count_round_trips(client: redis.Redis) -> Counter:
    """Count what ``client`` sends from now on: each command by name, each pipeline as one."""
    seen: Counter = Counter()
    command, pipeline = client.execute_command, client.pipeline

    def counted_command(*args, **kwargs):
        seen[str(args[0]).upper()] += 1
        return command(*args, **kwargs)

    def counted_pipeline(*args, **kwargs):
        p = pipeline(*args, **kwargs)
        run = p.execute

        def execute(*a, **k):
            seen["PIPELINE"] += 1
            return run(*a, **k)

        p.execute = execute
        return p

    client.execute_command = counted_command
    client.pipeline = counted_pipeline
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs = []
    for i in range(a.repeat):
        r = one_run(a.redis, a.samples, a.warmup)
        runs.append({k: round(v, 2) for k, v in r.items()})
        print(f"run {i + 1}: runner without its job {r['cpu_us']:.0f} us CPU, {r['wall_us']:.0f} us wall per "
              f"sample; the job {r['job_cpu_us']:.0f} us CPU; {r['round_trips']:.2f} Redis round trips per sample",
              flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(json.dumps({"samples": a.samples, "runs": runs, "median": med}))


if __name__ == "__main__":
    main()
