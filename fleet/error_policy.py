"""What happens to a sample whose job raised: retry, move to a larger memory class, or
fail; and whether the error says the worker itself may be broken.

A pure function of the error, the task and the settings (no Redis, no clock), so every
rule is unit-tested on its own; the runner only carries the verdict out.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum

from fleet.contract import TaskPayload
from fleet.errors import FleetError, GpuOutOfMemory, InputError, Preempted, WaitForResources
from fleet.routing import queue_after_oom
from fleet.settings import FleetSettings

# File-system refusals about the sample's own output (a folder it may not write, a name too
# long, a file where a folder should be): the sample's fault, the same on any worker.
SAMPLE_FAULT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                                 errno.ENAMETOOLONG, errno.EEXIST})


class Action(str, Enum):
    RETRY = "retry"  # publish the next attempt on the same queue
    MOVE = "move"  # publish the next attempt on a larger memory class's queue
    FAIL = "fail"  # record the failure for good


@dataclass(frozen=True)
class Verdict:
    action: Action
    queue: str | None  # where the next attempt goes (None when failing)
    error: BaseException  # what the failure record says (an OOM with nowhere to go says so)
    worker_suspect: bool  # an error fleet did not classify: counts toward "this worker is broken"
    next_attempt: int = 0  # the attempt number the next delivery carries (0 when failing)
    delay_s: float = 0.0  # how long the next attempt waits before it is queued again (back-off)


def backoff_s(attempt: int, settings: FleetSettings) -> float:
    """The wait before attempt ``attempt + 1``: retry_backoff_s doubling per attempt, capped."""
    if settings.retry_backoff_s <= 0:
        return 0.0
    return min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2 ** max(0, min(attempt - 1, 30)))


def attempts_allowed(task: TaskPayload, settings: FleetSettings) -> float:
    """How many attempts the task may have: its own ``retries`` + 1 (-1: no limit), else max_attempts."""
    if task.retries is None:
        return settings.max_attempts
    return float("inf") if task.retries < 0 else task.retries + 1


def decide(error: BaseException, task: TaskPayload, queue: str, settings: FleetSettings) -> Verdict:
    """The verdict for ``task`` (delivered from ``queue``) whose job raised ``error``.

    - An error fleet did not classify (a CUDA fault, a full disk, a library bug) may be the
      worker's, not the sample's: another attempt, and it counts toward the worker's
      broken limit.
    - Out of GPU memory: the next larger memory class; with none, fail now (the same GPU
      would run out again), saying so.
    - Other retryable errors: another attempt on the same queue.
    - Permanent errors (bad input, a model that does not load, an output the file system
      refuses: SAMPLE_FAULT_ERRNOS): fail now; the worker is not to blame.
    - Preempted (the worker is stopping): back to the same queue as the same attempt.
    - WaitForResources (what it declared is not free): the same attempt, after a back-off.
    Attempts stop at the task's ``retries`` + 1 (-1: never), else ``settings.max_attempts``.
    A retry on the same queue waits ``backoff_s`` first; a move to a larger class does not.
    """
    if isinstance(error, Preempted):
        return Verdict(Action.RETRY, queue, error, False, task.attempt)
    if isinstance(error, WaitForResources):
        return Verdict(Action.RETRY, queue, error, False, task.attempt, max(1.0, backoff_s(1, settings)))
    if isinstance(error, OSError) and error.errno in SAMPLE_FAULT_ERRNOS:
        fault = InputError(f"cannot write the output of sample {task.sample_id}: {error.strerror or error}"
                           + (f": {error.filename}" if error.filename else ""))
        return Verdict(Action.FAIL, None, fault, False)
    unexpected = not isinstance(error, FleetError)
    retryable = unexpected or error.retryable
    target: str | None = queue
    action = Action.RETRY
    if isinstance(error, GpuOutOfMemory):
        target = queue_after_oom(queue, task.memory_mib, settings.namespace, settings.memory_classes_mib)
        action = Action.MOVE
        if target is None and error.wait:
            target, action = queue, Action.RETRY  # wait for the memory where it is
        elif target is None:
            error = GpuOutOfMemory(f"{error}; no larger memory class to move it to")
    if retryable and target is not None and task.attempt < attempts_allowed(task, settings):
        delay = backoff_s(task.attempt, settings) if action is Action.RETRY else 0.0
        return Verdict(action, target, error, unexpected, task.attempt + 1, delay)
    return Verdict(Action.FAIL, None, error, unexpected)
