"""Small media files for tests, written with PyAV (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_video(path: Path, frames: int, width: int, height: int, fps: int = 15, seed: int = 0) -> Path:
    """Write an H.264 mp4 of ``frames`` frames at ``width`` x ``height`` pixels and ``fps``.

    Each frame is a distinct colour gradient plus seeded noise, so videos made with
    different seeds or sizes differ in content. Width and height must be even (yuv420p).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1  # keep tests light on 2 cores
        for i in range(frames):
            img = np.stack(
                [(xs * 255 // max(width - 1, 1) + 20 * i) % 256, (ys * 255 // max(height - 1, 1)) % 256,
                 np.full_like(xs, (40 * i) % 256)],
                axis=-1,
            ).astype(np.uint8)
            img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_frames(path: Path) -> np.ndarray:
    """Decode every frame of a video as RGB: array of shape (frames, height, width, 3), uint8."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
