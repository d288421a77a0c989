"""Routing: which queue a sample goes to, which queues a worker takes, and where a sample
goes after running out of memory. Queues are tagged by what a task needs (see
fleet.contract.queue_name): pinned GPUs, several GPUs, a memory class, or any GPU.
Memory in MiB."""

from __future__ import annotations

from collections.abc import Iterable

from fleet.contract import queue_name
from fleet.errors import ConfigError, PlacementError
from fleet.gpu_inventory import GpuSnapshot
from fleet.placement import PlacementPolicy, gib, in_pool


def shared_queue(namespace: str) -> str:
    """The queue of samples any single GPU (or a CPU worker) may run."""
    return queue_name(namespace, "gpu")


def memory_queue(namespace: str, class_mib: int) -> str:
    """The queue of samples of memory class ``class_mib``: GPUs with at least that much memory."""
    return queue_name(namespace, f"mem{class_mib}")


def group_queue(namespace: str, n_gpus: int) -> str:
    """The queue of samples that hold ``n_gpus`` GPUs of one host at once."""
    return queue_name(namespace, f"gpus{n_gpus}")


def pin_queue(namespace: str, gpus: Iterable[int]) -> str:
    """The queue of samples pinned to exactly these GPUs."""
    return queue_name(namespace, pin_need(gpus))


COMMANDS_TAG = "cmd."  # the twin queues of shell commands: <ns>.q.cmd.<need>


def commands_twin(namespace: str, queue: str) -> str:
    """The queue of shell commands with the same need as ``queue``: only workers started
    with --allow-commands consume it, so a locked worker never even receives a command."""
    prefix = queue_name(namespace, "")
    need = queue[len(prefix):] if queue.startswith(prefix) else queue
    return need if need.startswith(prefix + COMMANDS_TAG) else prefix + COMMANDS_TAG + need


def untwinned(namespace: str, queue: str) -> tuple[str, bool]:
    """(the plain queue of ``queue``, whether ``queue`` is a commands twin)."""
    twin = queue_name(namespace, COMMANDS_TAG)
    if queue.startswith(twin):
        return queue_name(namespace, queue[len(twin):]), True
    return queue, False


def all_queues_prefix(namespace: str) -> str:
    """What every queue name of the namespace starts with."""
    return queue_name(namespace, "")


def _classes(memory_classes: Iterable[int]) -> list[int]:
    classes = sorted(set(memory_classes))
    if any(not isinstance(c, int) or c <= 0 for c in classes):
        raise ConfigError(f"memory classes must be positive MiB integers, got {classes}")
    return classes


def memory_class_for(memory_mib: int, classes: Iterable[int]) -> int:
    """The smallest class (MiB) holding ``memory_mib``; PlacementError when none does."""
    ordered = _classes(classes)
    for c in ordered:
        if c >= memory_mib:
            return c
    largest = gib(ordered[-1]) if ordered else "none configured"
    raise PlacementError(f"a sample declaring {gib(memory_mib)} exceeds the largest memory class ({largest})")


def next_memory_class(current: int, classes: Iterable[int]) -> int | None:
    """The next class above ``current`` MiB (where a sample goes after an OOM); None at the top."""
    return next((c for c in _classes(classes) if c > current), None)


def pin_need(gpus: Iterable[int]) -> str:
    """The queue need of samples pinned to these GPUs: ``pin.0-1``.

    Named by the GPU set, not the category, so category names (spaces, commas, any
    script) never reach a queue name, and categories pinned alike share one queue.
    """
    return "pin." + "-".join(str(g) for g in sorted(set(gpus)))


def queue_for_sample(category: str, memory_mib: int, policy: PlacementPolicy, namespace: str,
                     memory_classes: Iterable[int], n_gpus: int = 1, runs_commands: bool = False) -> str:
    """Where the producer publishes a sample: pinned GPUs, multi-GPU, memory class, or shared
    (the commands twin of that queue for a kind that runs shell commands)."""
    q = _plain_queue_for_sample(category, memory_mib, policy, namespace, memory_classes, n_gpus)
    return commands_twin(namespace, q) if runs_commands else q


