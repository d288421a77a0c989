"""Inline SVG charts for ``fleet report``, drawn here so the page needs no script and no
network: line charts over time, a bar chart of throughput, a timeline of samples per worker.

Every function returns SVG text with each user string escaped. The x axis is unix time
(seconds), labelled in the local time of the machine that made the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
MIXED = "#8c8c8c"  # a timeline bar that joins samples of several groups
WIDTH, LEFT, RIGHT, TOP, BOTTOM = 960, 64, 36, 22, 28  # px
TICK_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800,
                604800)

Point = tuple[float, float | None]  # (unix time, value); None breaks the line


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def fmt(v: float) -> str:
    """A number short enough for an axis label."""
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def nice_max(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k not below ``v`` (1 for nothing to show)."""
    if not v or v <= 0 or not math.isfinite(v):
        return 1.0
    k = 10 ** math.floor(math.log10(v))
    return next(m * k for m in (1, 2, 2.5, 5, 10) if m * k >= v)


def time_ticks(t0: float, t1: float, most: int = 7) -> list[tuple[float, str]]:
    """Round times between t0 and t1 (at most ``most``) with their local-time labels."""
    step = next((s for s in TICK_STEPS_S if (t1 - t0) / s <= most), TICK_STEPS_S[-1])
    form = "%H:%M:%S" if step < 60 else ("%H:%M" if t1 - t0 < 86400 else "%m-%d %H:%M")
    first = math.ceil(t0 / step) * step
    return [(t, time.strftime(form, time.localtime(t))) for t in _frange(first, t1, step)]


