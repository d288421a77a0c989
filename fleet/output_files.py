"""The sizes of many output files at once: the done check of a re-run or a status (done =
a record and the output in place with the recorded size, fleet.records.classify).

A million outputs are a million ``stat`` calls, the largest part of re-checking a million
done samples (about 3 µs each on the 2-core test machine, docs/BENCHMARKS.md "A million
samples"). Each is made relative to its folder, opened once (``fstatat`` resolves one path
component instead of the whole path: about 10 % less). Threads were tried and gave nothing:
the work is the interpreter's, under the GIL, not the kernel's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

BY_FOLDER_FROM = 1000  # fewer paths than this are stat'ed by their whole path


def sizes(paths: Sequence[str]) -> list[int | None]:
    """The size in bytes of each path (``os.stat``, links followed), None where there is none
    (or it cannot be read), in order."""
    if len(paths) < BY_FOLDER_FROM:
        return [_size(p) for p in paths]
    out: list[int | None] = [None] * len(paths)
    folders: dict[str, list[int]] = {}
    for k, p in enumerate(paths):
        folder, _, name = p.rpartition("/")
        if name and folder:
            folders.setdefault(folder, []).append(k)
        else:  # "x/" or a bare name: as it is
            out[k] = _size(p)
    stat = os.stat
    for folder, ks in folders.items():
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # no folder, no files: None each
        try:
            for k in ks:
                try:
                    out[k] = stat(paths[k].rpartition("/")[2], dir_fd=fd).st_size
                except OSError:
                    pass
        finally:
            os.close(fd)
    return out


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
