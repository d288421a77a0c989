"""A video dataset folder: ``<dataset>/<category>/<video>.<ext>``.

Names may be anything a file system allows (spaces, Chinese). Hidden files and files
that are not videos are skipped; a category folder with two videos of the same name
(``a.mp4`` and ``a.mov``) is an error, since both would write the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleet.errors import InputError
from fleet.kinds.video.experiment import VIDEO_SUFFIXES


@dataclass(frozen=True)
class ReferenceVideo:
    category: str
    name: str  # file stem
    path: Path


def scan_dataset(root: Path, only: list[str] | None = None) -> dict[str, list[ReferenceVideo]]:
    """Category -> its videos, sorted by name, for every (or every named) category folder."""
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise InputError(f"{root}: cannot list dataset folder: {e.strerror or e}") from None
    by_name = {p.name: p for p in folders}
    if only:
        missing = [c for c in only if c not in by_name]
        if missing:
            raise InputError(f"{root}: no category folder {missing[0]!r} (found: {', '.join(by_name) or 'none'})")
        folders = [by_name[c] for c in only]
    out: dict[str, list[ReferenceVideo]] = {}
    for folder in folders:
        videos: dict[str, ReferenceVideo] = {}
        for f in sorted(folder.iterdir()):
            if f.name.startswith(".") or f.suffix.lower() not in VIDEO_SUFFIXES or not f.is_file():
                continue
            if f.stem in videos:
                raise InputError(f"{f}: another video in {folder} has the name {f.stem!r}")
            videos[f.stem] = ReferenceVideo(folder.name, f.stem, f)
        out[folder.name] = list(videos.values())
    return out
