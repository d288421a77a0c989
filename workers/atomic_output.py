"""Writing a sample's output file so that a reader sees the whole file or none.

The file is written under a hidden temporary name in the same folder (same filesystem,
so the rename is atomic), flushed to disk, renamed over the final name, and the folder
flushed so the rename survives a crash. A SIGKILL can leave a hidden ``.<name>.*.tmp<ext>``
behind, never a partial file at the final name; the next attempt of the same sample
removes such leftovers (the lease guarantees no other worker writes it meanwhile).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from glob import escape as glob_escape
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to produce the file, then move it to ``final``; on any error the
    temporary file is removed and ``final`` is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    ext = final.suffix  # kept last: encoders (PyAV, PIL) pick the format from it
    for stale in final.parent.glob(f".{glob_escape(final.name)}.*.tmp{glob_escape(ext)}"):
        stale.unlink(missing_ok=True)
    tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp{ext}"
    try:
        write(tmp)
        fsync_path(tmp)  # data on disk before the name points at it
        os.replace(tmp, final)
        fsync_path(final.parent)  # the rename itself survives a crash
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
