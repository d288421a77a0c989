"""How a worker process is started: its command line and environment.

The environment is decided here, before the worker's Python starts, so that
``CUDA_VISIBLE_DEVICES`` is in place before anything could import torch and the
worker's GPU indices agree with NVML's (PCI bus order). A worker's GPUs are one value
everywhere (supervisor, this module, the worker, its heartbeat entry, `fleet gpus`): a
tuple of NVML indices, ``()`` for a CPU worker.
"""

from __future__ import annotations

import os
import sys

from fleet.errors import PlacementError
from fleet.gpu_inventory import FAKE_GPUS_ENV, GpuSnapshot
from fleet.routing import queues_for_gpu, queues_for_worker
from fleet.settings import FleetSettings


def worker_name(gpus: tuple[int, ...], slot: int = 0) -> str:
    """``cpu0``, ``gpu3``, ``gpu3s1`` (second slot on GPU 3), ``gpus0-1`` (a group)."""
    if not gpus:
        return f"cpu{slot}"
    return ("gpus" if len(gpus) > 1 else "gpu") + "-".join(map(str, gpus)) + (f"s{slot}" if slot else "")


def gpus_arg(gpus: tuple[int, ...]) -> str:
    """The GPUs as the worker's command line and CUDA_VISIBLE_DEVICES write them: ``0,1`` (``""``: none)."""
    return ",".join(map(str, gpus))


def parse_gpus(text: str, flag: str = "--gpus") -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``; PlacementError for anything but distinct non-negative indices."""
    try:
        ids = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise PlacementError(f"{flag} {text!r}: give GPU indices separated by commas, e.g. 0,1") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise PlacementError(f"{flag} {text!r}: give distinct GPU indices, e.g. 0,1")
    return ids


def torch_threads(settings: FleetSettings, gpus: tuple[int, ...], host_workers: int) -> int:
    """CPU threads the worker's torch may use: ``settings.torch_threads``, or with 0 (auto) 1 for a
    CPU worker (several share a small host: more would slow them all 10-50x) and, for a GPU
    worker, the host's CPUs divided among the ``host_workers`` workers on it (at least 1): a
    video sample's tiled VAE blending and frame conversion run on the CPU between GPU work,
    and one thread left an H200 idle half the time (docs/BENCHMARKS.md)."""
    if settings.torch_threads:
        return settings.torch_threads
    if not gpus:
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, host_workers))


def worker_command(
    settings: FleetSettings,
    gpus: tuple[int, ...],
    *,
    slot: int = 0,
    queues: list[str] | None = None,
    device: str = "auto",
    snapshot: GpuSnapshot | None = None,
    host_workers: int = 1,
) -> tuple[list[str], dict[str, str]]:
    """argv and env of ``python -m workers.main`` for one worker holding ``gpus`` (``()``: CPU).

    ``snapshot`` (of the worker's GPU) lets the default queues include the memory classes
    that fit the card; ``host_workers``: how many workers the host runs (auto torch threads).
    """
    env = dict(os.environ)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_DISABLE", "1")  # diffsynth's progress bars would flood the worker log
    if settings.broker_url is None:
        env["FLEET_BROKER_URL"] = settings.effective_broker_url
    env["FLEET_ALLOW_COMMANDS"] = "true" if settings.allow_commands else "false"
    env["CUDA_VISIBLE_DEVICES"] = gpus_arg(gpus)
    if device == "auto":
        device = "cpu" if not gpus or os.environ.get(FAKE_GPUS_ENV) else "cuda"
    # a worker computing on the CPU (fake GPUs in tests, --device cpu) counts as a CPU worker
    threads = torch_threads(settings, gpus if device != "cpu" else (), host_workers)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = env["FLEET_TORCH_THREADS"] = str(threads)
    qs = queues or default_queues(settings, gpus, snapshot)
    argv = [sys.executable, "-m", "workers.main", "--name", worker_name(gpus, slot), "--gpus", gpus_arg(gpus),
            "--device", device, "--queues", ",".join(qs)]
    return argv, env


def default_queues(settings: FleetSettings, gpus: tuple[int, ...], snapshot: GpuSnapshot | None) -> list[str]:
    """What a worker consumes unless told: see fleet.routing.queues_for_worker."""
    ns, classes = settings.namespace, settings.memory_classes_mib
    if len(gpus) == 1 and snapshot is not None and snapshot.index == gpus[0]:
        return queues_for_gpu(gpus[0], snapshot, settings.placement, ns, classes, settings.allow_commands)
    return queues_for_worker(ns, gpus, settings.placement, classes, allow_commands=settings.allow_commands)
