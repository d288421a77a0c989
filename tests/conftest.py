"""Shared fixtures. Heavy imports (torch, diffsynth) happen only inside fixtures that need them."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Torch on a small machine: one thread per process, or calls slow down 10-50x (DESIGN §4).
# Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# `tests.media` must import however pytest is started (pytest puts only test folders on sys.path).
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Wan2.1 T2V model folder (see workers.tiny_model), built once per session."""
    import torch

    torch.set_num_threads(1)
    from workers.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "wan-tiny"
    build_tiny_model(path)
    return path


@pytest.fixture
def make_video() -> Callable[..., Path]:
    """``make_video(path, frames, width, height, fps=15, seed=0) -> path``: write a small H.264 mp4."""
    from tests.media import make_video as _make_video

    return _make_video
