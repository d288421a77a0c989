"""Every log record a worker writes while running a sample names the sample: its message
starts with ``[<sample id>] `` (what `fleet logs SAMPLE_ID` finds, ``fleet/log_view.py``).

The tag is per thread: the pool thread running the sample sets it (``tagged``), so the
job's records, diffsynth's and the runner's carry it, and the heartbeat thread's (which
speak of other samples too) do not. It is added by a log record factory, so it is in the
record whatever handler or format writes it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()
_installed = False


def install() -> None:
    """Put the tag into every record made from now on in this process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        sid = getattr(_local, "sample_id", None)
        if sid is not None:
            # Only a record with args is %-formatted: a '%' in the id must not break it.
            prefix = f"[{sid.replace('%', '%%') if record.args else sid}] "
            record.msg = prefix + str(record.msg)
        return record

    logging.setLogRecordFactory(factory)


@contextmanager
def tagged(sample_id: str | None) -> Iterator[None]:
    """Records this thread makes inside the block name ``sample_id`` (None: no tag)."""
    before = getattr(_local, "sample_id", None)
    _local.sample_id = sample_id
    try:
        yield
    finally:
        _local.sample_id = before
