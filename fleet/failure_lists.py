"""Failure lists (seed 002's ``failed_prompts_gpu*.txt``, one file for the whole fleet):
failures grouped by error type, and written as a CSV for spreadsheets."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

from fleet.contract import FailureRecord
from fleet.errors import InputError

COLUMNS = ["sample_id", "experiment", "kind", "group", "label", "error_type", "message", "attempt", "worker",
           "hostname", "gpus", "failed_at"]


def by_type(failed: list[FailureRecord]) -> dict[str, int]:
    """Error type -> how many, most first."""
    return dict(Counter(f.error_type for f in failed).most_common())


def write_csv(path: Path, failed: list[FailureRecord]) -> None:
    """The failures as a UTF-8 CSV at ``path``, written under a temporary name and renamed."""
    if path.suffix.lower() != ".csv":
        raise InputError(f"{path}: --export writes a CSV; give a file name ending in .csv")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name ending in .csv")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for r in failed:
                d = r.model_dump()
                w.writerow([" ".join(str(x) for x in d[c]) if c == "gpus" else d[c] for c in COLUMNS])
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write the failure list: {e.strerror or e}") from None
