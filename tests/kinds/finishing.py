"""A job for the tests of the overlapped finish (workers/finisher.py): the touch kind's samples
(tests/kinds/touch.py plans them), made by a job whose CPU tail is a ``JobOutcome.finish``.

The finish writes ``<output>`` atomically, but first waits while ``<output>.hold`` exists
(the test removes it to let the finish go on; a file, so it works across processes too),
and raises instead when the item's ``fail`` text starts with ``finish:``. Register it with
``FLEET_KINDS='{"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.finishing"}}'``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

HOLD_LIMIT_S = 60.0  # a hold never removed (a failed test) ends the wait, so no thread is left behind
COMPUTED: list[str] = []  # sample ids whose "GPU part" ran in this process, in order


def run(task, ctx):  # (TaskPayload, JobContext) -> JobOutcome
    from workers.atomic_output import write_atomically
    from workers.jobs.base import JobOutcome, finish_now

    p = task.params
    out = Path(task.output_path)
    if p.get("fail") and not p["fail"].startswith("finish:"):
        raise RuntimeError(p["fail"])
    COMPUTED.append(task.sample_id)

    def finish() -> dict:
        hold = out.with_name(out.name + ".hold")
        deadline = time.monotonic() + HOLD_LIMIT_S
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if p.get("fail", "").startswith("finish:"):
            raise RuntimeError(p["fail"])
        write_atomically(out, lambda tmp: tmp.write_text(f"{p['greeting']} {p['text']}"))
        return {"finished_in": threading.current_thread().name, "finished_pid": os.getpid()}

    return finish_now(JobOutcome(output_path=str(out), metrics={"computed_in": threading.current_thread().name},
                                 finish=finish), ctx)
