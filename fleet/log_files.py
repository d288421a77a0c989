"""The fleet's log files: where each process logs, how a log rotates, and which files hold
one log, oldest first (docs/ARCHITECTURE.md, "Logs").

`fleet up` starts each process with stdout and stderr on ``<logs>/<name>.log``:
``worker-<worker>.log`` (the supervisor's workers), ``supervisor.log``, ``flower.log``,
``redis.log``. A Python process of the fleet rotates its own file (``LogRotation``): once a
second it compares the size of the file its stdout is with ``log_max_mib``, and past it
renames ``<name>.log.i`` to ``.i+1`` (dropping what is beyond ``log_backups``), the log to
``.1``, opens a fresh ``<name>.log`` and puts it under stdout and stderr with ``dup2``. So
every writer of the process (logging, print, a C library, a dying thread's traceback) goes
on into the new file with nothing to reopen, and no line is lost or written twice.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from fleet.settings import FleetSettings

MIB = 1024 * 1024


def worker_log(logs: Path, worker: str) -> Path:
    """The log file of worker ``worker`` (``cpu0``, ``gpu1s1``; a ``@host`` suffix is ignored)."""
    return logs / f"worker-{worker.split('@', 1)[0]}.log"


def rotated(path: Path) -> list[Path]:
    """``path`` and its rotated files that exist, oldest first: ``<path>.N`` ... ``<path>.1``, ``<path>``."""
    olds: list[tuple[int, Path]] = []
    prefix = path.name + "."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            olds.append((int(name[len(prefix):]), path.parent / name))
    files = [p for _, p in sorted(olds, reverse=True)]
    return files + [path] if path.exists() else files


class LogRotation(threading.Thread):
    """Rotates the log file this process's stdout (and stderr, when it is the same file) is
    written to; does nothing while stdout is something else (a terminal, another file)."""

    def __init__(self, path: Path, max_bytes: int, backups: int, interval_s: float = 1.0) -> None:
        super().__init__(name="fleet-log-rotation", daemon=True)
        self.path = Path(path)
        self.max_bytes = max(1, int(max_bytes))
        self.backups = max(0, int(backups))
        self.interval_s = interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                self.check()
            except OSError as e:  # a full disk, a removed folder: keep logging where it goes now
                print(f"fleet: cannot rotate {self.path}: {e}", file=sys.stderr, flush=True)

    def check(self) -> bool:
        """Rotate when stdout is this log and has reached ``max_bytes``; True when it did."""
        try:
            out, now = os.fstat(1), os.stat(self.path)
        except OSError:
            return False
        if (out.st_dev, out.st_ino) != (now.st_dev, now.st_ino) or out.st_size < self.max_bytes:
            return False
        self.rotate()
        return True

    def rotate(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        old = os.fstat(1)
        p = str(self.path)
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                if os.path.exists(f"{p}.{i}"):
                    os.replace(f"{p}.{i}", f"{p}.{i + 1}")
            os.replace(p, f"{p}.1")
        else:
            os.unlink(p)
        for extra in rotated(self.path):  # beyond log_backups (a lowered setting)
            suffix = extra.name[len(self.path.name) + 1:]
            if suffix.isdigit() and int(suffix) > self.backups:
                extra.unlink(missing_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            err = os.fstat(2)
            os.dup2(fd, 1)
            if (err.st_dev, err.st_ino) == (old.st_dev, old.st_ino):
                os.dup2(fd, 2)
        finally:
            os.close(fd)


def start_rotation(settings: FleetSettings, path: Path) -> LogRotation:
    """Rotate ``path`` by the settings' ``log_max_mib`` and ``log_backups`` while this
    process's stdout is that file (a daemon thread; returns it)."""
    r = LogRotation(path, int(settings.log_max_mib * MIB), settings.log_backups)
    r.start()
    return r
