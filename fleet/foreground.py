"""``fleet up --foreground``: the fleet of this host in one process, for a service manager.

systemd (ops/fleet.service) and Slurm (ops/slurm-workers.sbatch) want the process they start
to be the service: it must not daemonize, it must stop cleanly on SIGTERM, and its exit
status must say whether it failed. So this process runs the supervisor's loop itself
(fleet.supervisor: one worker per usable GPU, restarts, placement) instead of spawning it,
and starts as its children only an embedded Redis (when no ``broker_url`` is set) and, with
``--flower``, Flower and the /metrics endpoint.

- SIGTERM or Ctrl-C (SIGINT): the workers get SIGTERM (the running sample finishes, or its
  job, seeing ``JobContext.stopping``, gives it back: commands end, trainings checkpoint);
  after ``grace_s`` a worker still running gets SIGINT, its second signal, and puts its
  sample back at the front of its queue at once (workers/main.py). Then Flower, /metrics and
  Redis are stopped, and the process exits 0.
- A child that dies (Redis, Flower, /metrics) or an error in the loop is a failure: the
  same shutdown, then exit status 1, so that ``Restart=on-failure`` starts the whole
  service again. Workers that die are the supervisor's to restart, as under `fleet up`.
- It writes the same state file as `fleet up` (its own pid as ``supervisor``): `fleet down`
  stops it with SIGTERM, and `fleet up` or a second foreground start sees it is up.

The supervisor logs to stderr (the journal, or the Slurm job's output); workers, Flower and
/metrics log to their files in ``<state_dir>/logs`` as under `fleet up`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import redis

from fleet.broker import connect
from fleet.credentials import mask_url
from fleet.errors import BrokerUnavailable, ConfigError
from fleet.gpu_inventory import inventory_from_env
from fleet.launcher import (
    FLOWER_GRACE_S,
    FLOWER_TASK_COLUMNS,
    _http_ok,
    _lock,
    _spawn,
    _state_file,
    _wait,
    alive,
    child_env,
    flower_env,
    flower_login,
    launch_of,
    read_state,
    start_embedded_redis,
    stop_pids,
    write_json_atomic,
)
from fleet.placement import check_feasible
from fleet.settings import FleetSettings
from fleet.supervisor import Supervisor

log = logging.getLogger("fleet.foreground")

TICK_S = 0.2  # how often the loop looks for a stop request between reconciles (a prompt SIGTERM)


def run_foreground(settings: FleetSettings, cpu_workers: int | None = None, with_flower: bool = False,
                   grace_s: float = 60.0) -> int:
    """Run the fleet of this host until SIGTERM/SIGINT (returns 0) or a failure (returns 1).
    Errors at start (placement never met, Redis unreachable, already up) raise FleetError."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if not stop.is_set():
            log.info("%s: stopping the fleet (workers get %.0f s to finish or give back their samples)",
                     signal.Signals(signum).name, grace_s)
        stop.set()

    # Before anything starts: a SIGTERM during the start stops what has started, not only us.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _log_to_stderr(settings)
    children = _start_children(settings, cpu_workers, with_flower)
    failure = ""
    sup = None
    try:
        client = _client(settings, cpu_workers)
        sup = Supervisor(settings, inventory_from_env(), cpu_workers=cpu_workers, client=client,
                         interval_s=settings.placement_interval_s)
        log.info("fleet is up in the foreground (pid %s): redis %s%s; SIGTERM or Ctrl-C stops it",
                 os.getpid(), mask_url(settings.effective_broker_url), ", flower and /metrics" if with_flower else "")
        next_reconcile = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_reconcile:
                sup.reconcile()
                next_reconcile = time.monotonic() + sup.interval_s
            dead = [name for name, pid in children.items() if not alive(pid)]
            if dead:
                failure = f"{dead[0]} exited (see {settings.logs / (dead[0] + '.log')})"
                break
            stop.wait(TICK_S)
    except Exception as e:  # logged with its traceback; the exit status says the service failed
        log.exception("the supervisor failed")
        failure = f"the supervisor failed: {type(e).__name__}: {e}"
    finally:
        if failure:
            log.error("%s; stopping the fleet (exit status 1)", failure)
        if sup is not None:
            sup.shutdown(grace_s)
        _stop_children(children)
        _state_file(settings).unlink(missing_ok=True)
    log.info("fleet stopped%s", " after a failure" if failure else "")
    return 1 if failure else 0


