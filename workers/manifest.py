"""``<output root>/fleet-manifest.jsonl``: one line per finished sample, so an experiment's
records outlive Redis (a flushed database, a Redis on another host that is gone).

A line is the completion record plus the sample's own parameters (its payload ``body``).
Workers of several hosts append to the same file on the shared file system: each line is
written in one ``write`` of an O_APPEND descriptor under an exclusive ``flock``, so lines
never interleave. A line is at most one record, not a whole history: a sample made again
(``--rerun``, a changed output) appends a newer line, and readers keep the last per id.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from typing import Any

from fleet.contract import CompletionRecord
from fleet.manifest import MANIFEST_NAME, read  # noqa: F401  (the reader is the producer's; re-exported)

log = logging.getLogger("fleet.worker")


def append(output_root: str, record: CompletionRecord | str, params: dict[str, Any]) -> None:
    """Append the sample's line (``record``: the completion record, or its JSON by alias when
    the caller has it already); a failure is logged, never raised (the record in Redis stands)."""
    text = record if isinstance(record, str) else record.model_dump_json(by_alias=True)
    # The record's JSON object with "params" added: spliced rather than parsed and written again,
    # since a worker writes one line per sample (readers parse it; a record has no "params").
    line = f'{text[:-1]},"params":{json.dumps(params, ensure_ascii=False, default=str)}}}\n'
    path = os.path.join(output_root, MANIFEST_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line.encode())
        finally:
            os.close(fd)  # closing releases the lock
    except OSError as e:
        log.warning("could not append to %s: %s", path, e)
