"""A worker's finisher: the CPU tail of one sample, run while the next sample computes.

A video or image job's GPU part ends with its frames on the host; encoding them, writing
the file atomically and writing the sample's record is CPU and disk work during which
the GPU would idle. The runner (workers/runner.py) hands that tail here and lets its
Celery task return, so the worker takes the next sample at once (docs/ARCHITECTURE.md,
"Overlapped finish").

At most one finish is pending: ``start`` refuses a second, and the runner ``wait``s for
the pending one before handing over the next, so at most two samples' outputs are in
memory (the one finishing, the one computing). The thread is not a daemon: a worker whose
main thread returns still waits for it, and ``workers.main`` waits for it explicitly
before the heartbeat stops renewing the finishing sample's lease.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("fleet.worker")


class Finisher:
    """Runs one background finish at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> bool:
        """A finish is running."""
        return not self._idle.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Until no finish is pending (True), or ``timeout_s`` seconds have passed (False)."""
        return self._idle.wait(timeout_s)

    def start(self, name: str, work: Callable[[], None]) -> None:
        """Run ``work`` (which records its own outcome, success or failure) in a thread of
        its own. RuntimeError when a finish is pending: ``wait`` first."""
        with self._lock:
            if not self._idle.is_set():
                raise RuntimeError("a finish is already pending; wait for it first")
            self._idle.clear()

        def body() -> None:
            try:
                work()
            except BaseException:  # work records its own errors; this is a fault in the recording itself
                log.exception("finishing %s failed outside its own error handling", name)
            finally:
                self._idle.set()

        self._thread = threading.Thread(target=body, name=f"fleet-finish-{name[:12]}", daemon=False)
        try:
            self._thread.start()
        except BaseException:  # no thread (out of resources): nothing is pending
            self._idle.set()
            raise
