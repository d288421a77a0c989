"""How a worker process is started: its command line and environment.

The environment is decided here, before the worker's Python starts, so that
``CUDA_VISIBLE_DEVICES`` is in place before anything could import torch and the
worker's GPU indices agree with NVML's (PCI bus order).
"""

from __future__ import annotations

import os
import sys

from fleet.contract import queue_name
from fleet.errors import PlacementError
from fleet.gpu_inventory import FAKE_GPUS_ENV, GpuSnapshot
from fleet.routing import pin_need, queues_for_gpu
from fleet.settings import FleetSettings


def worker_command(
    settings: FleetSettings,
    *,
    gpu: int | None = None,
    gpus: str | None = None,
    cpu: bool = False,
    slot: int = 0,
    queues: list[str] | None = None,
    device: str = "auto",
    snapshot: GpuSnapshot | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and env of ``python -m workers.main`` for one worker.

    ``snapshot`` (of the worker's GPU) lets the default queues include the memory classes
    that fit the card.
    """
    chosen = [x for x in (gpu is not None, gpus is not None, cpu) if x]
    if len(chosen) != 1:
        raise PlacementError("fleet worker: give exactly one of --gpu N, --gpus N,M or --cpu")
    env = dict(os.environ)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["OMP_NUM_THREADS"] = str(settings.torch_threads)
    env["MKL_NUM_THREADS"] = str(settings.torch_threads)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_DISABLE", "1")  # diffsynth's progress bars would flood the worker log
    if settings.broker_url is None:
        env["FLEET_BROKER_URL"] = settings.effective_broker_url
    if cpu:
        label, name, dev = "cpu", f"cpu{slot}", "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        ids = [gpu] if gpu is not None else _parse_gpus(gpus or "")
        label = ",".join(str(i) for i in ids)
        name = ("gpus" if len(ids) > 1 else "gpu") + "-".join(str(i) for i in ids) + (f"s{slot}" if slot else "")
        env["CUDA_VISIBLE_DEVICES"] = label
        dev = device if device != "auto" else ("cpu" if os.environ.get(FAKE_GPUS_ENV) else "cuda")
    if device != "auto":
        dev = device
    qs = queues or default_queues(settings, None if cpu else [int(x) for x in label.split(",")], snapshot)
    argv = [sys.executable, "-m", "workers.main", "--name", name, "--gpu-label", label, "--device", dev, "--queues", ",".join(qs)]
    return argv, env


def default_queues(settings: FleetSettings, gpus: list[int] | None, snapshot: GpuSnapshot | None) -> list[str]:
    """What a worker consumes unless told: see fleet.placement.queues_for_gpu.

    A CPU worker takes the shared queue and every memory class (it has no GPU memory to
    run out of); a multi-GPU worker takes the queue of tasks needing that many GPUs.
    """
    ns, classes = settings.namespace, settings.memory_classes_mib
    if gpus is None:
        return [queue_name(ns, f"mem{c}") for c in sorted(classes, reverse=True)] + [queue_name(ns, "gpu")]
    if len(gpus) > 1:
        return [queue_name(ns, f"gpus{len(gpus)}")]
    if snapshot is not None and snapshot.index == gpus[0]:
        return queues_for_gpu(gpus[0], snapshot, settings.placement, ns, classes)
    pins = sorted({pin_need(g) for g in settings.placement.assignment.values() if gpus[0] in g})
    if pins:
        return [queue_name(ns, p) for p in pins]
    return [queue_name(ns, f"mem{c}") for c in sorted(classes, reverse=True)] + [queue_name(ns, "gpu")]


def _parse_gpus(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PlacementError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. 0,1") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise PlacementError(f"--gpus {text!r}: give distinct GPU indices, e.g. 0,1")
    return ids
