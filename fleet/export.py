"""``fleet export``: one row per finished sample of an experiment, as CSV, JSON lines or
Parquet, for a notebook or a spreadsheet.

A row is the sample's completion record (id, group, label, output path, duration, worker,
host, GPUs, finish time), its metrics flattened as ``metric_<name>`` and its parameters as
``param_<name>``. The samples are those the experiment published (the experiments index,
``fleet.experiment_index``) whose record says done, merged with the lines of its
``fleet-manifest.jsonl`` (``fleet.manifest``): per sample id the later of the two wins
(a sample only in the manifest, its Redis gone or flushed, exports too); parameters come
from the manifest, the only place that keeps them. pyarrow is imported only for Parquet.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

import redis

from fleet import experiment_index, manifest
from fleet.contract import Keys
from fleet.errors import InputError

FORMATS = ("csv", "jsonl", "parquet")
FIXED = ("sample_id", "group", "label", "output_path", "duration_s", "worker", "hostname", "gpus", "finished_at")
CHUNK = 10000


def finished_rows(client: redis.Redis, namespace: str, name: str, output_root: Path | str) -> list[dict[str, Any]]:
    """The export's rows for experiment ``name`` (manifest in ``output_root``), oldest
    finish first. ``gpus`` is ``"0,1"`` (``""``: a CPU worker); ``finished_at`` and
    ``duration_s`` are seconds (unix time; wall time on the worker, model load included)."""
    keys = Keys(namespace)
    ids = sorted(experiment_index.published(client, keys, name))
    latest: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), CHUNK):
        chunk = ids[i : i + CHUNK]
        pipe = client.pipeline(transaction=False)
        pipe.smismember(keys.done, chunk)
        pipe.hmget(keys.records, chunk)
        done, raws = pipe.execute()
        for sid, d, raw in zip(chunk, done, raws):
            if d and raw is not None:
                try:
                    latest[sid] = json.loads(raw)
                except ValueError:
                    continue
    params: dict[str, dict[str, Any]] = {}
    for sid, line in manifest.read(Path(output_root)).items():
        if line.get("experiment") != name:
            continue  # another experiment writing to the same folder
        params[sid] = line.get("params") or {}
        if sid not in latest or _finished(line) >= _finished(latest[sid]):
            latest[sid] = line
    rows = [_row(rec, params.get(sid, {})) for sid, rec in latest.items()]
    return sorted(rows, key=lambda r: (r["finished_at"] or 0.0, r["sample_id"]))


def output_root_of(client: redis.Redis, namespace: str, name: str) -> Path:
    """The output folder experiment ``name`` was last enqueued with (the experiments index)."""
    e = experiment_index.entry(client, Keys(namespace), name)
    if e is None:
        raise InputError(f"{name}: no such experiment in namespace {namespace!r} (give the experiment file, or a "
                         "name `fleet status` lists)")
    return Path(e.output_root)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The fixed columns, then every ``metric_*`` and ``param_*`` column any row has, sorted."""
    extra = sorted({k for r in rows for k in r} - set(FIXED))
    return list(FIXED) + [k for k in extra if k.startswith("metric_")] + [k for k in extra if k.startswith("param_")]


def write(rows: list[dict[str, Any]], fmt: str, out: Path | None) -> None:
    """Write ``rows`` as ``fmt`` to ``out`` (atomically: a hidden file in the same folder,
    renamed into place) or, for csv and jsonl without ``out``, to stdout."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: give one of {', '.join(FORMATS)}")
    if out is None:
        if fmt == "parquet":
            raise InputError("--format parquet needs --out FILE (Parquet is a binary file format)")
        _write_text(rows, fmt, sys.stdout)
        sys.stdout.flush()
        return
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            _write_parquet(rows, tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                _write_text(rows, fmt, f)
        os.replace(tmp, out)
    except OSError as e:
        raise InputError(f"--out {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _finished(rec: dict[str, Any]) -> float:
    try:
        return float(rec.get("finished_at") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _row(rec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sample_id": rec.get("sample_id"), "group": rec.get("group", rec.get("category")), "label": rec.get("label", ""),
        "output_path": rec.get("output_path"), "duration_s": rec.get("duration_s"), "worker": rec.get("worker"),
        "hostname": rec.get("hostname"), "gpus": ",".join(str(g) for g in rec.get("gpus") or []),
        "finished_at": rec.get("finished_at"),
    }
    for k, v in sorted((rec.get("metrics") or {}).items()):
        row[f"metric_{k}"] = v
    for k, v in sorted(params.items()):
        row[f"param_{k}"] = v
    return row


def _cell(v: Any) -> Any:
    """A value as a CSV or Parquet cell: scalars as they are, lists and mappings as JSON text."""
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict, tuple)) else v


def _write_text(rows: list[dict[str, Any]], fmt: str, f: IO[str] | io.TextIOBase) -> None:
    cols = columns(rows)
    if fmt == "jsonl":
        for r in rows:
            f.write(json.dumps({c: r.get(c) for c in cols}, ensure_ascii=False, default=str) + "\n")
        return
    w = csv.writer(f)
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else _cell(r.get(c)) for c in cols])


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("--format parquet needs pyarrow (pip install pyarrow)") from None
    arrays, names = [], []
    for c in columns(rows):
        values = [_cell(r.get(c)) for r in rows]
        try:
            arr = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types (a number here, text there): text
            arr = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        arrays.append(arr)
        names.append(c)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path)
