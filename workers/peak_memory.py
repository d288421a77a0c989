"""The GPU memory a single-GPU worker's samples take at their peak, for ``slots: auto``
(fleet.slot_plans): what one more slot on the GPU would need. MiB, the model and the CUDA
context included. The heartbeat advertises it (``WorkerEntry.peak_mib``).

Measured after each sample's GPU part from two sources:

- NVML's figure for this process (fleet.gpu_inventory: the driver, or a fake inventory
  file that declares the worker's pid): everything the process holds, the CUDA context
  and libraries' workspaces included, but only as of the reading.
- torch's caching allocator: ``max_memory_reserved`` is the peak of what torch held,
  between readings too. The context's share (NVML's figure less torch's reserved memory
  at the same moment) is taken on the first ``auto_samples`` samples and added to it.

With both, peak = torch's peak + the context's share; with NVML only (a job that does not
use torch's CUDA, a CPU worker on a fake inventory), NVML's figure; with torch only (NVML
sees other pids, e.g. in a container without the host's PID namespace), torch's peak,
which leaves out the context (about 0.5 GiB). The first samples read NVML; after them, only
torch (microseconds), so a worker of short samples pays nothing per sample.
"""

from __future__ import annotations

import logging
import os
import sys

from fleet.gpu_inventory import Inventory, inventory_from_env

log = logging.getLogger("fleet.worker")

_MIB = 1024 * 1024


class PeakMemory:
    def __init__(self, gpu: int, first_samples: int = 2, inventory: Inventory | None = None) -> None:
        """``gpu``: the worker's NVML index; ``first_samples``: samples that read NVML."""
        self.gpu = gpu
        self.first_samples = first_samples
        self.peak_mib: int | None = None  # None until a sample was measured
        self.samples = 0
        self._context_mib = 0  # NVML's figure less torch's reserved memory: context, workspaces
        self._inventory = inventory

    def after_sample(self) -> None:
        """Measure after a sample's GPU part; a failed reading costs only this sample's figure."""
        try:
            mib = self._measure()
        except Exception:  # a driver fault must not fail the sample
            log.debug("peak GPU memory: reading failed", exc_info=True)
            return
        if mib is None:
            return
        self.samples += 1
        if self.peak_mib is None or mib > self.peak_mib:
            log.info("peak GPU memory per sample: %d MiB (over %d samples)", mib, self.samples)
            self.peak_mib = mib

    def _measure(self) -> int | None:
        torch_peak, torch_now = _torch_mib()
        if torch_peak is not None and self.samples >= self.first_samples:
            return torch_peak + self._context_mib
        own = self._nvml_mib()
        if torch_peak is None:
            return own
        if own is not None:
            self._context_mib = max(self._context_mib, own - (torch_now or 0))
        return torch_peak + self._context_mib

    def _nvml_mib(self) -> int | None:
        """This process's memory on its GPU as NVML lists it; None where it is not listed."""
        if self._inventory is None:
            self._inventory = inventory_from_env()  # kept open: NVML is initialised once
        pid = os.getpid()
        for snap in self._inventory.snapshot():
            if snap.index == self.gpu:
                return next((p.used_mib for p in snap.processes if p.pid == pid), None)
        return None


def _torch_mib() -> tuple[int | None, int | None]:
    """(peak reserved, reserved now) of torch's allocator on this worker's GPU (cuda:0 under its
    CUDA_VISIBLE_DEVICES), or (None, None) where this process has not used CUDA through torch:
    never imports torch or initialises CUDA itself."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None, None
    return torch.cuda.max_memory_reserved(0) // _MIB, torch.cuda.memory_reserved(0) // _MIB
