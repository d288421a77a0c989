"""Where a worker may write: inside the task's output root, and only under the roots its own
settings allow (fleet.settings.FleetSettings.output_roots), symlinks resolved.

Whoever can write to the Redis can publish a task, and its output path is whatever the
message says; this check is what keeps such a task from overwriting a file elsewhere
(docs/ARCHITECTURE.md, "Trust").
"""

from __future__ import annotations

import os
from pathlib import Path

from fleet.errors import PermanentError
from fleet.settings import inside


class ForbiddenOutput(PermanentError):
    """The task's output lies outside what this worker may write."""


def _real(path: str) -> str:
    # realpath resolves every symlink of the part that exists; a missing tail stays as given.
    return os.path.realpath(path)


def confine(output_root: str, output_path: str, allowed: list[Path]) -> None:
    """Raise ForbiddenOutput unless ``output_path`` lies inside ``output_root`` and that root
    inside one of ``allowed`` (all resolved, so neither ``..`` nor a symlink gets out)."""
    if not allowed:
        raise ForbiddenOutput("this worker may write no outputs: set output_roots (or output_dir) in its settings")
    root, out = _real(output_root), _real(output_path)
    if not any(inside(root, str(a)) for a in allowed):
        raise ForbiddenOutput(f"output root {output_root} is outside the folders this worker may write "
                              f"({', '.join(map(str, allowed))}; setting output_roots)")
    if not inside(out, root) or out == root:
        raise ForbiddenOutput(f"output {output_path} is outside its experiment's output root {output_root}")
