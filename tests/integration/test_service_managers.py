"""The fleet under a service manager (systemd, Slurm), through real processes.

- `fleet up --foreground` is the service's main process: SIGTERM to it alone (systemd's
  ``KillMode=mixed``, a Slurm signal to the batch shell) stops its workers gracefully, the
  running sample given back once the grace period is over, and it exits 0; a child of it
  that dies (here its embedded Redis) makes it stop everything and exit 1.
- A `fleet worker` that stops itself because it is broken exits with WORKER_EXIT_BROKEN (3),
  which ``Restart=on-failure`` restarts (tests/unit/test_ops_units.py checks the units).
- A shell command that the job-wide SIGTERM ends before its worker stops it goes back to its
  queue (the Slurm run itself: bench/slurm_check.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.contract import WORKER_EXIT_BROKEN, FailureRecord, queue_name
from fleet.priority import NORMAL_STEP, priority_list
from fleet.publisher import message_sample_id
from tests.integration.conftest import Fleet, LocalFleet, pid_gone, wait_for
from tests.integration.test_commands_fleet import commands_yaml
from tests.integration.test_robustness import TOUCH, enqueue, touch_experiment

pytestmark = pytest.mark.integration

GRACE_S = 2.0  # the workers' grace period after SIGTERM: short, so that the give-back path runs quickly


def _foreground(f: Fleet | LocalFleet, log: Path, *args: str, **env: str) -> subprocess.Popen:
    """`fleet up --foreground --cpu-workers 1 ARGS` as a service manager starts it (no new session:
    a signal goes to this pid only, as systemd's KillMode=mixed sends it)."""
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", "up", "--foreground", "--cpu-workers", "1",
                             "--grace-s", str(GRACE_S), *args], env=f.env(**{**TOUCH, **env}),
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _state(f: Fleet | LocalFleet) -> dict:
    try:
        return json.loads((f.tmp / "state" / "run" / "fleet.json").read_text())
    except (OSError, ValueError):
        return {}


def _workers(f: Fleet | LocalFleet) -> dict[str, int]:
    try:
        return json.loads((f.tmp / "state" / "run" / "workers.json").read_text())
    except (OSError, ValueError):
        return {}


def test_up_foreground_stops_on_sigterm_giving_back_the_running_sample(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    log = tmp_path / "foreground.log"
    p = _foreground(f, log, FLEET_PLACEMENT_INTERVAL_S="0.5")
    f.procs.append(p)
    wait_for(lambda: _workers(f) or p.poll() is not None, 60, "the supervisor's first worker")
    assert p.poll() is None, log.read_text()
    assert _state(f)["pids"] == {"supervisor": p.pid} and _state(f)["foreground"] is True
    worker_pid = _workers(f)["cpu0"]
    # A second start sees the fleet up: one line, exit 1.
    r = f.fleet("up", "--foreground", "--cpu-workers", "1", **TOUCH)
    assert r.returncode == 1 and r.stderr.startswith("fleet: error: fleet is already up"), r.stderr

    # A sample whose job does not honour the stop: it outlives the grace period and is given back.
    exp = touch_experiment(tmp_path, [{"name": "slow", "text": "s", "sleep_s": 120, "ignore_stop": True}])
    assert enqueue(f, exp)["enqueued"] == 1
    wait_for(lambda: any((exp.parent / "out" / ".fleet-work").rglob("started")), 60, "the slow sample to start")
    (sid,) = [k.decode() for k in f.client.hkeys(f.keys.running)]

    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(GRACE_S + 30)
    out = log.read_text()
    assert rc == 0, out
    assert time.monotonic() - t0 < GRACE_S + 15, out  # grace, then the give-back, then the exit
    assert "SIGTERM: stopping the fleet" in out and "fleet stopped" in out
    assert pid_gone(worker_pid)
    lst = priority_list(queue_name(f.namespace, "gpu"), NORMAL_STEP)
    assert (message_sample_id(f.client.lindex(lst, -1)), f.client.llen(lst)) == (sid, 1)
    assert f.client.hlen(f.keys.running) == 0 and f.client.hexists(f.keys.queued, sid)
    assert _state(f) == {} and _workers(f) == {}


def test_up_foreground_exits_1_when_its_redis_dies(local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    log = tmp_path / "foreground.log"
    p = _foreground(f, log, FLEET_PLACEMENT_INTERVAL_S="0.5")
    try:
        wait_for(lambda: _workers(f) or p.poll() is not None, 60, "the supervisor's first worker")
        wait_for(lambda: f.worker_registered() or p.poll() is not None, 60, "the worker to consume")
        assert p.poll() is None, log.read_text()
        pids = _state(f)["pids"]
        assert set(pids) == {"supervisor", "redis"}
        worker_pid = _workers(f)["cpu0"]
        os.kill(pids["redis"], signal.SIGKILL)
        rc = p.wait(GRACE_S + 40)
        out = log.read_text()
        assert rc == 1, out
        assert "redis exited" in out and "stopping the fleet (exit status 1)" in out
        assert pid_gone(worker_pid) and f.processes() == {}
        assert _state(f) == {}
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_broken_fleet_worker_exits_with_status_3(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    env = {**TOUCH, "FLEET_MAX_CONSECUTIVE_ERRORS": "1", "FLEET_MAX_ATTEMPTS": "1"}
    p = f.start_worker(**env)  # `fleet worker --cpu`, which execs the worker: its status is the process's
    exp = touch_experiment(tmp_path, [{"name": "bad", "fail": "CUDA error: an illegal memory access"}])
    assert enqueue(f, exp, **env)["enqueued"] == 1
    assert p.wait(60) == WORKER_EXIT_BROKEN == 3
    (fail,) = [FailureRecord.model_validate_json(v) for v in f.client.hvals(f.keys.failed)]
    assert (fail.error_type, fail.message) == ("RuntimeError", "CUDA error: an illegal memory access")


def test_a_command_signalled_with_its_worker_goes_back_to_its_queue(fleet_ns: Fleet, tmp_path: Path) -> None:
    """Slurm at a job's end (and systemd's control-group kill) sends SIGTERM to every process at
    once: the command dies of it before its worker stops it. Not a failure: back to its queue."""
    f = fleet_ns
    root = tmp_path / "exp"
    exp = commands_yaml(root, [{"name": "long", "cmd": "echo $$ > long.pid; exec sleep 300", "gpus": 0}], retries=0)
    w = f.start_named_worker("cpu0", "--cpu", "--allow-commands")
    f.enqueue(exp)
    pid = int(wait_for(lambda: (root / "long.pid").exists() and (root / "long.pid").read_text().strip(), 60,
                       "the command to start"))
    (sid,) = [k.decode() for k in f.client.hkeys(f.keys.running)]
    os.kill(pid, signal.SIGTERM)  # the command first, as the signal may reach it first
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait(30) == 0
    assert f.client.hexists(f.keys.queued, sid) and not f.client.hlen(f.keys.running)
    assert not f.client.hlen(f.keys.failed) and f.done_count() == 0
