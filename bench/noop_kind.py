"""``kind: noop`` for bench/noop_overhead.py: a sample that does nothing but leave its
(empty) output file, so what a run measures is the fleet's own per-sample cost (claim,
lease, payload check, record, manifest line, ack). Both sides in this one module; register
with ``FLEET_KINDS='{"noop": {"planner": "bench.noop_kind", "job": "bench.noop_kind"}}'``.

An experiment ``{"kind": "noop", "name": ..., "count": N, "output": DIR}`` plans N samples
``<output>/<i // 1000>/<i>.out``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.errors import InputError
from fleet.kinds.base import Columns, Plan, PlanContext, Sample


class NoopExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    kind: str = "noop"
    name: str
    count: int = Field(ge=1)
    output: Path
    path: Path


def output_of(root: Path, i: int) -> Path:
    return root / f"{i // 1000:04d}" / f"{i:07d}.out"


def touch(path: str) -> None:
    """The one thing a sample does (the raw Celery task does the same)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)


class NoopKind:
    name = "noop"

    def load(self, path: Path, data: dict[str, Any], default_output: Path | None) -> NoopExperiment:
        try:
            return NoopExperiment(name=data.get("name", path.stem), count=data.get("count", 0),
                                  output=(path.resolve().parent / str(data.get("output", "out"))).resolve(),
                                  path=path.resolve())
        except ValidationError as e:
            raise InputError(f"{path}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None

    def plan(self, exp: NoopExperiment, groups: list[str] | None, ctx: PlanContext) -> Plan:
        # Column by column, paths as text (== str(output_of(...))): bench/million.py plans a
        # million, where a Path per sample alone took seconds. One empty body for all (read only).
        # An id is the sample's number and a hash of the output root (what decides its path), as a
        # kind of numbered samples may make them: a SHA-256 per sample took 0.7 s of a million's plan,
        # the kind's own cost, which this bench does not mean to measure.
        root, n = str(exp.output).rstrip("/"), exp.count
        tag = hashlib.sha256(b"noop " + root.encode()).hexdigest()[:20]
        outs: list[str] = []
        for k in range(n // 1000 + 1):
            folder = f"{root}/{k:04d}/"
            outs += [f"{folder}{i:07d}.out" for i in range(k * 1000, min(n, k * 1000 + 1000))]
        ids = [f"{i:012x}{tag}" for i in range(n)]

        def make(at: Sequence[int]) -> list[Sample]:  # only the samples the core publishes or shows
            return list(map(Sample, map(ids.__getitem__, at), repeat("noop"), [f"noop {i}" for i in at],
                            map(outs.__getitem__, at), repeat({}), repeat(0), repeat(0)))

        # Columns: a status or a re-run makes no Sample (fleet.kinds.base.Columns).
        return Plan(exp, shared={}, columns=Columns(ids, ["noop"] * n, outs, make))

    def check(self, plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
        return None


KIND = NoopKind()


def run(task, ctx):  # (TaskPayload, JobContext) -> JobOutcome
    from workers.jobs.base import JobOutcome

    touch(task.output_path)
    return JobOutcome(output_path=task.output_path)
