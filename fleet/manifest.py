"""Reading ``<output root>/fleet-manifest.jsonl``, the records beside an experiment's outputs.

Workers append the lines (``workers/manifest.py``: the completion record plus the sample's
``params``, one ``write`` under ``flock``); the producer reads them here (``fleet report``),
so an experiment's records outlive Redis. A sample made again appends a newer line: readers
keep the last line per sample id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleet.contract import CompletionRecord

MANIFEST_NAME = "fleet-manifest.jsonl"


def read(output_root: Path) -> dict[str, dict[str, Any]]:
    """Sample id -> its latest manifest line (lines that are not JSON are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        with open(Path(output_root) / MANIFEST_NAME, encoding="utf-8") as f:
            for raw in f:
                try:
                    d = json.loads(raw)
                    out[d["sample_id"]] = d
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return out


def records(output_root: Path) -> dict[str, CompletionRecord]:
    """Sample id -> the completion record of its latest line; lines of another record schema
    (or damaged ones) are left out."""
    out: dict[str, CompletionRecord] = {}
    for sid, line in read(output_root).items():
        try:
            out[sid] = CompletionRecord.model_validate({k: v for k, v in line.items() if k != "params"})
        except ValueError:
            continue
    return out