def _frange(a: float, b: float, step: float) -> list[float]:
    return [a + i * step for i in range(int((b - a) // step) + 1)] if b >= a else []


@dataclass
class Frame:
    """A plot area: time t0..t1 across, 0..y_max up; maps to SVG pixels."""

    t0: float
    t1: float
    y_max: float
    height: int

    def x(self, t: float) -> float:
        span = (self.t1 - self.t0) or 1.0
        return LEFT + (WIDTH - LEFT - RIGHT) * (t - self.t0) / span

    def y(self, v: float) -> float:
        return TOP + (self.height - TOP - BOTTOM) * (1 - v / self.y_max)

    def axes(self, unit: str, y_ticks: bool = True) -> str:
        """The x axis with time ticks, and (``y_ticks``) the y axis with 4 value ticks in ``unit``."""
        base = self.height - BOTTOM
        parts = [f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}" class="axis"/>']
        for t, label in time_ticks(self.t0, self.t1):
            x = self.x(t)
            parts.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" class="axis"/>'
                         f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{escape(label)}</text>')
        if y_ticks:
            for i in range(5):
                v = self.y_max * i / 4
                y = self.y(v)
                parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>'
                             f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(v))}</text>')
            parts.append(f'<text x="{LEFT - 6}" y="11" text-anchor="end" class="unit">{escape(unit)}</text>')
        return "".join(parts)


def _svg(height: int, body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-label="{escape(label)}" class="chart">{body}</svg>')


def downsample(pts: Sequence[Point], t0: float, t1: float, columns: int) -> list[Point]:
    """At most one point per pixel column: the mean time and value of the column's points; a
    column holding a break (None) keeps it after its point."""
    out: list[Point] = []
    span = (t1 - t0) or 1.0
    col: list[Point] = []

    def flush() -> None:
        vals = [(t, v) for t, v in col if v is not None]
        if vals:
            out.append((sum(t for t, _ in vals) / len(vals), sum(v for _, v in vals) / len(vals)))
        if len(vals) < len(col):
            out.append((col[-1][0], None))

    last = None
    for t, v in pts:
        c = int((t - t0) / span * columns)
        if c != last and col:
            flush()
            col = []
        col.append((t, v))
        last = c
    if col:
        flush()
    return out


def line_chart(lines: Sequence[tuple[str, Sequence[Point]]], t0: float, t1: float, unit: str, label: str,
               y_max: float | None = None, height: int = 170, colors: Mapping[str, str] | None = None,
               before_s: float = 0.0) -> str:
    """One polyline per (name, points), coloured by ``colors[name]`` (else by its place); a None
    value breaks the line, a lone point is a dot. Points before ``t0 - before_s`` or after ``t1``
    are left out; those just before t0 (a bucket that began earlier) are drawn at t0."""
    columns = WIDTH - LEFT - RIGHT
    lines = [(name, [(max(t, t0), v) for t, v in pts if t0 - before_s <= t <= t1]) for name, pts in lines]
    lines = [(name, pts if len(pts) <= columns else downsample(pts, t0, t1, columns)) for name, pts in lines]
    values = [v for _, pts in lines for _, v in pts if v is not None]
    f = Frame(t0, t1, y_max or nice_max(max(values, default=0.0)), height)
    body = [f.axes(unit)]
    for i, (name, pts) in enumerate(lines):
        c = (colors or {}).get(name, color(i))
        runs: list[list[str]] = [[]]
        for t, v in pts:
            if v is None:
                runs.append([])
            else:
                runs[-1].append(f"{f.x(t):.1f},{f.y(min(v, f.y_max)):.1f}")
        for run in runs:
            if len(run) == 1:
                x, y = run[0].split(",")
                body.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{c}"><title>{escape(name)}</title></circle>')
            elif run:
                body.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{c}" stroke-width="1.5">'
                            f'<title>{escape(name)}</title></polyline>')
    return _svg(height, "".join(body), label)


def bar_chart(start: float, bucket_s: float, counts: Sequence[float], unit: str, label: str, height: int = 180) -> str:
    """One bar per bucket of ``bucket_s`` seconds from ``start``."""
    f = Frame(start, start + bucket_s * max(1, len(counts)), nice_max(max(counts, default=0)), height)
    body = [f.axes(unit)]
    for i, c in enumerate(counts):
        x0, x1 = f.x(start + i * bucket_s), f.x(start + (i + 1) * bucket_s)
        y = f.y(c)
        when = time.strftime("%H:%M:%S", time.localtime(start + i * bucket_s))
        body.append(f'<rect x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" '
                    f'height="{f.y(0) - y:.1f}" fill="{color(0)}"><title>{escape(when)}: {fmt(c)}</title></rect>')
    return _svg(height, "".join(body), label)


@dataclass
class Bar:
    """A sample on the timeline: from ``start`` to ``end`` (unix s), coloured by its group."""

    start: float
    end: float
    color: str
    title: str
    n: int = 1


def _thin(bars: Sequence[Bar], px_s: float) -> list[Bar]:
    """Bars closer than a pixel joined into one, so 100,000 samples draw a bounded number of rects."""
    out: list[Bar] = []
    for b in sorted(bars, key=lambda b: b.start):
        last = out[-1] if out else None
        if last is not None and b.start - last.end <= px_s:
            last.end = max(last.end, b.end)
            last.n += 1
            last.color = last.color if last.color == b.color else MIXED
            last.title = f"{last.n} samples"
        else:
            out.append(Bar(b.start, b.end, b.color, b.title))
    return out


def timeline(rows: Mapping[str, Sequence[Bar]], t0: float, t1: float, label: str, row_px: int = 22) -> str:
    """One row per worker, one bar per sample; the gaps are where the worker ran nothing."""
    height = TOP + BOTTOM + row_px * max(1, len(rows))
    f = Frame(t0, t1, 1.0, height)
    plot_px = WIDTH - LEFT - RIGHT
    px_s = ((t1 - t0) or 1.0) / plot_px
    body = [f.axes("", y_ticks=False)]
    for i, (worker, bars) in enumerate(rows.items()):
        y = TOP + i * row_px
        body.append(f'<text x="{LEFT - 6}" y="{y + row_px * 0.65:.1f}" text-anchor="end" class="lane">'
                    f'{escape(worker[:24])}<title>{escape(worker)}</title></text>'
                    f'<rect x="{LEFT}" y="{y + 2}" width="{plot_px}" height="{row_px - 4}" class="idle"/>')
        drawn = bars if len(bars) <= plot_px // 2 else _thin(bars, px_s)
        for b in drawn:
            x0, x1 = f.x(b.start), f.x(b.end)
            body.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(0.8, x1 - x0):.1f}" height="{row_px - 6}" '
                        f'fill="{b.color}"><title>{escape(b.title)}</title></rect>')
    return _svg(height, "".join(body), label)


def legend(items: Sequence[tuple[str, str]]) -> str:
    """HTML: a coloured square and the escaped name of each (name, colour)."""
    return "".join(f'<span class="key"><i style="background:{c}"></i>{escape(n)}</span>' for n, c in items)
