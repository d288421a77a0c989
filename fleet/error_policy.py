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
from fleet.errors import FleetError, GpuOutOfMemory, InputError, Preempted
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
    Attempts stop at ``settings.max_attempts``.
    """
    if isinstance(error, Preempted):
        return Verdict(Action.RETRY, queue, error, False, task.attempt)
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
        if target is None:
            error = GpuOutOfMemory(f"{error}; no larger memory class to move it to")
    if retryable and target is not None and task.attempt < settings.max_attempts:
        return Verdict(action, target, error, unexpected, task.attempt + 1)
    return Verdict(Action.FAIL, None, error, unexpected)
