"""Completion rates for `fleet watch`: completions per minute over a sliding window, the ETA
that follows, and the completion records they are computed from, read incrementally.

Pure functions over (finished_at, duration_s) pairs, so they are testable on constructed
records; ``RecordTracker`` is the one part that reads Redis.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from fleet.contract import Keys

WINDOW_S = 300.0  # the rate's sliding window, seconds
CHUNK = 5000  # ids per HMGET


@dataclass(frozen=True)
class Completion:
    """What a rate needs of one completion record. Times are unix seconds."""

    finished_at: float
    duration_s: float
    group: str
    worker: str


def rate_per_min(events: Iterable[tuple[float, float]], now: float, window_s: float = WINDOW_S) -> float:
    """Completions per minute over the last ``window_s`` seconds before ``now``.

    ``events``: (finished_at, duration_s) pairs, unix seconds and seconds. The span runs from
    the later of the window's start and the start of the earliest sample finished in it
    (finished_at - duration_s) to ``now``: work that began 20 s ago is not spread over the
    whole window, and idle time since the last completion lowers the rate. At least 1 s.
    0.0 when nothing finished in the window.
    """
    start = now - window_s
    n = 0
    first = now
    for finished_at, duration_s in events:
        if finished_at > start:  # no upper bound: a worker's clock may run a little ahead
            n += 1
            first = min(first, finished_at - max(0.0, duration_s))
    if n == 0:
        return 0.0
    return 60.0 * n / max(now - max(start, first), 1.0)


def eta_s(remaining: int, rate: float) -> float | None:
    """Seconds until ``remaining`` samples are made at ``rate`` per minute: 0.0 when nothing
    remains, None when the rate is 0 (unknown)."""
    if remaining <= 0:
        return 0.0
    if rate <= 0:
        return None
    return 60.0 * remaining / rate


class RecordTracker:
    """The completion records seen so far (sample id -> group) and the recent ones (for rates).

    A record is read once: ``add`` reads only ids it has not seen, ``poll`` lists the record
    ids only when their count changed. A record replaced later (a sample made again) keeps
    its first reading until the tracker is dropped.
    """

    def __init__(self, client: redis.Redis, keys: Keys, window_s: float = WINDOW_S) -> None:
        self.client = client
        self.keys = keys
        self.window_s = window_s
        self.group_of: dict[str, str] = {}  # sample id -> group, every record read
        self.done_by_group: Counter = Counter()
        self.recent: list[Completion] = []  # finished within the window (as of the last prune)

    def add(self, ids: Iterable[str], now: float) -> None:
        """Read the records of ``ids`` not seen yet (ids without a record are skipped)."""
        new = [i for i in ids if i not in self.group_of]
        for i in range(0, len(new), CHUNK):
            chunk = new[i : i + CHUNK]
            for sid, raw in zip(chunk, self.client.hmget(self.keys.records, chunk)):
                if raw is None:
                    continue
                try:
                    d = json.loads(raw)
                    c = Completion(float(d.get("finished_at", 0.0)), float(d.get("duration_s", 0.0)),
                                   str(d.get("group", d.get("category", "?"))), str(d.get("worker", "?")))
                except (ValueError, TypeError, AttributeError):
                    c = Completion(0.0, 0.0, "?", "?")  # a record of another fleet version: counted, no rate
                self.group_of[sid] = c.group
                self.done_by_group[c.group] += 1
                if c.finished_at > now - self.window_s:
                    self.recent.append(c)

    def poll(self, now: float) -> None:
        """Read the records written since the last poll (the whole namespace's)."""
        if self.client.hlen(self.keys.records) != len(self.group_of):
            self.add([k.decode() for k in self.client.hkeys(self.keys.records)], now)

    def prune(self, now: float) -> None:
        self.recent = [c for c in self.recent if c.finished_at > now - self.window_s]

    def rate(self, now: float, group: str | None = None, worker: str | None = None) -> float:
        """Completions per minute (``rate_per_min``), of one group or one worker when given."""
        return rate_per_min(((c.finished_at, c.duration_s) for c in self.recent
                             if (group is None or c.group == group) and (worker is None or c.worker == worker)),
                            now, self.window_s)
