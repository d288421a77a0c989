"""Kind ``video`` (seed 001): categories x reference videos x prompts x seeds, Wan through
diffsynth on the worker (workers/jobs/video.py). Its producer side: the experiment
section (experiment), the dataset folder (dataset), the prompts file (prompts), reference
video identity and probing (video_file), planning (planner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.kinds.base import Plan, PlanContext, Sample


class VideoKind:
    name = "video"

    def load(self, path: Path, data: dict[str, Any], default_output: Path | None):
        from fleet.kinds.video.experiment import load_video_experiment

        return load_video_experiment(path, data, default_output)

    def plan(self, exp: Any, groups: list[str] | None, ctx: PlanContext) -> Plan:
        from fleet.kinds.video.planner import plan_experiment

        return plan_experiment(exp, groups, ctx)

    def check(self, plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
        from fleet.kinds.model_files import check_model_files
        from fleet.kinds.video.planner import check_videos

        if todo:
            check_model_files(plan.experiment.path, plan.experiment.model)
        check_videos(plan, todo, ctx)


KIND = VideoKind()
