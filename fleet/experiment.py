"""Experiment files: what a user writes to describe thousands of samples.

An experiment file is YAML or JSON with a ``kind``; the kind's producer module validates
the rest (fleet.kinds). A ``.txt`` (``.cmds``, ``.commands``) file is a plain commands file
(kind commands, seed 003's ``cmd | mem_GB | n_gpus`` lines). Every error names the file and the field. Relative paths resolve
against the experiment file's folder, so a copied experiment folder works on another host.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fleet.documents import read_mapping
from fleet.errors import InputError
from fleet.kinds import KindModules, producer_kind
from fleet.kinds.base import Experiment


def load_experiment(
    path: Path | str, default_output: Path | None = None, kinds: Mapping[str, KindModules] | None = None
) -> Experiment:
    """Read and validate an experiment file of any kind; InputError (one line) on any fault.

    ``default_output`` (the settings' output_dir) holds ``<name>/`` when the file names no
    output; ``kinds`` are the settings' extra kinds.
    """
    path = Path(path).expanduser()
    from fleet.kinds.commands import PLAIN_SUFFIXES

    if path.suffix.lower() in PLAIN_SUFFIXES:  # seed 003's plain commands file
        exp = producer_kind("commands", kinds, where=str(path)).load_plain(path, default_output)
    else:
        data = read_mapping(path, "experiment file", InputError)
        kind = producer_kind(data.get("kind"), kinds, where=str(path))
        exp = kind.load(path, data, default_output)
    check_name(path, exp.name)
    return exp


def check_name(path: Path, name: str) -> None:
    """An experiment's name is one folder name (the default output folder is ``<output_dir>/<name>``)
    and the handle of cancel, pause and resume: no path separator, no ``.`` or ``..``, no control
    character; InputError naming the file otherwise."""
    bad = ""
    if not name.strip():
        bad = "is empty"
    elif "/" in name or "\\" in name:
        bad = "holds a path separator"
    elif name in (".", ".."):
        bad = "is not a folder name"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "holds a control character"
    elif len(name.encode("utf-8")) > 200:
        bad = "is longer than 200 bytes"
    if bad:
        raise InputError(f"{path}: name {name!r} {bad}: an experiment's name is one folder name "
                         "(set `name:` in the file)")
