"""``fleet report``: read an experiment (fleet/report_sources.py), compute its figures
(fleet/report.py), draw the page (fleet/report_html.py) and write ``report.html`` and
``report.json``, each under a temporary name in the same folder and renamed into place,
so a reader never sees half a report.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from fleet.errors import InputError
from fleet.kinds import KindModules
from fleet.kinds.base import Experiment
from fleet.report import (
    REPORT_SCHEMA,
    by_group,
    failure_types,
    series_figures,
    span,
    telemetry_figures,
    throughput,
    worker_figures,
)
from fleet.report_gallery import MAX_ITEMS, Gallery, gallery
from fleet.report_html import page
from fleet.report_sources import ReportInput, collect

HTML_NAME = "report.html"
JSON_NAME = "report.json"


def default_dir(exp: Experiment) -> Path:
    """Where a report goes unless told: ``<experiment output>/report``."""
    return exp.output / "report"


def figures(inp: ReportInput, g: Gallery, now: float | None = None) -> dict[str, Any]:
    """What report.json holds (schema ``fleet.report/1``): counts, durations (s), GPU-hours,
    energy (kWh), throughput, workers, GPU figures, failures by type, the gallery's counts."""
    done = list(inp.records.values())
    per, total = by_group(done, inp.failures, inp.planned)
    sp = span(done)
    tp = throughput(done)
    exp = inp.experiment
    return {
        "schema": REPORT_SCHEMA, "experiment": exp.name, "kind": exp.kind, "output": str(exp.output),
        "generated_at": time.time() if now is None else now,
        "span": None if sp is None else {"start": sp[0], "end": sp[1], "seconds": sp[1] - sp[0]},
        "totals": total.as_dict(), "groups": {k: v.as_dict() for k, v in per.items()},
        "throughput": None if tp is None else tp.as_dict(),
        "workers": worker_figures(done),
        "gpu_series": None if inp.series is None else series_figures(inp.series),
        "sample_telemetry": telemetry_figures(done),
        "failures": failure_types(inp.failures),
        "gallery": g.as_dict(), "sources": inp.sources,
    }


def write_atomically(path: Path, text: str) -> None:
    """``text`` (UTF-8) at ``path``: written to a hidden temporary file beside it, flushed, renamed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(client: redis.Redis | None, namespace: str, exp: Experiment, out_dir: Path | None = None,
                 kinds: Mapping[str, KindModules] | None = None, gallery_max: int = MAX_ITEMS
                 ) -> tuple[Path, Path, dict[str, Any]]:
    """Write the report of ``exp`` to ``out_dir`` (default: ``<output>/report``); returns the
    HTML path, the JSON path and the figures. ``client`` None: from the manifest only."""
    out_dir = Path(out_dir).expanduser().absolute() if out_dir is not None else default_dir(exp)
    inp = collect(client, namespace, exp, kinds)
    g = gallery(inp.records.values(), out_dir, gallery_max)
    fig = figures(inp, g)
    html = page(inp, fig, g)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        html_path, json_path = out_dir / HTML_NAME, out_dir / JSON_NAME
        write_atomically(json_path, json.dumps(fig, ensure_ascii=False, indent=1) + "\n")
        write_atomically(html_path, html)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot write the report: {e.strerror or e}") from None
    return html_path, json_path, fig
