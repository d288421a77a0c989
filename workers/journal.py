"""A worker's local journal of record writes that Redis could not take.

A sample whose output is in place must not be made again because Redis was down when
its worker went to record it. The runner tries Redis for a short while; then it appends
the write to this journal (one JSON line, fsynced) and goes on; the heartbeat replays
the journal as soon as Redis answers again, before it renews anything, and a worker
started later under the same name on the same host replays what an earlier one left.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import redis

from fleet import records
from fleet.contract import CompletionRecord, FailureRecord, Keys

log = logging.getLogger("fleet.worker")


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, op: str, **args: Any) -> None:
        """Keep one write for later: ``op`` is complete, fail or requeue (the records function)."""
        line = json.dumps({"op": op, **args}, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def replay(self, client: redis.Redis, keys: Keys) -> int:
        """Apply every journalled write in order, then empty the journal; returns how many.

        Raises redis errors when Redis is still away (the journal is kept as it was)."""
        with self._lock:
            if not self.pending():
                return 0
            lines = self.path.read_text(encoding="utf-8").splitlines()
            n = 0
            for line in lines:
                try:
                    e = json.loads(line)
                except ValueError:
                    log.error("journal %s: unreadable line skipped: %.200s", self.path, line)
                    continue
                _apply(client, keys, e)
                n += 1
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("", encoding="utf-8")
            os.replace(tmp, self.path)
            return n


def _apply(client: redis.Redis, keys: Keys, e: dict[str, Any]) -> None:
    op = e.get("op")
    if op == "complete":
        records.complete(client, keys, CompletionRecord.model_validate_json(e["record"]), token=e.get("token"))
    elif op == "fail":
        records.fail(client, keys, FailureRecord.model_validate_json(e["failure"]), final=bool(e["final"]))
    elif op == "requeue":
        failure = FailureRecord.model_validate_json(e["failure"]) if e.get("failure") else None
        records.requeue(client, keys, e["sample_id"], e["queue"], base64.b64decode(e["message"]), e["queued"],
                        failure, e["payload"], keep_deliveries=bool(e.get("keep_deliveries")),
                        delay_s=float(e.get("delay_s") or 0.0))
    else:
        log.error("journal: unknown operation %r skipped", op)
