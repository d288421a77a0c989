"""The kind bench/chaos.py runs: ``kind: chaos``, both sides in this one module.

An experiment ``{"kind": "chaos", "name": ..., "count": N, "seed": S, "output": DIR, "log": FILE}``
plans N samples ``<output>/<group>/<name>.bin``. Each sample, on a worker:

1. appends ``start <sid> <pid> <monotonic> <wall> <attempt>`` to the run log (one
   ``os.write`` on an ``O_APPEND`` descriptor, so lines of concurrent processes never mix);
2. sleeps ``sleep_s``, 0.2-2 s, deterministic from the seed and the sample's name
   (``sleep_of``), so a given ``--seed`` gives the same workload in any folder;
3. writes its output atomically: a hidden temporary name in the same folder
   (``.<name>.<pid>.<random>.tmp``), in a few chunks (so a SIGKILL can land mid-write),
   fsync, ``os.replace``, fsync of the folder; the content is ``expected_content`` of the
   sample's id and name, which the checker rebuilds byte for byte;
4. appends ``end <sid> <pid> <monotonic> <wall> <attempt>``.

CLOCK_MONOTONIC is system-wide on Linux, so the bench compares these times with its own
``time.monotonic()`` (kill times). Register with
``FLEET_KINDS='{"chaos": {"planner": "bench.chaos_kind", "job": "bench.chaos_kind"}}'`` and
``PYTHONPATH=<repo root>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.errors import InputError
from fleet.kinds.base import Plan, PlanContext, Sample

GROUPS = 4  # samples spread over this many output folders (status groups)
CONTENT_BYTES = 48 * 1024
CHUNKS = 4
SLEEP_MIN_S, SLEEP_MAX_S = 0.2, 2.0


class ChaosExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    kind: str = "chaos"
    name: str
    count: int = Field(ge=1)
    seed: int = 0
    prefix: str = Field("s", pattern=r"^[A-Za-z0-9_-]+$")
    output: Path
    log: Path
    path: Path


def sleep_of(seed: int, name: str) -> float:
    """0.2-2 s, deterministic from the seed and the sample's name."""
    h = int.from_bytes(hashlib.sha256(f"chaos-sleep {seed} {name}".encode()).digest()[:8], "big")
    return round(SLEEP_MIN_S + (SLEEP_MAX_S - SLEEP_MIN_S) * h / 2**64, 3)


def expected_content(sample_id: str, name: str, size: int = CONTENT_BYTES) -> bytes:
    """What a sample's output holds: a header line, then SHAKE-256 of its id, ``size`` bytes in all."""
    head = f"chaos {sample_id} {name}\n".encode()
    return head + hashlib.shake_256(sample_id.encode()).digest(size - len(head))


def plan_samples(exp: ChaosExperiment) -> list[Sample]:
    samples = []
    for i in range(exp.count):
        name = f"{exp.prefix}{i:05d}"
        group = f"g{i % GROUPS}"
        out = exp.output / group / f"{name}.bin"
        # The id covers everything that decides the output, its path included (Kind.plan).
        sid = hashlib.sha256(json.dumps(["chaos", str(out), name, CONTENT_BYTES]).encode()).hexdigest()[:32]
        samples.append(Sample(sid, group, f"chaos {name}", str(out), {"name": name, "sleep_s": sleep_of(exp.seed, name)},
                              0, 0))
    return samples


class ChaosKind:
    name = "chaos"

    def load(self, path: Path, data: dict[str, Any], default_output: Path | None) -> ChaosExperiment:
        base = path.resolve().parent
        try:
            return ChaosExperiment(
                name=data.get("name", path.stem), count=data.get("count", 0), seed=data.get("seed", 0),
                prefix=data.get("prefix", "s"), output=(base / str(data.get("output", "out"))).resolve(),
                log=(base / str(data.get("log", "runs.log"))).resolve(), path=path.resolve())
        except ValidationError as e:
            raise InputError(f"{path}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None

    def plan(self, exp: ChaosExperiment, groups: list[str] | None, ctx: PlanContext) -> Plan:
        samples = [s for s in plan_samples(exp) if groups is None or s.group in groups]
        return Plan(exp, samples, {"log": str(exp.log), "bytes": CONTENT_BYTES})

    def check(self, plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
        return None


KIND = ChaosKind()


def _log(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run(task, ctx):  # (TaskPayload, JobContext) -> JobOutcome
    from workers.jobs.base import JobOutcome

    p = task.params
    sid, pid = task.sample_id, os.getpid()
    _log(p["log"], f"start {sid} {pid} {time.monotonic():.6f} {time.time():.6f} {task.attempt}\n")
    time.sleep(p["sleep_s"])
    data = expected_content(sid, p["name"], p["bytes"])
    out = Path(task.output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{pid}.{uuid.uuid4().hex[:8]}.tmp")
    step = -(-len(data) // CHUNKS)
    with open(tmp, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            time.sleep(0.01)
        os.fsync(f.fileno())
    os.replace(tmp, out)
    dfd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    _log(p["log"], f"end {sid} {pid} {time.monotonic():.6f} {time.time():.6f} {task.attempt}\n")
    ctx.report(progress=1.0)
    return JobOutcome(output_path=str(out), metrics={"pid": pid, "sleep_s": p["sleep_s"]})
