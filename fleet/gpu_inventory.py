"""The GPU inventory: typed, frozen snapshots of the host's GPUs. The only module that calls NVML.

Units: memory in MiB (1024 * 1024 bytes), power in W, temperature in degrees C,
utilisation in percent (0-100). A field the driver does not report is None.

GPU indices are NVML's, which enumerate in PCI bus order; workers set
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that index N here is ``CUDA_VISIBLE_DEVICES=N`` there.
NVML ignores ``CUDA_VISIBLE_DEVICES`` and always sees every GPU of the host.

Process pids come from the driver and are pids of the host's PID namespace. Inside a
container with its own PID namespace they do not match ``os.getpid()`` there and
``/proc/<pid>`` names another process (or none): users and own-worker matching are then
unreliable, so run GPU workers with the host's PID namespace (``--pid=host``).
"""

from __future__ import annotations

import abc
import json
import logging
import os
import pwd
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from fleet.errors import ConfigError

log = logging.getLogger(__name__)

FAKE_GPUS_ENV = "FLEET_FAKE_GPUS"
_MIB = 1024 * 1024
T = TypeVar("T")


class GpuProcess(BaseModel):
    """A process holding a context on a GPU (compute or graphics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int = Field(ge=0, description="Host pid as the driver reports it")
    used_mib: int | None = Field(None, ge=0, description="GPU memory of this process, MiB; None where not reported")
    user: str | None = Field(None, description="Owner of /proc/<pid> (name, or uid where no name); None if unreadable")
    name: str | None = Field(None, description="Process name or path")


class GpuSnapshot(BaseModel):
    """One GPU at one moment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, description="NVML index (PCI bus order)")
    uuid: str
    name: str
    memory_total_mib: int = Field(ge=0)
    memory_used_mib: int = Field(ge=0)
    memory_free_mib: int = Field(ge=0, description="As the driver reports it; total - used - driver reserve")
    utilization_pct: int | None = Field(None, ge=0, le=100, description="Kernel-busy time over the last sample period")
    power_w: float | None = Field(None, ge=0)
    power_limit_w: float | None = Field(None, ge=0, description="Enforced power limit")
    temperature_c: int | None = None
    processes: tuple[GpuProcess, ...] = ()

    @model_validator(mode="after")
    def _memory_fits(self) -> GpuSnapshot:
        if self.memory_used_mib > self.memory_total_mib or self.memory_free_mib > self.memory_total_mib:
            used, free, total = self.memory_used_mib, self.memory_free_mib, self.memory_total_mib
            raise ValueError(f"memory used {used} / free {free} MiB exceed total {total} MiB")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form with the field names above (what a fake GPU file holds)."""
        return self.model_dump(mode="json")


def samples_within(samples: Sequence[tuple[float, int]], t0: float, t1: float) -> list[int]:
    """The percents of stamped utilisation samples ((unix s, percent), oldest first, as
    ``Inventory.utilization_samples`` gives them in seconds) whose whole period lies in
    [t0, t1]: a sample is stamped at its period's end, and the period is the median gap
    between samples. [] with fewer than two samples to judge the period by."""
    gaps = sorted(b[0] - a[0] for a, b in zip(samples, samples[1:]) if b[0] > a[0])
    if not gaps:
        return []
    period = gaps[len(gaps) // 2]
    return [u for t, u in samples if t - period >= t0 - 1e-3 and t <= t1]


def snapshots_to_json(snapshots: Sequence[GpuSnapshot]) -> str:
    """The form ``fleet gpus --json`` prints; readable back by FakeInventory."""
    return json.dumps([s.to_dict() for s in snapshots], indent=2, ensure_ascii=False)


class Inventory(abc.ABC):
    """Where snapshots come from. ``snapshot()`` never raises for a host without GPUs."""

    @abc.abstractmethod
    def snapshot(self) -> list[GpuSnapshot]:
        """Every GPU of the host now, sorted by index; [] when there are none."""

    def close(self) -> None:  # noqa: B027 - optional hook; most inventories hold nothing
        """Release whatever the inventory holds (NVML handle)."""

    def utilization_samples(self, index: int, since_us: int = 0) -> list[tuple[int, int]]:
        """The driver's own utilisation samples of GPU ``index`` taken after ``since_us``:
        (unix time in microseconds, percent busy over the driver's sample period) pairs, oldest
        first. [] where the inventory keeps no such buffer (fakes, old drivers)."""
        return []

    def __enter__(self) -> Inventory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- NVML --------------------------------------------------------------------------------
def _load_pynvml() -> Any:
    """pynvml, imported on first use so that importing fleet never loads the driver library."""
    import pynvml

    return pynvml


def _text(value: Any) -> str:
    # Old pynvml releases return bytes for strings, new ones str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _proc_user(pid: int) -> str | None:
    """Owner of /proc/<pid>: user name, or the uid as text where the uid has no passwd entry."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _proc_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None


def _try(nvml: Any, fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args), or None where the driver does not support it: one unsupported query (power on
    some boards, utilisation under MIG) costs only its own field, never the snapshot."""
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None


class NvmlInventory(Inventory):
    """Snapshots read from NVML. NVML is initialised on the first snapshot and kept until close().

    Without the library, the driver or any GPU (a laptop, a CPU node, this CI), every
    snapshot is [] and nothing raises: such a host simply has no GPUs.
    """

    def __init__(self) -> None:
        self._nvml: Any = None  # the pynvml module once nvmlInit succeeded

    def _ensure_init(self) -> Any:
        if self._nvml is not None:
            return self._nvml
        try:
            nvml = _load_pynvml()
        except ImportError:
            log.debug("pynvml (nvidia-ml-py) is not installed: no GPUs")
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            # Retried on the next snapshot: a driver that was loading may be up by then.
            log.debug("NVML unavailable (%s): no GPUs", e)
            return None
        self._nvml = nvml
        return nvml

    def close(self) -> None:
        if self._nvml is not None:
            nvml, self._nvml = self._nvml, None
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as e:  # shutting down must not fail the caller
                log.debug("nvmlShutdown failed: %s", e)

    def snapshot(self) -> list[GpuSnapshot]:
        nvml = self._ensure_init()
        if nvml is None:
            return []
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as e:
            log.warning("NVML cannot count GPUs (%s): reporting none", e)
            return []
        snaps = []
        for i in range(count):
            snap = self._device(nvml, i)
            if snap is not None:
                snaps.append(snap)
        return snaps

    def utilization_samples(self, index: int, since_us: int = 0) -> list[tuple[int, int]]:
        # nvmlDeviceGetSamples reads the driver's ring of utilisation samples, one per its
        # internal period (1/6 s to 1 s by product), each stamped: a window shorter than the
        # period that nvmlDeviceGetUtilizationRates averages over is then judged by the samples
        # inside it, not by a reading that mostly covers what came before.
        nvml = self._ensure_init()
        if nvml is None:
            return []
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            _, samples = nvml.nvmlDeviceGetSamples(handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, since_us)
        except nvml.NVMLError as e:  # NOT_FOUND: no sample since since_us; others: not supported
            log.debug("NVML utilisation samples of GPU %d: %s", index, e)
            return []
        return sorted((int(x.timeStamp), int(x.sampleValue.uiVal)) for x in samples if x.timeStamp > since_us)

    def _device(self, nvml: Any, index: int) -> GpuSnapshot | None:
        def field(fn: Callable[..., T], *args: Any) -> T | None:
            return _try(nvml, fn, *args)

        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as e:
            # Placement cannot judge a GPU without its memory; leave it out rather than
            # report invented numbers.
            log.warning("GPU %d: NVML gives no handle or memory info (%s): left out", index, e)
            return None
        util = field(nvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = field(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = field(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        temp = field(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        return GpuSnapshot(
            index=index,
            uuid=_text(field(nvml.nvmlDeviceGetUUID, handle) or f"unknown-{index}"),
            name=_text(field(nvml.nvmlDeviceGetName, handle) or "unknown"),
            memory_total_mib=int(mem.total) // _MIB,
            memory_used_mib=int(mem.used) // _MIB,
            memory_free_mib=int(mem.free) // _MIB,
            utilization_pct=None if util is None else int(util.gpu),
            power_w=None if power_mw is None else power_mw / 1000.0,
            power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
            temperature_c=None if temp is None else int(temp),
            processes=self._processes(nvml, handle),
        )

    def _processes(self, nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
        found: dict[int, GpuProcess] = {}
        # Graphics contexts hold memory too; a colleague's visualisation counts as usage.
        for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for p in _try(nvml, query, handle) or []:
                pid = int(p.pid)
                if pid in found:
                    continue
                used = getattr(p, "usedGpuMemory", None)  # None: NVML_VALUE_NOT_AVAILABLE (pynvml maps it)
                nvml_name = _try(nvml, nvml.nvmlSystemGetProcessName, pid)
                found[pid] = GpuProcess(
                    pid=pid,
                    used_mib=None if used is None else int(used) // _MIB,
                    user=_proc_user(pid),
                    name=_text(nvml_name) if nvml_name else _proc_name(pid),
                )
        return tuple(sorted(found.values(), key=lambda p: p.pid))


# ---- fake ----------------------------------------------------------------------------------
_FAKE_ADAPTER = TypeAdapter(list[GpuSnapshot])


VIEW_ONLY = ("fleet_workers", "placement")  # keys `fleet gpus --json` adds to a GPU (fleet.gpu_view)


class FakeInventory(Inventory):
    """Snapshots from a JSON file: a list of GPU objects with GpuSnapshot's field names.

    ``processes`` and the optional telemetry fields may be left out. The file is read
    again on every snapshot() so a test can change the GPUs under a running process;
    replace it atomically (write a temporary file, rename it over) or a reader may see it
    half-written and raise.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def snapshot(self) -> list[GpuSnapshot]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot read fake GPU file ({e.strerror or e})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{self.path}: fake GPU file is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise ConfigError(f"{self.path}: fake GPU file must hold a list of GPU objects, not {type(data).__name__}")
        # `fleet gpus --json`'s list reads back as it is: what that view adds to each GPU (the
        # fleet's workers on it, the placement's verdict) is the fleet's, not the GPU's.
        data = [{k: v for k, v in g.items() if k not in VIEW_ONLY} if isinstance(g, dict) else g for g in data]
        try:
            snaps = _FAKE_ADAPTER.validate_python(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = list(err["loc"])
            where = f"GPU entry {loc[0]}" if loc and isinstance(loc[0], int) else "GPU list"
            field = ".".join(str(p) for p in loc[1:])
            raise ConfigError(f"{self.path}: {where}: {field + ': ' if field else ''}{err['msg']}") from e
        indices = [s.index for s in snaps]
        dupes = sorted({i for i in indices if indices.count(i) > 1})
        if dupes:
            raise ConfigError(f"{self.path}: GPU index {dupes[0]} appears more than once")
        return sorted(snaps, key=lambda s: s.index)


def inventory_from_env(env: Mapping[str, str] | None = None) -> Inventory:
    """FakeInventory when FLEET_FAKE_GPUS names a file, else NvmlInventory."""
    env = os.environ if env is None else env
    fake = env.get(FAKE_GPUS_ENV, "").strip()
    return FakeInventory(fake) if fake else NvmlInventory()
