"""``fleet logs``: a worker's log, or the lines of every worker's log that name a sample,
rotated files included, oldest first; ``follow`` keeps printing new lines.

A worker's log is its file in the log folder (``fleet.log_files``; also ``supervisor``,
``flower``, ``redis``). A sample's lines are the log records that name its id (or the
start of it, as Flower's labels show it): a worker prefixes every record it logs while
running a sample with ``[<sample id>]`` (``workers/log_tags.py``), and a record's
continuation lines (a traceback) go with it. Lines of several workers are merged by their
timestamps.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fleet.errors import InputError
from fleet.log_files import rotated, worker_log

# A record's first line starts with its time (Python logging's asctime, Celery's "[time: ...]").
_STAMP = re.compile(r"^\[?(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?)")
MIN_ID_CHARS = 8  # a shorter sample id prefix would match too much
POLL_S = 0.25  # how often `-f` looks for new lines


def find_log(logs: Path, target: str) -> Path | None:
    """The log file ``target`` names: a worker (``cpu0``, ``gpu1@host``) or another process of
    the fleet (``supervisor``); None when there is none (rotated ones count)."""
    name = target.split("@", 1)[0]
    if not name or "/" in name or name.startswith("."):
        return None
    for cand in (worker_log(logs, name), logs / f"{name}.log"):
        if rotated(cand):
            return cand
    return None


def worker_logs(logs: Path) -> list[Path]:
    """Every worker's log file (the current name, whether or not only rotated ones are left)."""
    try:
        names = os.listdir(logs)
    except OSError:
        return []
    bases = {n.split(".log", 1)[0] + ".log" for n in names if n.startswith("worker-") and ".log" in n}
    return sorted(logs / b for b in bases)


def show(logs: Path, target: str, last: int | None, follow: bool, emit: Callable[[str], None],
         poll_s: float = POLL_S) -> int:
    """Print what ``fleet logs TARGET`` prints through ``emit`` (one line at a time, without
    its newline); returns the lines printed before following. Raises InputError for a
    target that is neither a log nor long enough to be a sample id, and (unless following)
    for a sample id no log line names."""
    path = find_log(logs, target)
    wanted: str | None = None  # the sample id (prefix) whose records are shown; None: the whole log
    if path is not None:
        tails = [_Tail(path)]
        lines = _olds(path) + tails[0].history()
    else:
        if len(target) < MIN_ID_CHARS or not re.fullmatch(r"[\w.-]+", target):
            known = ", ".join(p.name[len("worker-"):-len(".log")] for p in worker_logs(logs)) or "none"
            raise InputError(f"{target}: no such log in {logs} (workers: {known}), and too short for a sample id "
                             f"(give at least {MIN_ID_CHARS} characters of it)")
        wanted = target
        tails = [_Tail(p) for p in worker_logs(logs)]
        stamped: list[tuple[str, int, list[str]]] = []
        for n, t in enumerate(tails):
            history = _olds(t.path) + t.history()
            stamped += [(stamp, n, e) for stamp, e in _entries(history) if wanted in e[0]]
        if not stamped and not follow:
            raise InputError(f"{target}: no worker log in {logs} names it")
        lines = [ln for _, _, e in sorted(stamped, key=lambda x: (x[0], x[1])) for ln in e]
    if last is not None:
        lines = lines[-last:] if last > 0 else []
    for ln in lines:
        emit(ln)
    if follow:
        _follow(tails, wanted, emit, logs, poll_s)
    return len(lines)


def _follow(tails: list[_Tail], wanted: str | None, emit: Callable[[str], None], logs: Path, poll_s: float) -> None:
    """Print new lines until KeyboardInterrupt; with ``wanted``, only the records naming it,
    from every worker's log (ones that appear meanwhile too)."""
    while True:
        if wanted is not None:
            known = {t.path for t in tails}
            tails += [_Tail(p, at_end=False) for p in worker_logs(logs) if p not in known]
        for t in tails:
            for ln in t.read():
                if wanted is None:
                    emit(ln)
                    continue
                if _STAMP.match(ln) or t.entry is None:  # a new record; continuation lines follow its verdict
                    t.entry = [ln]
                    t.shown = wanted in ln
                if t.shown:
                    emit(ln)
        time.sleep(poll_s)


@dataclass
class _Tail:
    """The lines of one log path as they come, across its rotations."""

    path: Path
    at_end: bool = True  # False: a log that appeared while following, read from its start
    f: IO[str] | None = None
    ino: int | None = None
    partial: str = ""
    entry: list[str] | None = None  # the record being followed (sample logs)
    shown: bool = False
    _opened: bool = field(default=False, repr=False)

    def history(self) -> list[str]:
        """Everything in the current file now; following goes on from there."""
        self._open()
        return self._take()

    def read(self) -> list[str]:
        """The complete lines written since the last call (rotations followed)."""
        if not self._opened:
            self._open()
            if self.at_end and self.f is not None:
                self.f.seek(0, os.SEEK_END)
        out = self._take()
        try:
            ino = os.stat(self.path).st_ino
        except OSError:
            return out
        if ino != self.ino:  # rotated: the rest of the old file, then the new one from its start
            if self.partial:
                out.append(self.partial)
                self.partial = ""
            if self.f is not None:
                self.f.close()
            self.f = None
            self._open()
            out += self._take()
        return out

    def _open(self) -> None:
        self._opened = True
        try:
            self.f = open(self.path, encoding="utf-8", errors="replace", newline="")
            self.ino = os.fstat(self.f.fileno()).st_ino
        except OSError:
            self.f, self.ino = None, None

    def _take(self) -> list[str]:
        if self.f is None:
            return []
        data = self.partial + self.f.read()
        parts = data.split("\n")
        self.partial = parts.pop()
        return [p.rstrip("\r") for p in parts]


def _olds(path: Path) -> list[str]:
    """The lines of ``path``'s rotated files, oldest first."""
    return [ln for p in rotated(path) if p != path for ln in _lines(p)]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def _entries(lines: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    """Records (first line and its continuation lines) with their time stamps; lines before
    the first stamped one are a record of their own, stamped as the one before."""
    stamp, cur = "", None
    for ln in lines:
        m = _STAMP.match(ln)
        if m or cur is None:
            if cur is not None:
                yield stamp, cur
            if m:
                stamp = m.group(1).replace("T", " ").replace(".", ",")
            cur = [ln]
        else:
            cur.append(ln)
    if cur is not None:
        yield stamp, cur
