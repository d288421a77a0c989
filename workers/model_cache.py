"""A worker's resident model: loaded on first use, kept across samples, one at a time.

Keyed by kind, model identity and device. A sample that needs another model frees the
resident one (and returns CUDA's cached blocks to the driver) before loading, so two
models never share the GPU and a worker that serves several kinds keeps one resident.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from workers import deferred_decode

log = logging.getLogger("fleet.model")


def release_cuda_memory(device: str) -> None:
    """Return cached CUDA blocks to the driver, so other processes on the GPU see them free."""
    gc.collect()  # pipelines hold reference cycles; collect them before emptying the cache
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class ModelCache:
    """Holds at most one loaded model. Thread-safe (the heartbeat thread may look at it);
    samples themselves run one at a time per worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, str, str] | None = None
        self._model: Any = None

    @property
    def resident(self) -> tuple[str, str, str] | None:
        """(kind, identity, device) of the loaded model, or None."""
        return self._key if self._model is not None else None

    def get(self, kind: str, identity: str, device: str, load: Callable[[], Any]) -> tuple[Any, bool, float]:
        """The model of ``kind`` with ``identity`` (a canonical string) on ``device``:
        ``(model, loaded, load_s)``. ``load()`` runs only when it is not resident, after the
        resident model (if any) was freed; ``load_s`` is its wall time in seconds."""
        key = (kind, identity, device)
        with self._lock:
            if self._key == key and self._model is not None:
                return self._model, False, 0.0
            self._drop()
            start = time.perf_counter()
            model = load()
            load_s = time.perf_counter() - start
            self._key, self._model = key, model
            log.info("loaded %s model on %s in %.2f s", kind, device, load_s)
            return model, True, load_s

    def clear(self) -> None:
        """Free the resident model (e.g. before a worker exits)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._model is None:
            return
        device = self._key[2] if self._key else "cpu"
        # The previous sample's decode may still be running with this model (workers/deferred_decode.py).
        deferred_decode.drain(device)
        self._key, self._model = None, None  # drop our reference; gc frees the tensors
        release_cuda_memory(device)
