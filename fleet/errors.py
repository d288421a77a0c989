"""The error hierarchy: retryable faults (the same sample may succeed later or elsewhere)
versus permanent ones (running it again gives the same failure).

Third-party errors are translated into these where they are caught, so callers
decide on retries by type alone.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error fleet raises on purpose."""

    retryable: bool = False


class PermanentError(FleetError):
    """Running the same sample again would fail the same way (bad input, bad config)."""


class RetryableError(FleetError):
    """The sample may succeed on a later attempt (GPU memory, lost connection, preemption)."""

    retryable = True


class InputError(PermanentError):
    """User input (experiment file, prompts, dataset, video) is malformed or missing.

    The message is one line that names the file and the fault.
    """


class ConfigError(PermanentError):
    """The fleet settings are invalid."""


class ModelLoadError(PermanentError):
    """The model files cannot be loaded (missing path, unknown architecture)."""


class GpuOutOfMemory(RetryableError):
    """CUDA ran out of memory; a larger memory class or a freer GPU may succeed.

    ``wait``: the memory may come free where it is (a colleague's process holds it, a
    shell command's own estimate), so with no larger class the sample retries on its
    queue after a back-off instead of failing."""

    def __init__(self, message: str = "", wait: bool = False) -> None:
        super().__init__(message)
        self.wait = wait


class WaitForResources(RetryableError):
    """Not started: what the sample declared is not free yet (GPU memory held by others).
    Back to its queue after a back-off, the same attempt (nothing went wrong)."""


class Preempted(RetryableError):
    """The worker is being stopped; the job saved what it could and the sample goes back to
    its queue (the same attempt: nothing went wrong with the sample)."""


class BrokerUnavailable(RetryableError):
    """Redis cannot be reached."""


class PlacementError(PermanentError):
    """A GPU request that no GPU of this fleet can satisfy."""
