"""The train kind's job: one training run (workers/tabular_trainer.py) in its run folder.

Job code only: no Celery here. Resumes from the run's checkpoint when there is one (on
any worker: the folder is on the shared file system); on the worker's stop or a cancel it
checkpoints at the next step and raises Preempted, so the run goes back to its queue (or
ends, when cancelled) and the next attempt continues it. ``result.json`` (the sample's
output) is written when the last epoch is done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fleet.contract import TaskPayload
from fleet.errors import GpuOutOfMemory
from fleet.kinds.train.experiment import RunSettings
from workers.atomic_output import write_atomically
from workers.gpu_telemetry import GpuTelemetry
from workers.jobs.base import JobContext, JobOutcome, parse_params, pin_torch_threads
from workers.model_cache import release_cuda_memory
from workers.pipeline_loading import is_out_of_memory


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str
    shards: list[str]
    label: str
    categorical: list[str]
    numeric: list[str]
    run: str
    settings: RunSettings


def params_of(task: TaskPayload) -> TrainParams:
    return parse_params(task, TrainParams, "training")


def run(task: TaskPayload, ctx: JobContext) -> JobOutcome:
    from workers.tabular_trainer import TrainContext, load_table, train

    pin_torch_threads(ctx.threads)
    p = params_of(task)
    run_dir = Path(task.output_path).parent  # <output>/<run>/: the confined output's folder
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data, _, load_s = ctx.models.get("train-data", json.dumps([p.shards, p.label, p.categorical, p.numeric]), "cpu",
                                     lambda: load_table(p.shards, p.label, p.categorical, p.numeric))
    with GpuTelemetry(ctx.gpus) as telemetry:
        tc = TrainContext(device=ctx.device, run_dir=run_dir, sample_id=task.sample_id,
                          stopping=ctx.stopping.is_set, report=lambda progress, m: ctx.report(progress),
                          telemetry=telemetry.window)
        try:
            final: dict[str, Any] = train(data, p.settings.model_dump(), tc)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_cuda_memory(ctx.device)
            raise GpuOutOfMemory(f"run {p.run}: out of GPU memory at batch_size {p.settings.batch_size}") from exc
    result = {"schema": "fleet.train-result/1", "run": p.run, "sample_id": task.sample_id, "final": final,
              "metrics": str(run_dir / "metrics.jsonl"), "checkpoint": str(run_dir / "checkpoint.pt"),
              "settings": p.settings.model_dump(), "attempt": ctx.attempt}
    final_path = Path(task.output_path)
    write_atomically(final_path, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8"))
    metrics = {k: v for k, v in final.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return JobOutcome(output_path=str(final_path), model_loaded=load_s > 0, model_load_s=load_s,
                      metrics={**metrics, "train_s": round(time.monotonic() - started, 3)})
