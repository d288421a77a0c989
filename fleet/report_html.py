"""The page of ``fleet report``: one self-contained HTML file (inline CSS, inline SVG charts,
thumbnails as data URIs, no script), readable offline. Its Content-Security-Policy allows
nothing to be fetched but data: images. Every user string (experiment, group, label,
worker, error message, path) is escaped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from html import escape

from fleet.contract import CompletionRecord
from fleet.gpu_series import BUCKET_S, GpuPoint
from fleet.report import lanes
from fleet.report_charts import Bar, Point, bar_chart, color, legend, line_chart, timeline
from fleet.report_gallery import Gallery
from fleet.report_sources import ReportInput

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1000px;color:#222;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#666;margin:2px 0}.note{color:#666;font-style:italic}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}tfoot td{font-weight:bold;border-top:2px solid #ccc}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px}.chart{width:100%;height:auto;font-size:11px}
.chart .axis{stroke:#888}.chart .grid{stroke:#eee}.chart text{fill:#555}.chart .unit{font-weight:bold}
.chart .idle{fill:#f3f3f3}.key{margin-right:12px;white-space:nowrap}.key i{display:inline-block;width:10px;height:10px;margin-right:4px}
pre{white-space:pre-wrap;margin:0;font-size:12px}.gallery{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:164px;font-size:11px}figure img{display:block;max-width:160px;max-height:160px;border:1px solid #ddd}
figcaption{overflow-wrap:anywhere}.nopreview{display:block;width:160px;height:90px;background:#eee;color:#666}
"""


