"""The figures of ``fleet report``: counts and durations per group, throughput over time,
each worker's busy and idle time, GPU-hours, energy, failures by type.

Pure functions of completion and failure records (fleet.contract), so they are tested on
records built by hand; ``fleet/report_sources.py`` gathers the records, ``report_html.py``
and ``report_charts.py`` draw them. Times are unix seconds, durations seconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleet.contract import CompletionRecord, FailureRecord
from fleet.failure_lists import by_type
from fleet.gpu_series import GpuPoint

REPORT_SCHEMA = "fleet.report/1"
J_PER_KWH = 3.6e6
# Throughput bucket widths to choose from, seconds: the smallest giving at most MAX_BUCKETS bars.
BUCKET_CHOICES_S = (1, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
MAX_BUCKETS = 60


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The ``pct``-th percentile (0-100) with linear interpolation between closest ranks
    (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * pct / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def sample_held_s(r: CompletionRecord) -> float:
    """Seconds the sample held its worker's GPUs: its duration, or ``gpu_held_s`` when its tail
    (encoding, writing) ran in the background beside the next sample (docs/ARCHITECTURE.md,
    "Overlapped finish"): the rest of its duration held no GPU, and counting it would count
    the next sample's GPU time twice."""
    held = r.metrics.get("gpu_held_s")
    if isinstance(held, bool) or not isinstance(held, (int, float)) or not math.isfinite(held):
        return r.duration_s
    return min(float(held), r.duration_s)


def sample_gpu_s(r: CompletionRecord) -> float:
    """GPU-seconds a sample held: its held time times the GPUs of its worker (0 on a CPU worker)."""
    return sample_held_s(r) * len(r.gpus)


def sample_energy_j(r: CompletionRecord) -> float | None:
    """Joules the sample's GPUs drew: ``gpu_power_w`` (the mean per GPU, workers/gpu_telemetry.py)
    times its GPUs times its held time; None when no power was read."""
    power = r.metrics.get("gpu_power_w")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        return None
    return float(power) * max(1, len(r.gpus)) * sample_held_s(r)


@dataclass
class GroupFigures:
    """One group (or all): counts, durations (s), GPU-hours and energy (kWh)."""

    planned: int
    done: int
    failed: int
    mean_s: float | None
    median_s: float | None
    p95_s: float | None
    gpu_hours: float
    energy_kwh: float | None  # None when no sample of the group reported its power
    energy_samples: int  # samples whose power is known (energy covers only these)

    def as_dict(self) -> dict[str, float | int | None]:
        return {"planned": self.planned, "done": self.done, "failed": self.failed,
                "left": max(0, self.planned - self.done - self.failed), "mean_s": self.mean_s,
                "median_s": self.median_s, "p95_s": self.p95_s, "gpu_hours": self.gpu_hours,
                "energy_kwh": self.energy_kwh, "energy_samples": self.energy_samples}


def group_figures(done: Sequence[CompletionRecord], failed: int = 0, planned: int = 0) -> GroupFigures:
    """The figures of one group's completion records (``failed``/``planned`` counted elsewhere)."""
    d = [r.duration_s for r in done]
    energies = [e for e in map(sample_energy_j, done) if e is not None]
    return GroupFigures(
        planned=max(planned, len(done) + failed), done=len(done), failed=failed,
        mean_s=sum(d) / len(d) if d else None, median_s=percentile(d, 50), p95_s=percentile(d, 95),
        gpu_hours=sum(map(sample_gpu_s, done)) / 3600.0,
        energy_kwh=sum(energies) / J_PER_KWH if energies else None, energy_samples=len(energies))


def by_group(done: Iterable[CompletionRecord], failed: Iterable[FailureRecord] = (),
             planned: Mapping[str, int] | None = None) -> tuple[dict[str, GroupFigures], GroupFigures]:
    """Group -> its figures (groups sorted by name), and the figures of all groups together."""
    recs: dict[str, list[CompletionRecord]] = {}
    for r in done:
        recs.setdefault(r.group, []).append(r)
    fails = Counter(f.group for f in failed)
    planned = planned or {}
    groups = sorted(set(recs) | set(fails) | set(planned))
    per = {g: group_figures(recs.get(g, []), fails.get(g, 0), planned.get(g, 0)) for g in groups}
    total = group_figures([r for g in groups for r in recs.get(g, [])], sum(fails.values()),
                          sum(max(f.planned, 0) for f in per.values()))
    return per, total


def span(done: Iterable[CompletionRecord]) -> tuple[float, float] | None:
    """(first start, last finish) over the samples; None without samples."""
    starts_ends = [(r.finished_at - r.duration_s, r.finished_at) for r in done]
    if not starts_ends:
        return None
    return min(s for s, _ in starts_ends), max(e for _, e in starts_ends)