def _plain_queue_for_sample(category: str, memory_mib: int, policy: PlacementPolicy, namespace: str,
                            memory_classes: Iterable[int], n_gpus: int) -> str:
    if category in policy.assignment:
        return pin_queue(namespace, policy.assignment[category])
    if n_gpus > 1:
        return group_queue(namespace, n_gpus)
    classes = list(memory_classes)
    if classes and memory_mib > 0:
        return memory_queue(namespace, memory_class_for(memory_mib, classes))
    return shared_queue(namespace)


def queues_for_gpu(
    gpu_index: int, snapshot: GpuSnapshot, policy: PlacementPolicy, namespace: str, memory_classes: Iterable[int],
    allow_commands: bool = False,
) -> list[str]:
    """Queues a worker on this GPU consumes, most specific first.

    A GPU pinned in ``policy.assignment`` is dedicated to its categories (seed 000's manual
    assignment): it consumes only ``<ns>.q.pin.<category>``. Any other GPU consumes the
    memory-class queues ``<ns>.q.mem<MiB>`` whose class fits its total memory (largest
    first) and the shared ``<ns>.q.gpu``. Raises PlacementError for a GPU the policy rules out.
    Classes compare with the total NVML reports, below the nominal size (an "80 GB" H100: 81559 MiB).
    """
    if snapshot.index != gpu_index:
        raise PlacementError(f"snapshot of GPU {snapshot.index} given for GPU {gpu_index}")
    if not in_pool(gpu_index, policy):
        raise PlacementError(f"GPU {gpu_index} is excluded or outside the GPU pool {policy.gpus}")
    return queues_for_worker(namespace, (gpu_index,), policy, memory_classes, snapshot.memory_total_mib, allow_commands)


def queues_for_worker(namespace: str, gpus: tuple[int, ...], policy: PlacementPolicy, memory_classes: Iterable[int],
                      memory_total_mib: int | None = None, allow_commands: bool = False) -> list[str]:
    """What a worker holding ``gpus`` consumes unless told, most specific first; with
    ``allow_commands`` each queue is followed by its commands twin."""
    qs = _queues_for_worker(namespace, gpus, policy, memory_classes, memory_total_mib)
    return [x for q in qs for x in ((q, commands_twin(namespace, q)) if allow_commands else (q,))]


def _queues_for_worker(namespace: str, gpus: tuple[int, ...], policy: PlacementPolicy, memory_classes: Iterable[int],
                       memory_total_mib: int | None = None) -> list[str]:
    """What a worker holding ``gpus`` consumes unless told, most specific first.

    A CPU worker (``()``) takes every memory class (it has no GPU memory to run out of)
    and the shared queue; a worker of several GPUs takes the queue of samples needing that
    many; a pinned GPU only its pins; any other GPU the memory classes that fit
    ``memory_total_mib`` (all when unknown) and the shared queue.
    """
    classes = list(reversed(_classes(memory_classes)))
    if len(gpus) > 1:
        return [group_queue(namespace, len(gpus))]
    if gpus:
        pinned = sorted({pin_need(g) for g in policy.assignment.values() if gpus[0] in g})
        if pinned:
            return [queue_name(namespace, need) for need in pinned]
    fits = [c for c in classes if memory_total_mib is None or c <= memory_total_mib]
    return [memory_queue(namespace, c) for c in fits] + [shared_queue(namespace)]


def queue_after_oom(queue: str, memory_mib: int, namespace: str, memory_classes: Iterable[int]) -> str | None:
    """Where a sample goes after running out of memory on ``queue``: the next larger memory
    class, or None when there is none (the sample then fails as OOM)."""
    queue, twin = untwinned(namespace, queue)
    if twin:
        moved = queue_after_oom(queue, memory_mib, namespace, memory_classes)
        return commands_twin(namespace, moved) if moved is not None else None
    classes = list(memory_classes)
    if not classes:
        return None
    prefix = queue_name(namespace, "mem")
    if queue.startswith(prefix) and queue[len(prefix):].isdigit():
        current = int(queue[len(prefix):])
    elif queue == shared_queue(namespace):
        current = memory_class_for(memory_mib, classes) if memory_mib <= max(classes) else max(classes)
    else:
        return None  # pinned and multi-GPU samples stay where the user put them
    nxt = next_memory_class(current, classes)
    return memory_queue(namespace, nxt) if nxt is not None else None
