"""Reference videos as the pipeline's ``input_video``: exactly N RGB frames at W x H."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from fleet.errors import InputError


def load_frames(path: Path, width: int, height: int, frames: int) -> list[Image.Image]:
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
