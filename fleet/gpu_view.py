"""``fleet gpus``: the host's GPUs as nvidia-smi shows them, plus the fleet workers on each,
the sample each is running, and the slots the supervisor gives each GPU and why."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from typing import Any

import redis

from fleet.contract import Keys, WorkerEntry
from fleet.gpu_inventory import GpuSnapshot
from fleet.slot_plans import slots_text


def live_workers(client: redis.Redis | None, namespace: str, heartbeat_s: float,
                 every_host: bool = False) -> list[WorkerEntry]:
    """Workers of this host (of every host with ``every_host``) whose heartbeat is recent
    (3 beats, at least 15 s)."""
    if client is None:
        return []
    host = None if every_host else socket.gethostname()
    now = time.time()
    out = []
    for raw in client.hvals(Keys(namespace).workers):
        try:
            w = WorkerEntry.model_validate_json(raw)
        except ValueError:
            continue  # an entry of an older fleet version
        if host in (None, w.hostname) and now - w.seen_at < max(15.0, 3 * heartbeat_s):
            out.append(w)
    return sorted(out, key=lambda w: w.name)


def on_gpu(workers: list[WorkerEntry], index: int) -> list[WorkerEntry]:
    return [w for w in workers if index in w.gpus]


def as_json(snaps: list[GpuSnapshot], workers: list[WorkerEntry],
            plans: Mapping[int, Mapping[str, Any]] | None = None) -> str:
    """``plans``: the supervisor's decision per GPU (fleet.slot_plans.read_plans); each GPU's
    ``placement`` is null without one (no fleet up here)."""
    rows = []
    for s in snaps:
        d = s.to_dict()
        d["fleet_workers"] = [{"name": w.name, "pid": w.pid, "gpus": list(w.gpus), "sample_id": w.sample_id,
                               "group": w.group, "label": w.label, "peak_mib": w.peak_mib}
                              for w in on_gpu(workers, s.index)]
        plan = (plans or {}).get(s.index)
        d["placement"] = None if plan is None else {
            "usable": plan.get("usable"), "slots": plan.get("slots"), "why": plan.get("slots_why"),
            "text": slots_text(plan), "reason": plan.get("reason")}
        rows.append(d)
    return json.dumps({"gpus": rows, "cpu_workers": [w.name for w in workers if not w.gpus]}, ensure_ascii=False)


def table(snaps: list[GpuSnapshot], workers: list[WorkerEntry], plans: Mapping[int, Mapping[str, Any]] | None = None):
    """A rich Table with one row per GPU; a slots column when the supervisor's ``plans`` are known."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"GPUs of {socket.gethostname()}")
    cols = ["GPU", "name", "memory used / total", "util", "power", "temp", "processes", "fleet workers"]
    for col in cols + (["slots"] if plans else []):
        t.add_column(col)
    for s in snaps:
        power = "-" if s.power_w is None else f"{s.power_w:.0f} W" + (f" / {s.power_limit_w:.0f} W" if s.power_limit_w else "")
        procs = ", ".join(f"{p.pid} {escape(p.user or '?')} {p.used_mib if p.used_mib is not None else '?'} MiB"
                          for p in s.processes) or "-"
        ws = "\n".join(escape(f"{w.name} " + (f"running {w.label or w.group} {w.sample_id[:12]}" if w.sample_id else "idle"))
                       for w in on_gpu(workers, s.index)) or "-"
        slots = [escape(slots_text(plans[s.index])) if s.index in plans else "-"] if plans else []
        t.add_row(
            str(s.index), escape(s.name), f"{s.memory_used_mib} / {s.memory_total_mib} MiB",
            "-" if s.utilization_pct is None else f"{s.utilization_pct} %", power,
            "-" if s.temperature_c is None else f"{s.temperature_c} C", procs, ws, *slots,
        )
    return t
