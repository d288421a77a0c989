"""The resident Wan model of a worker: loaded on first use, kept across samples.

A worker serves one model at a time (DESIGN §2): ``ModelCache.get`` returns the loaded
pipeline for the same spec and device without touching the disk, and replaces it
(freeing the old one first) when a sample needs another model.

Loading is fully offline: every ``ModelConfig`` gets a local ``path=`` and the tokenizer
is given explicitly, because diffsynth's default tokenizer config downloads from the hub
(and leaves a ``./models`` folder behind when it fails).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fleet.contract import ModelSpec
from fleet.errors import GpuOutOfMemory, ModelLoadError

log = logging.getLogger("fleet.model")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory (typed, or a RuntimeError saying so)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def release_cuda_memory(device: str) -> None:
    """Return cached CUDA blocks to the driver, so other processes on the GPU see them free."""
    gc.collect()  # pipelines hold reference cycles; collect them before emptying the cache
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_files(spec: ModelSpec) -> None:
    """Fail early, with the path, on a missing file: diffsynth's own errors don't name it clearly."""
    for path in [*spec.dit, spec.text_encoder, spec.vae]:
        if not Path(path).is_file():
            raise ModelLoadError(f"{path}: model file not found (model {spec.name!r})")
    if not Path(spec.tokenizer).is_dir():
        raise ModelLoadError(f"{spec.tokenizer}: tokenizer folder not found (model {spec.name!r})")


def load_pipeline(spec: ModelSpec, device: str) -> Any:
    """Load a WanVideoPipeline for ``spec`` onto ``device`` from local files only.

    Raises ModelLoadError (missing file, unrecognised architecture, unreadable weights)
    or GpuOutOfMemory (the model does not fit on the device).
    """
    _check_files(spec)
    # Heavy imports here: importing diffsynth takes ~5 s and this module is imported early.
    from diffsynth.pipelines.wan_video import ModelConfig, WanVideoPipeline

    from workers.tiny_model import register_tiny_models

    register_tiny_models()  # no effect on real Wan files: their hashes match diffsynth's own entries
    # Several DiT shards form one ModelConfig: diffsynth hashes and loads them as one state dict.
    dit_path: str | list[str] = spec.dit[0] if len(spec.dit) == 1 else list(spec.dit)
    model_configs = [ModelConfig(path=dit_path), ModelConfig(path=spec.text_encoder), ModelConfig(path=spec.vae)]
    chatter = io.StringIO()
    try:
        # diffsynth print()s every step of loading (and a download banner); keep it out of
        # the worker's stdout but available at debug level.
        with contextlib.redirect_stdout(chatter):
            pipe = WanVideoPipeline.from_pretrained(
                torch_dtype=_DTYPES[spec.dtype],
                device=device,
                model_configs=model_configs,
                tokenizer_config=ModelConfig(path=spec.tokenizer),
            )
    except Exception as exc:
        if is_out_of_memory(exc):
            release_cuda_memory(device)
            raise GpuOutOfMemory(f"loading model {spec.name!r} on {device}: CUDA out of memory") from exc
        if isinstance(exc, ValueError) and "Cannot detect the model type" in str(exc):
            raise ModelLoadError(f"model {spec.name!r}: unrecognised weights: {_one_line(exc)}") from exc
        # Corrupt safetensors, shape mismatches, a broken tokenizer: permanent for these files.
        raise ModelLoadError(f"model {spec.name!r}: cannot load: {type(exc).__name__}: {_one_line(exc)}") from exc
    finally:
        log.debug("diffsynth output while loading %s:\n%s", spec.name, chatter.getvalue())
    if pipe.dit is None or pipe.text_encoder is None or pipe.vae is None:
        # Files of the wrong kind (e.g. a VAE given as the DiT) load but leave a slot empty.
        missing = [n for n in ("dit", "text_encoder", "vae") if getattr(pipe, n) is None]
        del pipe
        release_cuda_memory(device)
        raise ModelLoadError(f"model {spec.name!r}: no {', '.join(missing)} among the given files")
    return pipe


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ModelCache:
    """Holds at most one loaded pipeline: the model of the last sample, on its device.

    Thread-safe, so a threads-pool worker's heartbeat thread may look at it; samples
    themselves run one at a time per worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._pipe: Any = None

    @staticmethod
    def _key_of(spec: ModelSpec, device: str) -> tuple[str, str]:
        # ModelSpec holds a list, so it isn't hashable; its canonical JSON identifies it.
        return spec.model_dump_json(), device

    @property
    def resident(self) -> bool:
        """Whether a pipeline is loaded."""
        return self._pipe is not None

    def get(self, spec: ModelSpec, device: str) -> tuple[Any, bool, float]:
        """The pipeline for ``spec`` on ``device``: ``(pipeline, loaded, load_s)``.

        ``loaded`` says whether this call loaded it; ``load_s`` is the load's wall time in
        seconds (0.0 when it was resident). A different spec or device frees the current
        pipeline before loading, so two models never share the GPU.
        """
        key = self._key_of(spec, device)
        with self._lock:
            if self._key == key and self._pipe is not None:
                return self._pipe, False, 0.0
            self._drop()
            start = time.perf_counter()
            pipe = load_pipeline(spec, device)
            load_s = time.perf_counter() - start
            self._key, self._pipe = key, pipe
            log.info("loaded model %s (%s) on %s in %.2f s", spec.name, spec.dtype, device, load_s)
            return pipe, True, load_s

    def clear(self) -> None:
        """Free the resident pipeline (e.g. before a worker exits or changes GPU)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._pipe is None:
            return
        device = self._key[1] if self._key else "cpu"
        self._key, self._pipe = None, None  # drop our reference; gc frees the tensors
        release_cuda_memory(device)
