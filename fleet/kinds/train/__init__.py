"""Kind ``train`` (seed 004): training runs on sharded tabular data, one sample per run of a
grid; checkpoints that survive preemption, per-epoch metrics with GPU telemetry. Producer
side: the experiment and its grid (experiment), CSV tables and shards (tables), planning
(planner), a synthetic data set (synthetic_data). Worker side: workers/jobs/train.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.kinds.base import Plan, PlanContext, Sample


class TrainKind:
    name = "train"

    def load(self, path: Path, data: dict[str, Any], default_output: Path | None):
        from fleet.kinds.train.experiment import load_train_experiment

        return load_train_experiment(path, data, default_output)

    def plan(self, exp: Any, groups: list[str] | None, ctx: PlanContext) -> Plan:
        from fleet.kinds.train.planner import plan_experiment

        return plan_experiment(exp, groups, ctx)

    def check(self, plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
        return None  # the data's headers and columns were checked at load


KIND = TrainKind()
