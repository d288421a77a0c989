"""Loading a Wan pipeline (diffsynth) from local files, for the video job; the worker's
ModelCache (workers/model_cache.py) keeps it resident between samples.

Loading is fully offline: every ``ModelConfig`` gets a local ``path=`` and the tokenizer
is given explicitly, because diffsynth's default tokenizer config downloads from the hub
(and leaves a ``./models`` folder behind when it fails).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fleet.errors import GpuOutOfMemory, ModelLoadError
from fleet.kinds.video.spec import ModelSpec
from workers.model_cache import release_cuda_memory

log = logging.getLogger("fleet.model")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory (typed, or a RuntimeError saying so)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _register_fleet_tiny() -> None:
    from workers.tiny_model import register_tiny_models

    register_tiny_models()


# Architectures diffsynth does not know by itself, by the name a model.json gives in
# ``architectures``: registered only for the models that say so, never for real Wan files.
EXTRA_ARCHITECTURES: dict[str, Callable[[], None]] = {"fleet-tiny": _register_fleet_tiny}


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

    for arch in spec.architectures:
        EXTRA_ARCHITECTURES[arch]()
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
