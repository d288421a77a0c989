"""The Celery task: one for every kind. It hands the payload to the runner (plain code),
which validates it, dispatches on its kind and records the outcome."""

from __future__ import annotations

from fleet.contract import TASK_SAMPLE
from workers.app import app
from workers.runner import SampleRunner

_runner: SampleRunner | None = None


def bind_runner(runner: SampleRunner) -> None:
    """Give this process's task its runner (set once by workers.main before consuming)."""
    global _runner
    _runner = runner


@app.task(name=TASK_SAMPLE, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_sample(self, payload: dict) -> str:
    """One sample of any kind. Errors are recorded by the runner, never raised: a raised
    error would only mark the Celery task failed, which fleet's records already say better."""
    if _runner is None:  # a misstarted process must not ack work it cannot do
        raise RuntimeError("worker started without a runner; use `fleet worker`")
    queue = (self.request.delivery_info or {}).get("routing_key") or ""
    return _runner.run(payload, queue)
