"""The gallery of ``fleet report``: a small thumbnail of each image output and of each video
output's first frame (PyAV), as a JPEG data URI, linked to the file by a path relative to
the report's folder. Pillow and PyAV are imported only here, and only when there is media.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fleet.contract import CompletionRecord

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"})
MAX_ITEMS = 200
THUMB_PX = 160  # the longer side of a thumbnail
JPEG_QUALITY = 80


@dataclass
class Thumb:
    """One gallery item: the sample, a link to its file, its thumbnail (None: no preview, ``error`` says why)."""

    sample_id: str
    group: str
    label: str
    href: str  # URL relative to the report's folder
    media: str  # "image" or "video"
    data_uri: str | None
    error: str = ""


@dataclass
class Gallery:
    items: list[Thumb]
    media: int  # done samples whose output is an image or a video file that exists
    left_out: int  # of those, not shown (over the cap)
    missing: int  # done samples of media whose file is gone

    def as_dict(self) -> dict[str, int]:
        return {"shown": len(self.items), "media": self.media, "left_out": self.left_out, "missing": self.missing,
                "previews": sum(1 for t in self.items if t.data_uri)}


def media_kind(path: str) -> str | None:
    """"image", "video" or None, from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def relative_href(target: str, base: Path) -> str:
    """``target`` as a URL relative to the folder ``base`` (each path part percent-encoded)."""
    rel = os.path.relpath(Path(target).absolute(), Path(base).absolute())
    return "/".join(quote(part) for part in Path(rel).parts)


def first_frame(path: Path) -> Any:
    """The first decoded frame of a video, as a PIL image."""
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            return frame.to_image()
    raise ValueError("no video frame")


def thumbnail_uri(path: Path, media: str, px: int = THUMB_PX) -> str:
    """A JPEG data URI of the file (or its first frame), its longer side at most ``px``."""
    from PIL import Image

    if media == "video":
        img = first_frame(path)
    else:
        img = Image.open(path)
        img.draft("RGB", (px, px))  # JPEG decodes at a reduced scale
    img = img.convert("RGB")
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gallery(records: Iterable[CompletionRecord], report_dir: Path, limit: int = MAX_ITEMS,
            px: int = THUMB_PX) -> Gallery:
    """Thumbnails of the first ``limit`` media outputs, by group, label and sample id."""
    media = [(r, k) for r in records if (k := media_kind(r.output_path))]
    media.sort(key=lambda rk: (rk[0].group, rk[0].label, rk[0].sample_id))
    present = [(r, k) for r, k in media if Path(r.output_path).is_file()]
    items = []
    for r, k in present[:max(0, limit)]:
        try:
            uri, err = thumbnail_uri(Path(r.output_path), k, px), ""
        except Exception as e:  # a damaged or unreadable file: listed without a preview
            uri, err = None, f"{type(e).__name__}: {e}"[:200]
        items.append(Thumb(r.sample_id, r.group, r.label, relative_href(r.output_path, report_dir), k, uri, err))
    return Gallery(items, len(present), max(0, len(present) - len(items)), len(media) - len(present))
