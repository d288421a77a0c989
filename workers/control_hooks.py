"""The worker's side of ``fleet cancel`` / ``pause`` and of experiment priority (fleet.control):
small hooks the runner and the heartbeat call. Plain code, no celery.

- ``gated``: a sample the admission script stopped before its claim: skip a cancelled one,
  park one of a paused experiment.
- ``sample_stop``: the stop event a job sees (``JobContext.stopping``): set when the worker
  stops or when the sample is cancelled while it runs (``watch_cancel``, every heartbeat).
- ``end_if_cancelled``: a cancelled sample's error ends its run; it is never retried.
- ``republish_list``: the list (and priority step) a retry or an orphan goes back to.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import redis

from fleet import control
from fleet.contract import TaskPayload
from fleet.priority import NORMAL_STEP, priority_list

if TYPE_CHECKING:
    from workers.runner import SampleRunner

log = logging.getLogger("fleet.worker")


class SampleStop(threading.Event):
    """One sample's stop event: set by its cancellation, and set whenever the worker's own
    ``stopping`` event is (a job polls ``is_set()`` or waits on it, as on any Event)."""

    def __init__(self, worker_stopping: threading.Event) -> None:
        super().__init__()
        self.worker_stopping = worker_stopping

    def is_set(self) -> bool:
        return super().is_set() or self.worker_stopping.is_set()

    isSet = is_set  # noqa: N815 (threading.Event's old name)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                return self.is_set()
            super().wait(left)
        return True


def gated(runner: SampleRunner, task: TaskPayload, queue: str, state: str) -> str:
    """Act on the admission script's gate (fleet/admission.py applies fleet.control's rules):
    ``cancelled`` is skipped, ``paused`` parked; returns ``"skipped-cancelled"`` or ``"parked"``."""
    if state == "cancelled":
        log.info("sample %s was cancelled; skipping it", task.sample_id)
        return "skipped-cancelled"
    control.park(runner.client, runner.keys, task, queue)
    log.info("sample %s: experiment %r is paused; parked it", task.sample_id, task.experiment)
    return "parked"


def sample_stop(runner: SampleRunner, sample_id: str) -> SampleStop:
    """A fresh stop event for the sample about to run, remembered for ``watch_cancel``."""
    ev = SampleStop(runner.stopping)
    runner.sample_stop = (sample_id, ev)  # type: ignore[attr-defined]
    return ev


def watch_cancel(runner: SampleRunner, sample_id: str) -> bool:
    """Called every heartbeat while ``sample_id`` runs: when it has been cancelled, set its
    stop event (a job that honours JobContext.stopping stops early). True when cancelled."""
    if not control.was_cancelled(runner.client, runner.keys, sample_id):
        return False
    held = getattr(runner, "sample_stop", None)
    if held is not None and held[0] == sample_id and not threading.Event.is_set(held[1]):
        log.warning("sample %s was cancelled while running; asking its job to stop", sample_id)
        held[1].set()
    return True


def end_if_cancelled(runner: SampleRunner, task: TaskPayload, error: BaseException) -> bool:
    """When the sample whose job raised ``error`` has been cancelled, end its run without a
    retry or a failure record and return True. A Redis that cannot answer means no."""
    try:
        if not control.was_cancelled(runner.client, runner.keys, task.sample_id):
            return False
        control.drop_running(runner.client, runner.keys, task.sample_id)
    except redis.RedisError:
        return False
    log.warning("sample %s was cancelled; not retrying it (%s: %s)", task.sample_id, type(error).__name__, error)
    return True


def republish_list(runner: SampleRunner, queue: str, experiment: str) -> tuple[str, int]:
    """(list, step) for a sample published again on ``queue``: its experiment's priority list
    (normal when Redis cannot answer: the write that follows is journaled anyway)."""
    try:
        return control.republish_list(runner.client, runner.keys, queue, experiment)
    except redis.RedisError:
        return priority_list(queue, NORMAL_STEP), NORMAL_STEP


def reap(runner: SampleRunner) -> None:
    """The reaper's share (once a beat, by the worker holding the reaper lock): move back what
    is parked for an experiment no longer paused (a worker parked it while `fleet resume` ran),
    and forget tombstones older than any message of theirs can come back."""
    for experiment, n in control.unpark(runner.client, runner.keys).items():
        log.info("experiment %r is not paused: %d parked samples back at the front of their queues", experiment, n)
    control.prune_cancelled(runner.client, runner.keys, 2.0 * runner.settings.visibility_timeout_s)


def orphan_target(runner: SampleRunner, sample_id: str, queue: str, experiment: str) -> tuple[str, int] | None:
    """Where a dead worker's sample goes back to: (list, step) of its experiment's priority,
    or None when it was cancelled (its running entry is then dropped, nothing is published)."""
    r, keys = runner.client, runner.keys
    if control.was_cancelled(r, keys, sample_id):
        control.drop_running(r, keys, sample_id)
        log.warning("sample %s: its worker died and it was cancelled; dropped it", sample_id)
        return None
    return control.republish_list(r, keys, queue, experiment)