def _start_children(settings: FleetSettings, cpu_workers: int | None, with_flower: bool) -> dict[str, int]:
    """Check that this host's fleet is not up, start the embedded Redis (no ``broker_url``) and
    Flower with /metrics (``with_flower``), and write the state file; returns the children's
    pids by name. Raises FleetError (what was started is stopped again)."""
    children: dict[str, int] = {}
    with _lock(settings):
        state = read_state(settings)
        live = {k: v for k, v in state.get("pids", {}).items() if alive(v)}
        if live:
            raise ConfigError(f"fleet is already up on this host (pids {live}); run `fleet down` first, or give "
                              "this one another state_dir")
        if not cpu_workers:
            with inventory_from_env() as inv:
                check_feasible(inv.snapshot(), settings.placement)
        try:
            if settings.broker_url is None:
                children["redis"] = start_embedded_redis(settings)
            else:
                connect(settings, timeout_s=2.0).close()  # BrokerUnavailable: one line, password masked
            env = child_env(settings)
            login = ""
            if with_flower:
                user, password, where = flower_login(settings)
                login = f"login {user}, {where}"
                children["flower"] = _spawn(
                    [sys.executable, "-m", "workers.flower", f"--address={settings.flower_address}",
                     f"--port={settings.flower_port}", f"--tasks-columns={FLOWER_TASK_COLUMNS}"],
                    settings.logs / "flower.log", flower_env(env, user, password))
                children["metrics"] = _spawn([sys.executable, "-m", "fleet.cli", "metrics"],
                                             settings.logs / "metrics.log", env)
            flower_url = f"http://{settings.flower_address}:{settings.flower_port}" if with_flower else ""
            metrics_url = f"http://127.0.0.1:{settings.metrics_port}/metrics" if with_flower else ""
            write_json_atomic(_state_file(settings), {
                "pids": {"supervisor": os.getpid(), **children}, "foreground": True,
                "broker_url": mask_url(settings.effective_broker_url), "flower_url": flower_url,
                "metrics_url": metrics_url, "flower_login": login, "started_at": time.time(),
                "launch": launch_of(settings, cpu_workers),
            })
            if with_flower:
                _wait(lambda: _http_ok(flower_url + "/healthcheck") or not alive(children["flower"]), 30, "Flower",
                      settings.logs / "flower.log")
                _wait(lambda: _http_ok(f"http://127.0.0.1:{settings.metrics_port}/healthcheck")
                      or not alive(children["metrics"]), 30, "the metrics endpoint", settings.logs / "metrics.log")
            for name, pid in children.items():
                if not alive(pid):
                    raise ConfigError(f"{name} exited at start; see {settings.logs / (name + '.log')}")
        except BaseException:
            _stop_children(children)
            _state_file(settings).unlink(missing_ok=True)
            raise
    return children


def _stop_children(children: dict[str, int]) -> None:
    """Flower and /metrics first (they keep nothing), Redis last (the workers wrote to it)."""
    stop_pids({k: v for k, v in children.items() if k != "redis"}, grace_s=FLOWER_GRACE_S)
    if "redis" in children:
        stop_pids({"redis": children["redis"]}, grace_s=10)


def _client(settings: FleetSettings, cpu_workers: int | None) -> redis.Redis | None:
    """The supervisor's Redis client (queued multi-GPU work; its workers' heartbeat entries).
    CPU workers need none: only the reset of a restart back-off is lost without it."""
    try:
        return connect(settings, timeout_s=2.0)
    except BrokerUnavailable:
        if not cpu_workers:
            raise
        return None


def _log_to_stderr(settings: FleetSettings) -> None:
    """The supervisor's decisions at the settings' level, time-stamped, on stderr (the CLI set
    up WARNING-only logging there)."""
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    for h in root.handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
