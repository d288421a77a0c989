"""``fleet gpus --watch``: the GPUs, refreshed until Ctrl-C, each with its utilisation (%),
memory (MiB), power (W), temperature (C), the fleet workers on it and a sparkline of its
utilisation over the last minutes.

This host's GPUs come from its own NVML snapshot (the freshest figures); GPUs that only the
Redis series know (other hosts, or a host without NVML such as a login node) come from their
newest series point (fleet.gpu_series). The sparkline is the Redis series when the fleet's
Redis answers, else the readings this watch took itself. ``--json`` prints one JSON object a
refresh, one line each.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any

import redis

from fleet import gpu_series
from fleet.contract import Keys, WorkerEntry
from fleet.gpu_inventory import Inventory
from fleet.gpu_view import live_workers

HISTORY_S = 300.0  # the sparkline's span: the last five minutes
SPARK_WIDTH = 20  # characters of the sparkline (15 s each over five minutes)
_BARS = "▁▂▃▄▅▆▇█"


@dataclass
class GpuRow:
    """One GPU at one refresh. Units: %, MiB, W, C; None where not known."""

    host: str
    index: int
    name: str | None
    util_pct: float | None
    mem_used_mib: int | None
    mem_total_mib: int | None
    power_w: float | None
    temp_c: float | None
    source: str  # "nvml": this host's snapshot; "series": the newest point in Redis
    workers: list[WorkerEntry] = field(default_factory=list)
    history: list[tuple[float, float | None]] = field(default_factory=list)  # (unix time, util %), oldest first

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host, "index": self.index, "name": self.name, "util_pct": self.util_pct,
            "mem_used_mib": self.mem_used_mib, "mem_total_mib": self.mem_total_mib, "power_w": self.power_w,
            "temp_c": self.temp_c, "source": self.source,
            "fleet_workers": [{"name": w.name, "pid": w.pid, "gpus": list(w.gpus), "sample_id": w.sample_id,
                               "group": w.group, "label": w.label, "progress": w.progress} for w in self.workers],
            "util_history": [[round(t, 3), u] for t, u in self.history],
        }


@dataclass
class Frame:
    """What one refresh shows."""

    t: float
    rows: list[GpuRow]
    cpu_workers: list[str]
    redis_ok: bool  # the series and workers come from Redis

    def as_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "host": socket.gethostname(), "redis": self.redis_ok,
                "gpus": [r.as_dict() for r in self.rows], "cpu_workers": self.cpu_workers}


class Watch:
    """Takes frames: this host's inventory, the fleet's Redis (None: unreachable) and the
    settings' heartbeat (s, for which workers are live) and series bucket (s, for which
    series are current)."""

    def __init__(self, inventory: Inventory, client: redis.Redis | None, namespace: str, heartbeat_s: float,
                 bucket_s: float = gpu_series.BUCKET_S, history_s: float = HISTORY_S) -> None:
        self.inventory = inventory
        self.client = client
        self.keys = Keys(namespace)
        self.namespace = namespace
        self.heartbeat_s = heartbeat_s
        self.bucket_s = bucket_s
        self.history_s = history_s
        self.host = socket.gethostname()
        # This watch's own readings of this host's GPUs: the sparkline when Redis has none.
        self._local: dict[int, deque[tuple[float, float | None]]] = {}

    def frame(self) -> Frame:
        now = time.time()
        snaps = self.inventory.snapshot()
        for s in snaps:
            hist = self._local.setdefault(s.index, deque())
            hist.append((now, None if s.utilization_pct is None else float(s.utilization_pct)))
            while hist and hist[0][0] < now - self.history_s:
                hist.popleft()
        workers: list[WorkerEntry] = []
        series: dict[str, list[gpu_series.GpuPoint]] = {}
        redis_ok = self.client is not None
        if self.client is not None:
            try:
                workers = live_workers(self.client, self.namespace, self.heartbeat_s, every_host=True)
                series = gpu_series.read(self.client, self.keys, since=now - self.history_s)
            except (redis.RedisError, OSError):
                redis_ok, workers, series = False, [], {}  # shown as such; the next refresh tries again
        rows = []
        for s in snaps:
            points = series.get(gpu_series.series_name(self.host, s.index))
            rows.append(GpuRow(
                self.host, s.index, s.name, None if s.utilization_pct is None else float(s.utilization_pct),
                s.memory_used_mib, s.memory_total_mib, s.power_w,
                None if s.temperature_c is None else float(s.temperature_c), "nvml",
                _on(workers, self.host, s.index),
                [(p.t, p.util_pct) for p in points] if points else list(self._local[s.index])))
        local = {gpu_series.series_name(self.host, s.index) for s in snaps}
        stale_s = max(30.0, 3 * self.bucket_s)  # a series no worker has written lately: its GPU left the fleet
        for name, points in sorted(series.items()):
            if name in local or not points or now - points[-1].t > stale_s + self.bucket_s:
                continue
            host, _, index = name.rpartition("/")
            p = points[-1]
            rows.append(GpuRow(host, int(index), None, p.util_pct, p.mem_used_mib, p.mem_total_mib, p.power_w,
                               p.temp_c, "series", _on(workers, host, int(index)),
                               [(q.t, q.util_pct) for q in points]))
        cpu = [w.name for w in workers if not w.gpus]
        return Frame(now, rows, cpu, redis_ok)


def _on(workers: list[WorkerEntry], host: str, index: int) -> list[WorkerEntry]:
    return [w for w in workers if w.hostname == host and index in w.gpus]


def sparkline(history: list[tuple[float, float | None]], now: float, span_s: float = HISTORY_S,
              width: int = SPARK_WIDTH) -> str:
    """Utilisation (%) over the last ``span_s`` seconds as ``width`` bars, oldest left; a blank
    where no reading fell."""
    slots: list[list[float]] = [[] for _ in range(width)]
    for t, u in history:
        i = int((t - (now - span_s)) / span_s * width)
        if u is not None and 0 <= i < width:
            slots[i].append(u)
        elif u is not None and i == width:  # a point of this very moment
            slots[-1].append(u)
    out = []
    for vals in slots:
        if not vals:
            out.append(" ")
        else:
            u = sum(vals) / len(vals)
            out.append(_BARS[min(len(_BARS) - 1, max(0, int(u / 100 * len(_BARS))))])
    return "".join(out)


def render(frame: Frame, span_s: float = HISTORY_S) -> Any:
    """A rich renderable of ``frame``: the table, then what is not in it."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    # Narrow enough for an 80-column terminal: units in the headers, the GPU's model left to `fleet gpus`.
    t = Table(title=f"fleet GPUs, {time.strftime('%H:%M:%S', time.localtime(frame.t))}")
    for col in ("GPU", "util %", "memory MiB", "W", "C"):
        t.add_column(col, justify="left" if col == "GPU" else "right")
    t.add_column(f"util, last {span_s / 60:.0f} min", no_wrap=True, min_width=SPARK_WIDTH)  # others wrap first
    t.add_column("fleet workers")
    for r in frame.rows:
        mem = "-" if r.mem_used_mib is None else f"{r.mem_used_mib}/{r.mem_total_mib or '?'}"
        ws = "\n".join(escape(f"{w.name} " + (f"running {w.label or w.group} {(w.sample_id or '')[:12]}"
                                              + (f" {w.progress:.0%}" if w.progress is not None else "")
                                              if w.sample_id else "idle")) for w in r.workers) or "-"
        t.add_row(escape(f"{r.host}/{r.index}"), fmt(r.util_pct), mem, fmt(r.power_w), fmt(r.temp_c),
                  sparkline(r.history, frame.t, span_s), ws)
    notes = []
    if not frame.rows:
        notes.append("no GPU found here, and no GPU series in Redis")
    if frame.cpu_workers:
        notes.append("CPU workers: " + ", ".join(frame.cpu_workers))
    if not frame.redis_ok:
        notes.append("no fleet reachable: this host's readings only, workers not shown")
    notes.append("Ctrl-C to stop")
    return Group(t, *(Text(n) for n in notes))


def run(watch: Watch, interval_s: float, count: int | None = None, as_json: bool = False,
        out: IO[str] | None = None) -> int:
    """Refresh every ``interval_s`` seconds until Ctrl-C or ``count`` refreshes; returns how
    many were shown."""
    out = out or sys.stdout
    shown = 0
    try:
        if as_json:
            while True:
                out.write(json.dumps(watch.frame().as_dict(), ensure_ascii=False) + "\n")
                out.flush()  # a reader of the pipe gets each refresh as it happens
                shown += 1
                if count is not None and shown >= count:
                    return shown
                time.sleep(interval_s)
        from rich.console import Console
        from rich.live import Live

        console = Console(file=out)
        try:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while count is None or shown < count:
                    if shown:
                        time.sleep(interval_s)
                    live.update(render(watch.frame(), watch.history_s), refresh=True)
                    shown += 1
        finally:
            if not console.is_terminal:
                console.line()  # Live ends a terminal's last line itself, a pipe's not
        return shown
    except KeyboardInterrupt:  # the way to stop it: not an error
        return shown
