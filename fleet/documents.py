"""Reading the YAML / JSON documents users write (experiments, settings) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleet.errors import FleetError


def read_mapping(path: Path, what: str, error: type[FleetError], empty_ok: bool = False) -> dict[str, Any]:
    """The mapping in a ``.json`` file (JSON) or any other file (YAML).

    Raises ``error`` with one line naming the file and the fault: missing, unreadable,
    not valid JSON/YAML (with the position), or not a mapping. ``what`` names the
    document in messages ("experiment file"). An empty file is {} when ``empty_ok``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read {what}: {getattr(e, 'strerror', None) or e}") from None
    is_json = path.suffix.lower() == ".json"
    try:
        if is_json:
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: both say where
        msg = " ".join(str(e).split()) or type(e).__name__
        raise error(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {msg}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the {what} must hold a mapping, not {type(data).__name__}")
    return data
