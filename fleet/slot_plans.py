"""Worker slots per GPU and why: the arithmetic of ``slots: auto``, the measured peaks it
works from, and the supervisor's last decisions as `fleet gpus` shows them. Memory in MiB.

Auto slots (docs/ARCHITECTURE.md, "Auto slots"): a GPU starts with one slot; each of its
workers measures the GPU memory its samples take at their peak (workers/peak_memory.py)
and advertises it in its heartbeat entry (``WorkerEntry.peak_mib``). Once the GPU's workers
have measured ``auto_samples`` samples, it gets
``min(max_slots_per_gpu, floor((free - margin) / peak))`` slots, at least one, where free
counts the fleet's own workers' memory as free and the margin is ``slot_margin_pct`` of the
GPU's memory. Re-checked on every placement cycle, so colleagues coming and going change it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # placement imports this module
    from fleet.contract import WorkerEntry
    from fleet.placement import Decision, PlacementPolicy

PLAN_FILE = "placement.json"  # in the state folder's run/ (fleet.launcher.run_dir), beside workers.json


@dataclass(frozen=True)
class SlotMeasure:
    """What auto slots knows of one GPU: the largest peak its fleet workers measured (None: none
    yet), over how many samples in all, and how many fleet slots run there now."""

    peak_mib: int | None = None
    samples: int = 0
    running: int = 0


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB"


def margin_mib(total_mib: int, policy: PlacementPolicy) -> int:
    """The safety margin auto slots leave free on a GPU of ``total_mib``."""
    return round(total_mib * policy.slot_margin_pct / 100)


def auto_slots(free_mib: int, total_mib: int, policy: PlacementPolicy, m: SlotMeasure | None) -> tuple[int, str]:
    """(slots, why) for one usable GPU in auto mode; ``free_mib`` counts the fleet's own workers'
    memory as free, so the slots computed include the workers already there.

    Shrinking has a band: the slots running now are kept while they fit within half the margin,
    so a colleague whose memory wobbles around a boundary does not start and drain a worker on
    every cycle (each start loads a model).
    """
    m = m or SlotMeasure()
    if m.peak_mib is None or m.samples < policy.auto_samples:
        return 1, f"auto: measuring, {m.samples} of {policy.auto_samples} samples"
    peak = max(1, m.peak_mib)
    margin = margin_mib(total_mib, policy)
    usable = max(0, free_mib - margin)
    fit = usable // peak
    slots = max(1, min(fit, policy.max_slots_per_gpu))
    how = (f"auto: peak {_gib(peak)}/sample measured over {m.samples} samples, {_gib(usable)} usable after "
           f"{_gib(margin)} margin")
    if fit > policy.max_slots_per_gpu:
        how += f", {fit} fit, capped at {policy.max_slots_per_gpu}"
    elif fit < 1:
        how += ", room for none: keeps 1"
    if slots < m.running <= policy.max_slots_per_gpu and m.running * peak <= free_mib - margin // 2:
        slots = m.running
        how += f", keeps {m.running}: they fit within half the margin"
    return slots, how


def measures(workers: Iterable[WorkerEntry], hostname: str, own_pids: Set[int],
             running: Mapping[int, int]) -> dict[int, SlotMeasure]:
    """Per GPU of ``hostname``: the peaks its single-GPU workers advertise, only from this
    supervisor's workers (``own_pids``, leaving ones included: their figure is still true), so a
    stale entry of an earlier fleet never counts; ``running``: fleet slots per GPU now."""
    peaks: dict[int, int] = {}
    samples: dict[int, int] = {}
    for w in workers:
        if w.hostname != hostname or w.pid not in own_pids or len(w.gpus) != 1 or w.peak_mib is None:
            continue
        g = w.gpus[0]
        peaks[g] = max(peaks.get(g, 0), w.peak_mib)
        samples[g] = samples.get(g, 0) + w.peak_samples
    return {g: SlotMeasure(peaks.get(g), samples.get(g, 0), running.get(g, 0)) for g in set(peaks) | set(running)}


# ---- the supervisor's decisions, for `fleet gpus` ---------------------------------------------
def slots_text(d: Mapping[str, Any]) -> str:
    """``3 slots (auto: peak ...)``, or ``no slot: <reason>`` for a GPU the fleet may not use."""
    if d.get("usable"):
        n = d.get("slots", 0)
        return f"{n} slot{'s' if n != 1 else ''} ({d.get('slots_why') or '?'})"
    reason = str(d.get("reason", ""))
    head = f"GPU {d.get('index')}: "
    return "no slot: " + (reason[len(head):] if reason.startswith(head) else reason)


def plan_record(decisions: Iterable[Decision], interval_s: float) -> dict[str, Any]:
    """What the supervisor writes to ``run/PLAN_FILE`` each cycle: its decisions and when."""
    return {"at": time.time(), "interval_s": interval_s, "gpus": [d.to_dict() for d in decisions]}


def read_plans(path: Path, now: float | None = None) -> dict[int, dict[str, Any]]:
    """GPU index -> the supervisor's last decision, if it is recent (five cycles, at least 15 s:
    a supervisor that stopped leaves no stale claim); {} without one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fresh = (now or time.time()) - float(data["at"]) < max(15.0, 5 * float(data["interval_s"]))
        return {int(d["index"]): d for d in data["gpus"]} if fresh else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