def _n(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _group_row(name: str, g: Mapping, tag: str = "td") -> str:
    cells = [str(g[k]) for k in ("planned", "done", "failed", "left")]
    cells += [_n(g[k]) for k in ("mean_s", "median_s", "p95_s")] + [_n(g["gpu_hours"], 3), _n(g["energy_kwh"], 4)]
    return (f'<tr data-group="{escape(name)}"><{tag}>{escape(name)}</{tag}>'
            + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")


def groups_table(fig: Mapping) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("group", "planned", "done", "failed", "left", "mean s", "median s",
                                              "p95 s", "GPU-h", "kWh"))
    rows = "".join(_group_row(name, g) for name, g in fig["groups"].items())
    return (f'<table id="group-table"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>'
            f'<tfoot>{_group_row("all", fig["totals"])}</tfoot></table>')


def _sample_lines(done: Sequence[CompletionRecord], key: str, gap_s: float) -> list[tuple[str, list[Point]]]:
    """Per worker, each sample's ``key`` metric held flat over the sample's time; the line
    breaks where the worker ran nothing for more than ``gap_s`` seconds."""
    out = []
    for worker, rs in lanes(done).items():
        pts: list[Point] = []
        for r in rs:
            v = r.metrics.get(key)
            start = r.finished_at - r.duration_s
            if pts and start - pts[-1][0] > gap_s:
                pts.append((pts[-1][0], None))
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                pts += [(start, float(v)), (r.finished_at, float(v))]
            elif pts:
                pts.append((start, None))
        if pts:
            out.append((worker, pts))
    return out


def _series_lines(series: Mapping[str, Sequence[GpuPoint]], attr: str) -> list[tuple[str, list[Point]]]:
    """Per GPU series, its points; a gap of more than two buckets breaks the line."""
    out = []
    for name, pts in sorted(series.items()):
        line: list[Point] = []
        for p in pts:
            if line and p.t - line[-1][0] > 2 * BUCKET_S:
                line.append((p.t, None))
            v = getattr(p, attr)
            line.append((p.t, None if v is None else float(v)))
        if any(v is not None for _, v in line):
            out.append((name, line))
    return out


METRICS = (("utilisation", "%", "gpu_util_pct", "util_pct", 100.0), ("memory used", "MiB", "gpu_mem_mib",
           "mem_used_mib", None), ("power", "W", "gpu_power_w", "power_w", None))


def gpu_section(inp: ReportInput, done: Sequence[CompletionRecord], t0: float, t1: float) -> str:
    parts = []
    if inp.series is None:
        parts.append('<p class="note">Redis was not reachable: no GPU time series.</p>')
    elif not any(inp.series.values()):
        parts.append('<p class="note" id="no-gpu-series">No GPU time series in Redis for the GPUs of this experiment '
                     'over its time span.</p>')
    else:
        colors = {n: color(i) for i, n in enumerate(sorted(inp.series))}
        parts.append('<h3>Per GPU (time series, one point per bucket)</h3>' + legend(list(colors.items())))
        for title, unit, _, attr, y_max in METRICS:
            lines = _series_lines(inp.series, attr)
            if lines:
                parts.append(f"<h4>{title}</h4>" + line_chart(lines, t0, t1, unit, f"GPU {title}", y_max, colors=colors,
                                                             before_s=BUCKET_S))
    gap_s = max(1.0, (t1 - t0) / 900)  # about a pixel
    per_sample = [(title, unit, _sample_lines(done, key, gap_s), y_max) for title, unit, key, _, y_max in METRICS]
    if not any(lines for _, _, lines, _ in per_sample):
        parts.append('<p class="note" id="no-sample-telemetry">No sample reported GPU telemetry '
                     '(they ran on CPU workers, or without NVML).</p>')
    else:
        colors = {w: color(i) for i, w in enumerate(lanes(done))}
        shown = {name for _, _, lines, _ in per_sample for name, _ in lines}
        parts.append("<h3>Per sample (each worker's mean over the sample)</h3>"
                     + legend([(w, c) for w, c in colors.items() if w in shown]))
        for title, unit, lines, y_max in per_sample:
            if lines:
                parts.append(f"<h4>{title}</h4>"
                             + line_chart(lines, t0, t1, unit, f"sample GPU {title}", y_max, colors=colors))
    return "".join(parts)


def failures_section(fig: Mapping) -> str:
    if not fig["failures"]:
        return '<p class="note">No sample failed for good.</p>'
    rows = []
    for f in fig["failures"]:
        ex = f["example"]
        rows.append(f'<tr><td>{escape(f["error_type"])}</td><td>{f["count"]}</td><td style="text-align:left">'
                    f'{escape(ex["label"] or ex["sample_id"])}<br><span class="meta">{escape(ex["group"])} on '
                    f'{escape(ex["worker"])}, attempt {ex["attempt"]}</span><pre>{escape(ex["message"][:600])}</pre>'
                    "</td></tr>")
    return ('<table id="failure-table"><thead><tr><th>error type</th><th>samples</th><th style="text-align:left">'
            f'example</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def gallery_section(g: Gallery) -> str:
    items = []
    for t in g.items:
        cap = f"<figcaption>{escape(t.label or t.sample_id)}</figcaption>"
        if t.data_uri:
            inner = f'<img src="{t.data_uri}" alt="{escape(t.label)}" loading="eager">'
        else:
            inner = f'<span class="nopreview">no preview: {escape(t.error)}</span>'
        items.append(f'<figure data-media="{t.media}"><a href="{escape(t.href)}">{inner}</a>{cap}</figure>')
    notes = []
    if g.left_out:
        notes.append(f"{g.left_out} more not shown (the first {len(g.items)} of {g.media} are).")
    if g.missing:
        notes.append(f"{g.missing} done samples' files are gone.")
    if not g.items:
        notes.append("No image or video output to show.")
    note = f'<p class="note" id="gallery-note">{" ".join(notes)}</p>' if notes else ""
    return f'{note}<div class="gallery" id="gallery">{"".join(items)}</div>'


def page(inp: ReportInput, fig: Mapping, g: Gallery) -> str:
    """The whole HTML page."""
    exp = inp.experiment
    done = list(inp.records.values())
    tot = fig["totals"]
    src = fig["sources"]
    head = (f'<header><h1>fleet report: {escape(exp.name)}</h1><p class="meta">kind {escape(exp.kind)} · output '
            f'{escape(str(exp.output))} · made {escape(_when(fig["generated_at"]))}</p>'
            f'<p class="meta">records: {src["redis_records"]} from Redis, {src["manifest_only"]} more from '
            f'{escape(src["manifest"])}' + ("" if src["redis"] else " (Redis was not reachable)") + "</p></header>")
    cards = [("done", f'{tot["done"]} / {tot["planned"]}'), ("failed", str(tot["failed"])),
             ("median s", _n(tot["median_s"])), ("GPU-hours", _n(tot["gpu_hours"], 3)),
             ("energy kWh", _n(tot["energy_kwh"], 4) + (f' ({tot["energy_samples"]} samples)' if tot["done"] else "")),
             ("peak / min", _n((fig["throughput"] or {}).get("peak_per_minute"), 1))]
    body = [head, '<section id="totals"><div class="cards">'
            + "".join(f'<div class="card"><b>{escape(v)}</b>{k}</div>' for k, v in cards) + "</div></section>",
            '<section id="groups"><h2>Groups</h2>' + groups_table(fig) + "</section>"]
    if fig["span"] is None:
        body.append('<p class="note">No sample of this experiment is done yet: no charts.</p>')
    else:
        t0, t1 = fig["span"]["start"], fig["span"]["end"]
        tp = fig["throughput"]
        body.append(f'<section id="throughput"><h2>Throughput</h2><p class="meta">samples finished per '
                    f'{_n(tp["bucket_s"], 0)} s; {escape(_when(t0))} to {escape(_when(t1))}</p>'
                    + bar_chart(tp["start"], tp["bucket_s"], tp["counts"], "samples", "throughput") + "</section>")
        groups = list(fig["groups"])
        gcol = {name: color(i) for i, name in enumerate(groups)}
        rows = {w: [Bar(r.finished_at - r.duration_s, r.finished_at, gcol.get(r.group, color(0)),
                        f"{r.label or r.sample_id} ({r.group}): {r.duration_s:.2f} s") for r in rs]
                for w, rs in lanes(done).items()}
        idle = "; ".join(f"{w}: {v['idle_pct']:.0f} % idle" for w, v in fig["workers"].items())
        body.append('<section id="timeline"><h2>Timeline per worker</h2>' + legend(list(gcol.items()))
                    + timeline(rows, t0, t1, "samples per worker")
                    + f'<p class="meta">gaps are where a worker ran nothing: {escape(idle)}</p></section>')
        body.append('<section id="gpus"><h2>GPUs</h2>' + gpu_section(inp, done, t0, t1) + "</section>")
    body.append('<section id="failures"><h2>Failures</h2>' + failures_section(fig) + "</section>")
    body.append(f'<section><h2>Gallery</h2>{gallery_section(g)}</section>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fleet report: {escape(exp.name)}</title><style>{CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")
