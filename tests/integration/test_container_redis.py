"""docker/redis.sh, the containers' Redis, run on this host: a real redis-server that asks for the
password of its secret file, persists append-only, never evicts, and refuses CONFIG (the
commands the embedded Redis refuses). About 0.3 s; the images themselves are docker/check.sh's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis

from tests.conftest import _redis_server_executable
from tests.integration.conftest import free_ports, wait_for

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "redis.sh"


def _start(tmp_path: Path, secret: str | None) -> tuple[subprocess.Popen, int]:
    exe = _redis_server_executable()
    if exe is None:
        pytest.skip("no redis-server")
    bin_dir, secrets, data = tmp_path / "bin", tmp_path / "secrets", tmp_path / "data"
    for d in (bin_dir, secrets, data):
        d.mkdir()
    (bin_dir / "fleet-redis-server").symlink_to(exe)  # what Dockerfile.control links
    if secret is not None:
        (secrets / "redis_password").write_text(secret + "\n")
    (port,) = free_ports(1)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SECRETS_DIR": str(secrets), "REDIS_DIR": str(data)}
    proc = subprocess.Popen(["sh", str(SCRIPT), "--bind", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def test_redis_asks_for_the_secret_persists_and_never_evicts(tmp_path: Path) -> None:
    proc, port = _start(tmp_path, "pw-0123")
    try:
        anonymous = redis.Redis(port=port, socket_connect_timeout=0.5)

        def answer() -> str | None:
            try:
                anonymous.ping()
            except redis.AuthenticationError:
                return "asks for the password"
            except redis.ConnectionError:
                return None  # not listening yet
            return "open to anyone"

        assert wait_for(answer, 20, "redis.sh's server") == "asks for the password"
        client = redis.Redis(port=port, password="pw-0123")
        assert client.info("persistence")["aof_enabled"] == 1
        assert client.info("memory")["maxmemory_policy"] == "noeviction"
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.config_get("dir")
        assert b"pw-0123" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # not on its command line
    finally:
        proc.kill()
        proc.wait()


def test_redis_without_its_secret_says_so_in_one_line(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, None)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert out.strip() == f"fleet-redis: {tmp_path / 'secrets' / 'redis_password'}: missing; give the service the " \
                          "redis_password secret"
