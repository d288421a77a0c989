"""Kind ``image`` (seed 002): one text-to-image sample per row of a prompts CSV, Z-Image
through diffsynth on the worker (workers/jobs/image.py). Its producer side: the
experiment section (experiment), the CSV (prompts_csv), the worker-facing parameters
(spec), planning (planner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.kinds.base import Plan, PlanContext, Sample


class ImageKind:
    name = "image"

    def load(self, path: Path, data: dict[str, Any], default_output: Path | None):
        from fleet.kinds.image.experiment import load_image_experiment

        return load_image_experiment(path, data, default_output)

    def plan(self, exp: Any, groups: list[str] | None, ctx: PlanContext) -> Plan:
        from fleet.kinds.image.planner import plan_experiment

        return plan_experiment(exp, groups, ctx)

    def check(self, plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
        from fleet.kinds.model_files import check_model_files

        if todo:
            check_model_files(plan.experiment.path, plan.experiment.model)


KIND = ImageKind()
