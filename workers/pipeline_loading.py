"""What loading any diffsynth pipeline shares: file checks, quiet loading, and errors
translated into fleet.errors types (ModelLoadError: permanent for these files;
GpuOutOfMemory: retryable elsewhere)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fleet.errors import GpuOutOfMemory, ModelLoadError
from workers.model_cache import release_cuda_memory

log = logging.getLogger("fleet.model")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory (typed, or a RuntimeError saying so)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def memory_had(device: str) -> str:
    """Free and total memory of the device, for OOM messages."""
    try:
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return f"{free // 2**20} MiB free of {total // 2**20} MiB"
    except Exception:  # no CUDA (a CPU worker) or a broken context after the OOM
        return "unknown free memory"


def out_of_memory(exc: Exception, sample_id: str, shape: str, memory_mib: int, device: str) -> GpuOutOfMemory | None:
    """The GpuOutOfMemory to raise for ``exc`` when it is CUDA running out of memory during a
    sample (the device's cached blocks freed first, for the next, perhaps smaller, sample);
    None for any other error."""
    if not is_out_of_memory(exc):
        return None
    release_cuda_memory(device)
    need = f"needs {memory_mib} MiB (declared)" if memory_mib else "declares no memory need"
    return GpuOutOfMemory(f"sample {sample_id} ({shape}) {need}; ran out of GPU memory on {device}, "
                          f"which had {memory_had(device)}")


def check_files(spec: Any) -> None:
    """Fail early, with the path, on a missing file: diffsynth's own errors don't name it clearly."""
    for path in [*spec.dit, spec.text_encoder, spec.vae]:
        if not Path(path).is_file():
            raise ModelLoadError(f"{path}: model file not found (model {spec.name!r})")
    if not Path(spec.tokenizer).is_dir():
        raise ModelLoadError(f"{spec.tokenizer}: tokenizer folder not found (model {spec.name!r})")


def load_quietly(name: str, device: str, build: Callable[[], Any]) -> Any:
    """``build()`` (a ``Pipeline.from_pretrained`` call) with diffsynth's print()s kept out of
    the worker's stdout (at debug level instead), its errors translated."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            return build()
    except Exception as exc:
        if is_out_of_memory(exc):
            release_cuda_memory(device)
            raise GpuOutOfMemory(f"loading model {name!r} on {device}: CUDA out of memory") from exc
        if isinstance(exc, ValueError) and "Cannot detect the model type" in str(exc):
            raise ModelLoadError(f"model {name!r}: unrecognised weights: {one_line(exc)}") from exc
        # Corrupt safetensors, shape mismatches, a broken tokenizer: permanent for these files.
        raise ModelLoadError(f"model {name!r}: cannot load: {type(exc).__name__}: {one_line(exc)}") from exc
    finally:
        log.debug("diffsynth output while loading %s:\n%s", name, chatter.getvalue())


def require_parts(pipe: Any, name: str, device: str, parts: tuple[str, ...]) -> Any:
    """``pipe`` when every one of ``parts`` loaded; files of the wrong kind (a VAE given as
    the DiT) load but leave a slot empty: ModelLoadError naming the empty ones."""
    missing = [n for n in parts if getattr(pipe, n, None) is None]
    if missing:
        del pipe
        release_cuda_memory(device)
        raise ModelLoadError(f"model {name!r}: no {', '.join(missing)} among the given files")
    return pipe


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
