"""What a failed shell command's exit status and output say, as fleet errors with seed 003's
advice line (its §14.4 table). Permanent ones (ImportError, 127, 126) are never retried;
out of memory waits for memory or moves to a larger memory class (fleet.error_policy)."""

from __future__ import annotations

import re

from fleet.errors import GpuOutOfMemory, PermanentError, RetryableError


class CommandError(Exception):
    """Mixin: what every command failure carries."""

    advice = "read the command's log"


class CommandFailed(CommandError, RetryableError):
    advice = "read the command's log"


class CommandOutOfMemory(CommandError, GpuOutOfMemory):
    advice = "raise the command's mem_GB or lower its batch size"


class CudaError(CommandError, RetryableError):
    advice = "check the CUDA environment (driver, toolkit, the GPU's health)"


class CommandRuntimeError(CommandError, RetryableError):
    advice = "check the code's logic"


class SegmentationFault(CommandError, RetryableError):
    advice = "check memory access (native extensions, mismatched library builds)"


class CommandImportError(CommandError, PermanentError):
    advice = "check the Python environment and its packages"


class CommandNotFound(CommandError, PermanentError):
    advice = "check the command's path and PATH"


class CommandNotExecutable(CommandError, PermanentError):
    advice = "check the file's execute permission"


class CommandTimeout(CommandError, RetryableError):
    advice = "raise timeout_s, or make the command faster"


_IMPORT = re.compile(r"\b(ImportError|ModuleNotFoundError)\b")
_OOM = re.compile(r"out of memory", re.IGNORECASE)
_CUDA_MEMORY = re.compile(r"cuda.*memory", re.IGNORECASE)
_CUDA_ERROR = re.compile(r"cuda error", re.IGNORECASE)
_SEGFAULT = re.compile(r"segmentation fault", re.IGNORECASE)
_RUNTIME = re.compile(r"runtime ?error", re.IGNORECASE)


def classify(exit_code: int, tail: str, timed_out: bool = False, timeout_s: float | None = None) -> type[CommandError]:
    """The error class of a command that ended with ``exit_code`` and output ``tail``."""
    if timed_out:
        return CommandTimeout
    if exit_code == 127:
        return CommandNotFound
    if exit_code == 126:
        return CommandNotExecutable
    if _IMPORT.search(tail):
        return CommandImportError
    if _OOM.search(tail) or _CUDA_MEMORY.search(tail):
        return CommandOutOfMemory
    if _CUDA_ERROR.search(tail):
        return CudaError
    if exit_code in (139, -11) or _SEGFAULT.search(tail):
        return SegmentationFault
    if _RUNTIME.search(tail):
        return CommandRuntimeError
    return CommandFailed


def error_for(exit_code: int, tail: str, where: str, log: str, timed_out: bool = False,
              timeout_s: float | None = None) -> Exception:
    """The exception to raise: class, exit status, advice, log path and the output's last lines."""
    cls = classify(exit_code, tail, timed_out)
    what = f"timed out after {timeout_s:g} s" if timed_out else f"exit {exit_code}"
    msg = f"{where}: {what}; {cls.advice}; log {log}\n{tail}"
    if issubclass(cls, GpuOutOfMemory):
        return cls(msg, wait=True)
    return cls(msg)
