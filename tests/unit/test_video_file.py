"""fleet.kinds.video.video_file: content identity and probing of reference videos (producer side, no torch)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from fleet.errors import InputError
from fleet.kinds.video.video_file import VideoProbe, content_id, probe


def test_content_id_is_stable_and_follows_content(tmp_path: Path, make_video) -> None:
    a = make_video(tmp_path / "a.mp4", 9, 64, 48, seed=1)
    first = content_id(a)
    assert len(first) == 24 and int(first, 16) >= 0
    assert content_id(a) == first
    # Identity is content, not name or location.
    copy = tmp_path / "sub" / "copy.mp4"
    copy.parent.mkdir()
    shutil.copyfile(a, copy)
    assert content_id(copy) == first
    # Different content, same name: a new id.
    make_video(a, 9, 64, 48, seed=2)
    assert content_id(a) != first


def test_content_id_sees_head_tail_and_size_of_large_files(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    data = bytearray(b"x" * (5 << 20))
    big.write_bytes(data)
    base = content_id(big)
    data[-1:] = b"y"  # last byte: inside the tail window
    big.write_bytes(data)
    assert content_id(big) != base
    big.write_bytes(data + b"z")  # one byte longer
    assert content_id(big) != base


def test_content_id_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.mp4"):
        content_id(tmp_path / "missing.mp4")


def test_probe_reads_frames_size_and_rate(tmp_path: Path, make_video) -> None:
    path = make_video(tmp_path / "镜头仰角旋转.mp4", 13, 96, 64, fps=15)
    assert probe(path) == VideoProbe(frames=13, width=96, height=64, fps=15.0)


def _audio_only(path: Path) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


@pytest.mark.parametrize("kind", ["text", "empty", "missing", "truncated", "audio"])
def test_probe_rejects_non_videos_with_one_line(tmp_path: Path, make_video, kind: str) -> None:
    path = tmp_path / f"{kind}.mp4"
    if kind == "text":
        path.write_text("this is not a video\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = make_video(tmp_path / "full.mp4", 9, 64, 48).read_bytes()
        path.write_bytes(data[: len(data) // 2])  # mp4's index (moov) is at the end: gone
    elif kind == "audio":
        path = _audio_only(tmp_path / "audio.m4a")
    with pytest.raises(InputError) as info:
        probe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot decode video: ")
    assert "\n" not in message


def test_probe_is_fast(tmp_path: Path, make_video) -> None:
    path = make_video(tmp_path / "v.mp4", 17, 96, 64)
    probe(path)  # warm: the first call imports av
    times = []
    for _ in range(10):
        start = time.perf_counter()
        probe(path)
        times.append(time.perf_counter() - start)
    # ~1 ms measured on a 2-core machine; the bound leaves room for a busy CI host.
    assert min(times) < 0.010, f"probe took {min(times) * 1000:.1f} ms at best"

