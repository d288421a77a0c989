"""A folder of CSV tables, each whole or sharded as ``<name>_part1.csv``, ``<name>_part2.csv``,
... (seed 004's KuaiRand-27K layout): shards are found, ordered by their number (2 before
10) and read as one table. Only the headers are read here; the worker reads the rows."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import InputError

SHARD = re.compile(r"^(?P<name>.+)_part(?P<n>\d+)$")


@dataclass(frozen=True)
class Table:
    name: str
    shards: list[Path]  # in part order
    columns: list[str]

    def describe(self) -> str:
        where = self.shards[0].parent
        return f"table {self.name!r} ({len(self.shards)} file(s) in {where}: columns {', '.join(self.columns)})"

    def identity(self) -> list[list[object]]:
        """What decides the data: each shard's path, size and modification time."""
        out: list[list[object]] = []
        for p in self.shards:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        return out


def _header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            row = next(csv.reader(f), None)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except (OSError, csv.Error) as e:
        raise InputError(f"{path}: cannot read the CSV header: {e}") from None
    if not row or not any(c.strip() for c in row):
        raise InputError(f"{path}: empty CSV (no header)")
    return [c.strip() for c in row]


def tables_in(folder: Path) -> dict[str, list[Path]]:
    """Table name -> its files in order, for every CSV of ``folder``."""
    whole: dict[str, Path] = {}
    parts: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(folder.glob("*.csv")):
        m = SHARD.match(p.stem)
        if m:
            parts.setdefault(m.group("name"), []).append((int(m.group("n")), p))
        else:
            whole[p.stem] = p
    out: dict[str, list[Path]] = {}
    for name, ps in parts.items():
        ps.sort()
        nums = [n for n, _ in ps]
        if len(set(nums)) != len(nums):
            raise InputError(f"{folder}: table {name!r} has two files numbered part{nums[0]}")
        if name in whole:
            raise InputError(f"{folder}: table {name!r} is both {whole[name].name} and {ps[0][1].name}: keep one form")
        out[name] = [p for _, p in ps]
    for name, p in whole.items():
        out[name] = [p]
    return out


def find_table(folder: Path, name: str | None, exp_path: Path) -> Table:
    """The table ``name`` of ``folder`` (or its only table); InputError naming what is there."""
    if not folder.is_dir():
        raise InputError(f"{exp_path}: data: folder {folder} not found")
    found = tables_in(folder)
    if not found:
        raise InputError(f"{exp_path}: data: no CSV files in {folder}")
    if name is None:
        if len(found) > 1:
            raise InputError(f"{exp_path}: table: {folder} holds several tables ({', '.join(sorted(found))}); name one")
        name = next(iter(found))
    if name not in found:
        raise InputError(f"{exp_path}: table: no table {name!r} in {folder} (tables: {', '.join(sorted(found))})")
    shards = found[name]
    columns = _header(shards[0])
    for p in shards[1:]:
        other = _header(p)
        if other != columns:
            raise InputError(f"{p}: its header differs from {shards[0].name}'s ({', '.join(other)} vs "
                             f"{', '.join(columns)})")
    return Table(name, shards, columns)
