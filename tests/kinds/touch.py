"""A kind defined only in the tests: the proof that adding a kind touches no core module.

``kind: touch`` lists items; each becomes one sample that writes ``<output>/<name>.txt``
holding its text. An item's ``sleep_s`` makes its first delivery slow (so a test can
kill the worker mid-sample); a redelivery finds the marker the first one left in the
sample's work folder and does not sleep again.

Both sides live in this one module: ``KIND`` (producer) and ``run`` (job). Register it
with ``FLEET_KINDS='{"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}}'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.errors import InputError
from fleet.kinds.base import Columns, Plan, PlanContext, Sample


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[^/\\]+$")
    text: str = ""
    sleep_s: float = Field(0.0, ge=0)
    ignore_stop: bool = False  # a job that does not honour JobContext.stopping: it sleeps on through a warm shutdown
    fail: str = ""  # the job raises RuntimeError(fail): an error fleet does not classify (a broken worker's)
    group: str = "items"  # what status counts it under (and --group selects)


class TouchExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    kind: str = "touch"
    name: str
    items: list[Item] = Field(min_length=1)
    output: Path
    path: Path
    priority: str = "normal"  # low | normal | high | urgent (fleet.priority)
    columns: bool = False  # plan as columns (fleet.kinds.base.Columns): Sample objects only for what is published


MADE: list[int] = []  # how many samples each columns plan's ``make`` was asked for (this process)


class TouchKind:
    name = "touch"

    def load(self, path: Path, data: dict[str, Any], default_output: Path | None) -> TouchExperiment:
        try:
            out = path.resolve().parent / str(data.get("output", "out"))
            return TouchExperiment(name=data.get("name", path.stem), items=data.get("items", []),
                                   output=out.resolve(), path=path.resolve(), priority=data.get("priority", "normal"),
                                   columns=data.get("columns", False))
        except ValidationError as e:
            raise InputError(f"{path}: {e.errors()[0]['msg']}") from None

    def plan(self, exp: TouchExperiment, groups: list[str] | None, ctx: PlanContext) -> Plan:
        samples = []
        for it in exp.items:
            if groups and it.group not in groups:
                continue
            sid = hashlib.sha256(json.dumps(["touch", str(exp.output), it.name, it.text]).encode()).hexdigest()[:32]
            samples.append(Sample(sid, it.group, f"touch {it.name}", str(exp.output / f"{it.name}.txt"),
                                  {"text": it.text, "sleep_s": it.sleep_s, "ignore_stop": it.ignore_stop, "fail": it.fail}, 0, 0))
        if not exp.columns:
            return Plan(exp, samples, {"greeting": "hello"})

        def make(at: Sequence[int]) -> list[Sample]:
            MADE.append(len(at))
            return [samples[i] for i in at]

        cols = Columns([s.sample_id for s in samples], [s.group for s in samples], [s.output_path for s in samples], make)
        return Plan(exp, shared={"greeting": "hello"}, columns=cols)

    def check(self, plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
        return None


KIND = TouchKind()


def run(task, ctx):  # (TaskPayload, JobContext) -> JobOutcome
    from workers.jobs.base import JobOutcome

    p = task.params
    marker = ctx.ensure_work_dir() / "started"
    if p["sleep_s"] and not marker.exists():
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + p["sleep_s"]
        while time.monotonic() < deadline and (p.get("ignore_stop") or not ctx.stopping.is_set()):
            time.sleep(0.05)
    if p.get("fail"):
        raise RuntimeError(p["fail"])
    ctx.report(progress=1.0, wrote_bytes=len(p["text"]))
    out = Path(task.output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(f"{p['greeting']} {p['text']}")
    os.replace(tmp, out)
    return JobOutcome(output_path=str(out), metrics={"pid": os.getpid()})
