"""The Celery task: one for every kind. It hands the payload to the runner (plain code),
which validates it, dispatches on its kind and records the outcome."""

from __future__ import annotations

import logging

from fleet.contract import TASK_SAMPLE, FailureRecord
from workers.app import app
from workers.log_tags import tagged
from workers.runner import SampleRunner

log = logging.getLogger("fleet.worker")

_runner: SampleRunner | None = None


class SampleFailed(Exception):
    """A sample failed for good; its failure record (``fleet status --failed``) says why.

    Raised after the runner has recorded the failure, so that Celery's events, and Flower,
    show the task as FAILURE with the error rather than SUCCESS. Celery acks it
    (task_acks_on_failure_or_timeout) and never retries it: fleet's retries are the runner's.
    """


def bind_runner(runner: SampleRunner) -> None:
    """Give this process's task its runner (set once by workers.main before consuming)."""
    global _runner
    _runner = runner


@app.task(name=TASK_SAMPLE, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          throws=(SampleFailed,))
def run_sample(self, payload: dict) -> str:
    """One sample of any kind. The runner records every outcome itself; a sample that failed
    for good then raises SampleFailed ("<error type>: <message>") for Celery's events. A
    retried or given-back sample ends as a success: its next attempt is its own task. So does
    one whose output is still being written in the background ("finishing"): returning lets
    Celery ack it and hand over the next sample, while fleet's lease keeps this one until its
    record (docs/ARCHITECTURE.md, "Overlapped finish")."""
    if _runner is None:  # a misstarted process must not ack work it cannot do
        raise RuntimeError("worker started without a runner; use `fleet worker`")
    queue = (self.request.delivery_info or {}).get("routing_key") or ""
    sid = _sample_id(payload)
    with tagged(str(sid) if sid is not None else None):  # its log lines name it (`fleet logs SAMPLE_ID`)
        outcome = _runner.run(payload, queue)
    if outcome == "failed":
        raise SampleFailed(_why_failed(_runner, payload))
    return outcome


def _why_failed(runner: SampleRunner, payload: object) -> str:
    """``<error type>: <message>`` from the sample's failure record (the runner wrote it
    under the id the payload gives, ``?`` for none)."""
    sid = _sample_id(payload) or "?"
    try:
        raw = runner.client.hget(runner.keys.failed, sid)
        if raw is not None:
            f = FailureRecord.model_validate_json(raw)
            return f"{f.error_type}: {f.message}"
    except Exception as e:  # Redis away (the record went to the journal) or an unreadable record
        log.debug("cannot read the failure record of %s: %s", sid, e)
    return f"sample {sid} failed; see `fleet status --failed` and the worker's log"


def _sample_id(payload: object) -> str | None:
    """The sample a payload is for: its ``sample_id``, or the id a reference names (fleet.kept_payloads)."""
    if not isinstance(payload, dict):
        return None
    sid = payload.get("sample_id", payload.get("ref"))
    return None if sid is None else str(sid)
