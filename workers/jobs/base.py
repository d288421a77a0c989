"""What a job gets and gives back: the context of one sample on one worker, and its outcome.

Job code never imports celery. A job module (one per kind, named in fleet.kinds) exposes
``run(task: TaskPayload, context: JobContext) -> JobOutcome`` and raises fleet.errors
types for the faults it recognises (InputError, ModelLoadError, GpuOutOfMemory ...);
anything else is treated as possibly the worker's fault (fleet.error_policy).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from fleet.contract import MetricValue, TaskPayload
from fleet.errors import InputError
from workers.model_cache import ModelCache


@dataclass
class JobOutcome:
    """What a finished sample reports for its completion record.

    ``finish``: the sample's CPU tail (encoding and writing its output), left to the runner
    when the context asked for it (``JobContext.defer_finish``). It runs in the worker's
    finisher thread while the next sample computes (docs/ARCHITECTURE.md, "Overlapped
    finish"), must put ``output_path`` in place atomically, and returns metrics for the
    record; raising fails this sample, whatever runs by then. It queues no GPU work of its
    own; it may wait for work the job queued elsewhere (a video's VAE decode runs on the
    device's decoder beside the next sample: workers/deferred_decode.py).
    """

    output_path: str  # the output, in place (written atomically) once ``finish`` (if any) has run
    metrics: dict[str, MetricValue] = field(default_factory=dict)  # units in the names: "frames", "denoise_s"
    model_loaded: bool = False  # whether this sample paid for loading its model
    model_load_s: float = 0.0  # seconds spent loading it (0.0 when resident)
    finish: Callable[[], dict[str, MetricValue]] | None = None


@dataclass
class JobContext:
    """Everything a job may use besides its task.

    ``gpus``: the worker's GPUs (NVML indices; ``()`` on a CPU worker); ``device``: the
    torch device string ("cuda" sees exactly those GPUs through CUDA_VISIBLE_DEVICES, or
    "cpu"); ``models``: the worker's resident-model cache; ``work_dir``: a folder stable
    across attempts and workers for this sample (checkpoints), created on first use;
    ``stopping``: set when the worker is asked to stop (a long job checkpoints and
    raises fleet.errors.Preempted); ``attempt``: this attempt's number (1 = first);
    ``threads``: CPU threads its torch may use (a job that imports torch pins them with
    ``pin_torch_threads``, so a worker of other kinds never imports torch); ``stop_grace_s``:
    seconds a stopped job's subprocesses get between SIGTERM and SIGKILL; ``defer_finish``:
    the caller (the runner) runs a returned ``JobOutcome.finish`` itself, in the background;
    otherwise ``finish_now`` runs it before the job returns; ``text_cache_entries``: how many
    text embeddings a diffusion job keeps per worker (workers/text_embedding_cache.py; 0: none).
    """

    gpus: tuple[int, ...]
    device: str
    models: ModelCache
    work_dir: Path
    stopping: threading.Event
    attempt: int = 1
    threads: int = 1  # CPU threads a job's torch may use (the settings' torch_threads)
    stop_grace_s: float = 10.0  # how long a stopped job's subprocesses get between SIGTERM and SIGKILL
    on_report: Callable[[float | None, dict[str, MetricValue]], None] | None = None
    defer_finish: bool = False  # the runner's finisher runs JobOutcome.finish (settings finish_in_background)
    text_cache_entries: int = 0  # text embeddings kept per worker (settings text_cache_entries)

    def report(self, progress: float | None = None, **metrics: MetricValue) -> None:
        """Progress (0..1, shown by `fleet gpus` and the heartbeat) and metrics (kept in the record)."""
        if self.on_report is not None:
            self.on_report(progress, metrics)

    def ensure_work_dir(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir


def finish_now(outcome: JobOutcome, ctx: JobContext) -> JobOutcome:
    """``outcome`` as it is when ``ctx.defer_finish`` (the runner finishes it); otherwise its
    ``finish`` run now, so the output is in place when the job returns, metrics merged."""
    if outcome.finish is None or ctx.defer_finish:
        return outcome
    extra = outcome.finish()
    return replace(outcome, metrics={**outcome.metrics, **extra}, finish=None)


P = TypeVar("P", bound=BaseModel)


def parse_params(task: TaskPayload, model: type[P], what: str) -> P:
    """The task's parameters as ``model``; InputError naming the field when the payload lacks
    or garbles one (``what``: "video", "image", ... for the message)."""
    try:
        return model.model_validate(task.params)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"sample {task.sample_id}: invalid {what} parameters: "
                         f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def pin_torch_threads(n: int) -> None:
    """torch.set_num_threads(n), once per process: torch on a small CPU host spreads every
    call over all cores and several workers slow each other 10-50x."""
    global _pinned
    if _pinned != n:
        import torch

        torch.set_num_threads(n)
        _pinned = n


_pinned: int | None = None
