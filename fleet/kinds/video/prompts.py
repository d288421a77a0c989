"""Prompts files: which prompts each reference video gets.

Format (JSON, UTF-8), one of:

* global: ``{"<video name>": ["prompt 0", "prompt 1", ...], ...}``
* per category: ``{"<category>": {"<video name>": ["prompt 0", ...]}, ...}``

In either form the key ``"*"`` gives the prompts of every video (of that category, in
the per-category form) that has no entry of its own. A prompt's index in its list is
the ``prompt_<i>`` of the output name, so append new prompts at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from fleet.errors import InputError

DEFAULT_KEY = "*"


class Prompts:
    """Prompts by (category, video), loaded and validated from one file."""

    def __init__(self, path: Path, per_category: dict[str, dict[str, list[str]]] | None, flat: dict[str, list[str]] | None):
        self.path = path
        self._per_category = per_category
        self._flat = flat

    def for_video(self, category: str, video: str) -> list[str] | None:
        """The prompts of one video, or None when the file gives it none."""
        table = self._flat if self._flat is not None else (self._per_category or {}).get(category, {})
        return table.get(video, table.get(DEFAULT_KEY))

    def named_videos(self) -> list[tuple[str | None, str]]:
        """(category or None for the global form, video) for every explicit entry."""
        if self._flat is not None:
            return [(None, v) for v in self._flat if v != DEFAULT_KEY]
        return [(c, v) for c, t in (self._per_category or {}).items() for v in t if v != DEFAULT_KEY]

    def categories(self) -> list[str]:
        return list(self._per_category or {})


def _prompt_list(path: Path, where: str, value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{path}: {where}: must be a non-empty list of prompt strings")
    for i, p in enumerate(value):
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"{path}: {where}[{i}]: must be a non-empty string")
    return value


def load_prompts(path: Path) -> Prompts:
    """Load a prompts file; InputError naming the file and the fault otherwise."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: prompts file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read prompts file: {e}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: must be a JSON object of video name -> list of prompts (or category -> that)")
    kinds = {type(v) for v in data.values()}
    if kinds == {list}:
        return Prompts(path, None, {k: _prompt_list(path, k, v) for k, v in data.items()})
    if kinds == {dict}:
        per = {}
        for cat, table in data.items():
            if not table:
                raise InputError(f"{path}: {cat}: empty; give its videos' prompts or remove it")
            per[cat] = {v: _prompt_list(path, f"{cat}.{v}", p) for v, p in table.items()}
        return Prompts(path, per, None)
    raise InputError(f"{path}: mixes lists and objects at the top level; use one form (see the prompts format)")
