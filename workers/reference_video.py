"""Reference videos as the pipeline's ``input_video``: exactly N RGB frames at W x H.

Decoding and resizing a reference video is CPU work on the sample's critical path (the
GPU waits for it), and every reference video serves several samples (its prompts times
its seeds, planned next to each other). So a worker keeps the frames of its last
``KEPT_VIDEOS`` videos, keyed by the file's identity (path, size, mtime, inode) and the
frames asked for: a changed file is decoded again. The pipeline only reads the images.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from fleet.errors import InputError

# Videos whose decoded frames a worker keeps: 832x480x81 RGB is about 97 MB each.
KEPT_VIDEOS = 2
_kept: OrderedDict[tuple, list[Image.Image]] = OrderedDict()
_kept_lock = threading.Lock()


def load_frames(path: Path, width: int, height: int, frames: int) -> list[Image.Image]:
    """``decode_frames``, or the frames this process decoded last time for the same file
    (unchanged) and the same size and count. Raises as ``decode_frames``."""
    try:
        st = os.stat(path)
        key: tuple | None = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, width, height, frames)
    except OSError:
        key = None  # decode_frames says what is wrong with it
    if key is not None:
        with _kept_lock:
            found = _kept.get(key)
            if found is not None:
                _kept.move_to_end(key)
                return list(found)
    decoded = decode_frames(path, width, height, frames)
    if key is not None and KEPT_VIDEOS > 0:
        with _kept_lock:
            _kept[key] = decoded
            while len(_kept) > KEPT_VIDEOS:
                _kept.popitem(last=False)
    return list(decoded)


def decode_frames(path: Path, width: int, height: int, frames: int) -> list[Image.Image]:
    """Decode ``path`` into exactly ``frames`` RGB images of ``width`` x ``height`` pixels.

    Each frame is resized to the exact size (aspect ratio not kept: the sample's size is
    the experiment's decision). A longer video is cut after ``frames`` frames, and only
    that many are decoded; a shorter one loops from its first frame. Raises InputError
    ``"<path>: cannot decode video: <reason>"`` for a missing, corrupt or frameless file.
    """
    import av

    path = Path(path)
    if width <= 0 or height <= 0 or frames <= 0:
        raise ValueError(f"load_frames: need positive width, height and frames, got {width}x{height}x{frames}")

    def fail(reason: str) -> InputError:
        return InputError(f"{path}: cannot decode video: {' '.join(reason.split())}")

    if not path.is_file():
        raise fail("file not found")
    decoded: list[Image.Image] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise fail("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # whole videos: frame threading pays off here
            for frame in container.decode(stream):
                img = frame.to_image()  # RGB24 PIL image
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BICUBIC)
                decoded.append(img.convert("RGB"))
                if len(decoded) == frames:
                    break
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        # Also after some good frames: a damaged tail would silently turn into a loop.
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise fail(f"frame {len(decoded)}: {reason}" if decoded else str(reason)) from exc
    if not decoded:
        raise fail("no decodable frames")
    # Loop a short video; PIL images are only read by the pipeline, so repeats may share objects.
    return [decoded[i % len(decoded)] for i in range(frames)]
