"""The prompts CSV of an image experiment (seed 002): columns ``image_id`` and ``prompt``,
optionally ``negative_prompt``; other columns are ignored.

Read the way spreadsheets write it: UTF-8 with or without a BOM, CRLF or LF line ends,
quoted fields holding commas, quotes ("" inside quotes) and line breaks. Rows whose
fields are all empty (a spreadsheet's trailing rows) are skipped and not counted; every
other row is a sample, numbered 0, 1, ... in file order (its seed is seed_start + that
number). Each fault is one InputError naming the file and the line.

``image_id`` becomes a file name (``<image_id>_seed<seed>.png``), so it is checked as one:
not empty, no path separator, not ``.``/``..`` nor starting with a dot (a hidden file; fleet
keeps its temporary files hidden), no control character, at most 200 bytes of UTF-8, and
unique in the file. Surrounding spaces are stripped from ids and header names.
"""

from __future__ import annotations

import csv
import io
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import InputError

REQUIRED = ("image_id", "prompt")
MAX_ID_BYTES = 200  # + "_seed<20 digits>.png" stays under the 255-byte file name limit


@dataclass(frozen=True)
class PromptRow:
    index: int  # 0-based among the rows that count (seed = seed_start + index)
    line: int  # line of the file where the row starts (1-based), for messages
    image_id: str
    prompt: str
    negative_prompt: str | None  # None: the column is absent or the cell empty


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: prompts CSV not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read prompts CSV: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # e.start counts in e.object, which is the data without its BOM
        line = e.object.count(b"\n", 0, e.start) + 1
        bad = e.object[e.start]
        raise InputError(f"{path}: line {line}: not UTF-8 (byte 0x{bad:02x}); save the CSV as UTF-8") from None


def id_fault(image_id: str) -> str | None:
    """Why ``image_id`` cannot be a file name, or None."""
    if not image_id:
        return "empty image_id"
    if "/" in image_id or "\\" in image_id:
        return f"image_id {image_id!r} holds a path separator"
    if image_id.startswith("."):
        return f"image_id {image_id!r} starts with a dot ('..' and hidden files are refused)"
    bad = next((c for c in image_id if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        return f"image_id {image_id!r} holds the control character U+{ord(bad):04X}"
    if len(image_id.encode("utf-8")) > MAX_ID_BYTES:
        return f"image_id {image_id[:40]!r}... is longer than {MAX_ID_BYTES} bytes"
    return None


def read_prompts_csv(path: Path) -> list[PromptRow]:
    """Every row of the CSV at ``path``, validated; InputError (file and line) on the first fault."""
    text = _decode(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long prompts are fine
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise InputError(f"{path}: line 1: malformed CSV header: {e}") from None
    if header is None or not any(h.strip() for h in header):
        raise InputError(f"{path}: empty prompts CSV (expected a header with image_id and prompt)")
    names = [h.strip() for h in header]
    for col in REQUIRED:
        if col not in names:
            raise InputError(f"{path}: no column {col!r} in the header (columns: {', '.join(map(repr, names))})")
    for col in (*REQUIRED, "negative_prompt"):
        if names.count(col) > 1:
            raise InputError(f"{path}: column {col!r} appears {names.count(col)} times in the header")
    i_id, i_prompt = names.index("image_id"), names.index("prompt")
    i_neg = names.index("negative_prompt") if "negative_prompt" in names else None
    rows: list[PromptRow] = []
    seen: dict[str, int] = {}
    start = reader.line_num + 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue  # blank or all-empty row
            if len(fields) > len(names):
                raise InputError(f"{path}: line {line}: {len(fields)} fields but the header has {len(names)} "
                                 "(a comma in an unquoted field? quote it)")
            cell = fields + [""] * (len(names) - len(fields))
            image_id, prompt = cell[i_id].strip(), cell[i_prompt]
            fault = id_fault(image_id)
            if fault:
                raise InputError(f"{path}: line {line}: {fault}")
            if image_id in seen:
                raise InputError(f"{path}: line {line}: image_id {image_id!r} repeats line {seen[image_id]}")
            if not prompt.strip():
                raise InputError(f"{path}: line {line}: empty prompt (image_id {image_id!r})")
            seen[image_id] = line
            neg = cell[i_neg] if i_neg is not None and cell[i_neg].strip() else None
            rows.append(PromptRow(len(rows), line, image_id, prompt, neg))
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from None
    if not rows:  # a header alone is a mistake (the wrong file, an export cut short), not an empty plan
        raise InputError(f"{path}: no prompt rows after the header")
    return rows
