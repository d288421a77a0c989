"""Reference video files on the producer side: content identity and a cheap probe.

Planning needs, for every reference video, an identity that changes when the content
changes (it goes into the sample id) and its frame count and size (to validate the
experiment before anything is queued). Both must be fast for thousands of files, so
``content_id`` reads at most 2 MiB and never decodes, and ``probe`` decodes one frame.

Imports ``av`` lazily and never torch, diffsynth or ``workers``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import InputError

_CHUNK = 1 << 20  # 1 MiB read from each end of the file for its content id


def content_id(path: Path) -> str:
    """Content identity of a file without decoding it: 24 hex chars.

    SHA-256 over the file size (bytes) and its first and last 1 MiB. A re-encode, a trim or
    a replaced file changes it; touching or copying the file does not. Edits confined to
    the middle of a large file keep the same id (a deliberate trade for speed).
    Raises InputError when the file can't be read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h = hashlib.sha256()
            h.update(size.to_bytes(8, "little"))
            h.update(f.read(_CHUNK))
            if size > _CHUNK:
                f.seek(max(size - _CHUNK, _CHUNK))  # the tail, without re-reading head bytes
                h.update(f.read(_CHUNK))
    except OSError as exc:
        raise InputError(f"{path}: cannot read video: {exc.strerror or exc}") from exc
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class VideoProbe:
    """What planning needs to know about a reference video."""

    frames: int  # frame count from the container (0 only if the container can't tell)
    width: int  # pixels
    height: int  # pixels
    fps: float  # frames per second (average rate; 0.0 if unknown)


def _reason(exc: BaseException) -> str:
    """A short one-line reason: av's messages repeat the path and errno, which we already give."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def probe(path: Path) -> VideoProbe:
    """Read a video's frame count, size and rate, and decode its first frame.

    Decoding one frame catches files whose header parses but whose video doesn't
    (truncated, wrong codec). Raises InputError ``"<path>: cannot decode video: <reason>"``
    for a missing, empty, corrupt, audio-only or frameless file.
    """
    import av  # lazy: only planning needs it, and the import costs ~100 ms

    path = Path(path)

    def fail(reason: str) -> InputError:
        return InputError(f"{path}: cannot decode video: {' '.join(reason.split())}")

    if not path.is_file():
        raise fail("file not found")
    if path.stat().st_size == 0:
        raise fail("file is empty")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise fail("no video stream")
            stream = container.streams.video[0]
            # One thread: spinning up a decoder thread pool costs more than one small frame.
            stream.thread_type = "SLICE"
            stream.codec_context.thread_count = 1
            first = next(container.decode(stream), None)
            if first is None:
                raise fail("no decodable frames")
            rate = stream.average_rate or stream.guessed_rate
            frames = int(stream.frames or 0)
            if frames <= 0 and stream.duration and stream.time_base and rate:
                # Some containers (e.g. webm) don't store a frame count; estimate from duration.
                frames = int(round(float(stream.duration * stream.time_base * rate)))
            return VideoProbe(
                frames=frames, width=int(first.width), height=int(first.height), fps=float(rate) if rate else 0.0
            )
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, StopIteration) as exc:
        raise fail(_reason(exc)) from exc