@dataclass
class Throughput:
    """Samples finished per bucket of ``bucket_s`` seconds, the first starting at ``start``."""

    start: float
    bucket_s: float
    counts: list[int]

    @property
    def per_minute(self) -> list[float]:
        return [c * 60.0 / self.bucket_s for c in self.counts]

    def as_dict(self) -> dict:
        return {"start": self.start, "bucket_s": self.bucket_s, "counts": self.counts,
                "peak_per_minute": max(self.per_minute, default=0.0)}


def bucket_width(span_s: float, max_buckets: int = MAX_BUCKETS) -> float:
    """The smallest of BUCKET_CHOICES_S that cuts ``span_s`` into at most ``max_buckets``."""
    for b in BUCKET_CHOICES_S:
        if span_s / b <= max_buckets:
            return float(b)
    return float(math.ceil(span_s / max_buckets / 86400.0) * 86400)


def throughput(done: Sequence[CompletionRecord], max_buckets: int = MAX_BUCKETS) -> Throughput | None:
    """Finished samples per bucket from the first start to the last finish."""
    sp = span(done)
    if sp is None:
        return None
    b = bucket_width(sp[1] - sp[0], max_buckets)
    start = math.floor(sp[0] / b) * b
    counts = [0] * (int((sp[1] - start) // b) + 1)
    for r in done:
        counts[min(len(counts) - 1, int((r.finished_at - start) // b))] += 1
    return Throughput(start, b, counts)


Interval = tuple[float, float]


def merged(intervals: Iterable[Interval], min_gap_s: float = 0.0) -> list[Interval]:
    """Sorted intervals with overlaps (and gaps not above ``min_gap_s``) joined."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s - out[-1][1] <= min_gap_s:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def lanes(done: Iterable[CompletionRecord]) -> dict[str, list[CompletionRecord]]:
    """Worker -> its samples in start order (workers sorted by name): the timeline's rows."""
    out: dict[str, list[CompletionRecord]] = {}
    for r in done:
        out.setdefault(r.worker, []).append(r)
    return {w: sorted(rs, key=lambda r: r.finished_at - r.duration_s) for w, rs in sorted(out.items())}


def worker_figures(done: Iterable[CompletionRecord]) -> dict[str, dict[str, float | int | list[int]]]:
    """Worker -> samples, GPUs, busy seconds, its span (first start to last finish) and the
    share of that span it ran nothing (``idle_pct``, %)."""
    out: dict[str, dict[str, float | int | list[int]]] = {}
    for w, rs in lanes(done).items():
        busy = merged((r.finished_at - r.duration_s, r.finished_at) for r in rs)
        busy_s = sum(e - s for s, e in busy)
        span_s = busy[-1][1] - busy[0][0]
        out[w] = {"samples": len(rs), "gpus": sorted({g for r in rs for g in r.gpus}), "busy_s": busy_s,
                  "span_s": span_s, "idle_pct": 100.0 * (1 - busy_s / span_s) if span_s > 0 else 0.0}
    return out


def failure_types(failed: Sequence[FailureRecord]) -> list[dict[str, object]]:
    """Error type -> how many, most first, each with its first failure as the example."""
    out = []
    for error_type, n in by_type(failed).items():
        ex = next(f for f in failed if f.error_type == error_type)
        out.append({"error_type": error_type, "count": n, "example": {
            "sample_id": ex.sample_id, "group": ex.group, "label": ex.label, "worker": ex.worker,
            "attempt": ex.attempt, "message": ex.message[:2000], "failed_at": ex.failed_at}})
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def series_figures(series: Mapping[str, Sequence[GpuPoint]]) -> dict[str, dict[str, float | int | None]]:
    """GPU series name -> points, mean utilisation (%), peak memory (MiB), mean power (W)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name, pts in sorted(series.items()):
        mem = [p.mem_used_mib for p in pts if p.mem_used_mib is not None]
        out[name] = {"points": len(pts), "util_mean_pct": _mean([p.util_pct for p in pts if p.util_pct is not None]),
                     "mem_peak_mib": max(mem) if mem else None,
                     "power_mean_w": _mean([p.power_w for p in pts if p.power_w is not None])}
    return out


def telemetry_figures(done: Sequence[CompletionRecord]) -> dict[str, float | int | None]:
    """Per-sample GPU telemetry over the experiment: duration-weighted mean utilisation (%) and
    power (W, per GPU), peak memory (MiB), and how many samples reported any."""

    def weighted(key: str) -> float | None:
        pairs = [(float(v), r.duration_s) for r in done
                 if isinstance(v := r.metrics.get(key), (int, float)) and not isinstance(v, bool)]
        w = sum(d for _, d in pairs)
        return sum(v * d for v, d in pairs) / w if w > 0 else _mean([v for v, _ in pairs])

    mem = [float(v) for r in done if isinstance(v := r.metrics.get("gpu_mem_mib"), (int, float))]
    return {"samples": sum(1 for r in done if any(k.startswith("gpu_") for k in r.metrics)),
            "util_mean_pct": weighted("gpu_util_pct"), "power_mean_w": weighted("gpu_power_w"),
            "mem_peak_mib": max(mem) if mem else None}
