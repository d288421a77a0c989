"""Robustness, through real processes: junk in a queue, a second Ctrl-C, Redis killed under
`fleet up`, failed samples in Flower, and the supervisor's restart back-off.

The touch kind (tests/kinds/touch.py) stands in for real work: ``sleep_s`` makes a sample
slow, ``ignore_stop`` makes its job sleep on through a warm shutdown, ``fail`` makes it
raise an error fleet does not classify.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from fleet.contract import CompletionRecord, FailureRecord, TaskPayload, WorkerEntry, queue_name
from fleet.priority import NORMAL_STEP, priority_list, queue_length
from fleet.publisher import encode_message
from tests.integration.conftest import Fleet, LocalFleet, pid_gone, wait_for

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
TOUCH = {"FLEET_KINDS": json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}}),
         "PYTHONPATH": REPO}
HOST = socket.gethostname()


def touch_experiment(folder: Path, items: list[dict], name: str = "robust") -> Path:
    exp = folder / name / "experiment.yaml"
    exp.parent.mkdir(parents=True, exist_ok=True)
    exp.write_text(yaml.safe_dump({"kind": "touch", "name": name, "output": "out", "items": items}), encoding="utf-8")
    return exp


def enqueue(f: Fleet | LocalFleet, exp: Path, **env: str) -> dict:
    return json.loads(f.fleet("enqueue", str(exp), "--json", check=True, **{**TOUCH, **env}).stdout)


def sample_of(f: Fleet, raw: bytes) -> dict:
    """The payload of a message as fleet.publisher writes it (its own, or the queued mark's it refers to)."""
    from fleet.kept_payloads import message_payload

    return message_payload(f.client, f.keys, raw)


def envelope(queue: str, change=None, **top: object) -> bytes:
    """A fleet message for ``queue`` (an invalid payload), changed by ``change(envelope)``."""
    env = json.loads(encode_message(json.dumps({"sample_id": "junk"}), queue, "junk"))
    env.update(top)
    if change is not None:
        change(env)
    return json.dumps(env).encode()


class Unpickled:
    """Creates ``path`` when unpickled: proof that a pickled body was never loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def worker_log(f: Fleet) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(f.tmp.glob("worker*.log")))


# ---- 1. what is not a fleet task is set aside, and the worker goes on -----------------------
def test_messages_that_are_not_fleet_tasks_are_set_aside_and_the_worker_goes_on(fleet_ns: Fleet,
                                                                                 tmp_path: Path) -> None:
    f = fleet_ns
    q = queue_name(f.namespace, "gpu")
    marker = tmp_path / "unpickled"
    pickled = base64.b64encode(pickle.dumps(((Unpickled(marker),), {}, {}))).decode()
    junk = {
        "not JSON": b"\xff\xfe\x00 not json {",
        "a JSON list": b"[1, 2, 3]",
        "no properties": json.dumps({"hello": "world"}).encode(),
        "pickle": envelope(q, body=pickled, **{"content-type": "application/x-python-serialize",
                                               "content-encoding": "binary"}),
        "unknown task": envelope(q, lambda e: e["headers"].update(task="celery.backend_cleanup")),
        "timelimit": envelope(q, lambda e: e["headers"].update(timelimit=5)),  # raised out of Celery's loop
        "chained": envelope(q, body=json.dumps(
            [[{}], {}, {"callbacks": [{"task": "celery.backend_cleanup"}], "errbacks": None, "chain": None,
                         "chord": None}])),
    }
    p = f.start_worker(**TOUCH)
    for raw in junk.values():
        f.client.lpush(q, raw)
    # A fleet message whose payload is no TaskPayload: the runner fails it, with a record.
    f.client.lpush(q, encode_message(json.dumps({"sample_id": "not-a-task", "kind": "touch"}), q, "invalid"))
    # Then real work, in the experiment's priority list (served after the bare list above).
    exp = touch_experiment(tmp_path, [{"name": "after", "text": "still here"}])
    assert enqueue(f, exp)["enqueued"] == 1
    wait_for(lambda: f.done_count() == 1 or p.poll() is not None, 60, "the sample after the junk")
    assert p.poll() is None, worker_log(f)[-3000:]
    assert (exp.parent / "out" / "after.txt").read_text() == "hello still here"

    letters = [json.loads(x) for x in reversed(f.client.lrange(f.keys.dead_letters, 0, -1))]  # oldest first
    assert len(letters) == len(junk), letters
    for (what, raw), letter in zip(junk.items(), letters):
        assert letter["queue"] == q and letter["worker"] == f"cpu0@{HOST}" and letter["at"] > 0, (what, letter)
        if letter["encoding"] == "base64":
            assert base64.b64decode(letter["message"]) == raw, what  # kept as popped
        else:
            assert json.loads(letter["message"]) == json.loads(raw), what
    reasons = [letter["reason"] for letter in letters]
    assert reasons[0].startswith("not JSON") and letters[0]["encoding"] == "base64"
    assert "JSON list" in reasons[1] and "no properties" in reasons[2]
    assert "application/x-python-serialize" in reasons[3] and "JSON only" in reasons[3]
    assert "unknown task 'celery.backend_cleanup'" in reasons[4]
    assert "timelimit" in reasons[5] and "callbacks" in reasons[6]
    assert not marker.exists()  # the pickled body was never loaded

    failure = FailureRecord.model_validate_json(f.client.hget(f.keys.failed, "not-a-task"))
    assert failure.error_type == "PermanentError" and "invalid payload" in failure.message
    assert f.client.llen(q) == 0 and f.client.hlen(f.keys.running) == 0
    assert worker_log(f).count("set aside a message") == len(junk)


# ---- 2. Ctrl-C: the first lets the sample finish, a second gives it back at once -------------
def test_a_first_ctrl_c_lets_the_running_sample_finish(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    exp = touch_experiment(tmp_path, [{"name": "slow", "text": "s", "sleep_s": 2, "ignore_stop": True},
                                      {"name": "next", "text": "n"}])
    assert enqueue(f, exp)["enqueued"] == 2
    p = f.start_worker(**TOUCH)
    wait_for(lambda: f.client.hlen(f.keys.running), 60, "the slow sample to start")
    os.kill(p.pid, signal.SIGINT)
    rc = p.wait(60)
    assert rc == 1, rc  # Celery's status after a Ctrl-C; SIGTERM gives 0
    assert f.done_count() == 1 and (exp.parent / "out" / "slow.txt").exists()  # finished, not given back
    rec = CompletionRecord.model_validate_json(f.client.hvals(f.keys.records)[0])
    assert rec.label == "touch slow" and rec.deliveries == 1
    assert f.client.hlen(f.keys.queued) == 1 and not (exp.parent / "out" / "next.txt").exists()  # took no more
    assert "warm shutdown" in worker_log(f)


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c-twice", "sigterm-then-ctrl-c"])
def test_a_second_ctrl_c_gives_the_running_sample_back_at_once(fleet_ns: Fleet, tmp_path: Path, first: int) -> None:
    f = fleet_ns
    exp = touch_experiment(tmp_path, [{"name": "slow", "text": "s", "sleep_s": 120, "ignore_stop": True},
                                      {"name": "next", "text": "n"}])
    assert enqueue(f, exp)["enqueued"] == 2
    p = f.start_worker(**TOUCH)
    started = exp.parent / "out" / ".fleet-work"
    wait_for(lambda: any(started.rglob("started")), 60, "the slow sample's job to start")
    (sid,) = [k.decode() for k in f.client.hkeys(f.keys.running)]

    os.kill(p.pid, first)
    wait_for(lambda: "warm shutdown" in worker_log(f), 30, "the warm shutdown to begin")
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGINT)
    rc = p.wait(30)
    assert rc == 130 and time.monotonic() - t0 < 5, (rc, worker_log(f)[-3000:])

    # Back at the front of its list (RPUSH: the right end), the same attempt, its start not counted.
    lst = priority_list(queue_name(f.namespace, "gpu"), NORMAL_STEP)
    front = sample_of(f, f.client.lindex(lst, -1))
    assert (front["sample_id"], front["attempt"]) == (sid, 1)
    assert f.client.llen(lst) == 2
    assert f.client.hlen(f.keys.running) == 0 and not f.client.exists(f.keys.lease(sid))
    assert f.client.hexists(f.keys.queued, sid) and f.client.hget(f.keys.deliveries, sid) is None
    # The message it came in is acknowledged away (no redelivery after the visibility timeout).
    ours = [json.loads(v)[2] for v in f.client.hvals("unacked")]
    assert not [rk for rk in ours if str(rk).startswith(f.namespace)]
    assert f.worker_entry() is None
    assert "goes back to its queue" in worker_log(f)

    # The next worker runs it first (its job finds its marker: no second sleep), once.
    f.start_worker(1, **TOUCH)
    wait_for(lambda: f.done_count() == 2, 60, "both samples after the restart")
    recs = sorted((CompletionRecord.model_validate_json(v) for v in f.client.hvals(f.keys.records)),
                  key=lambda r: r.finished_at)
    assert [r.label for r in recs] == ["touch slow", "touch next"]
    assert (recs[0].attempt, recs[0].deliveries) == (1, 1)


# ---- 3. Redis SIGKILLed under `fleet up` ----------------------------------------------------
def test_up_brings_back_a_dead_embedded_redis(local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    f.fleet("up", "--cpu-workers", "1", check=True, **TOUCH)
    wait_for(f.worker_registered, 60, f"the worker\n{f.log_tails()}")
    before = f.state_file()["pids"]
    os.kill(before["redis"], signal.SIGKILL)
    wait_for(lambda: pid_gone(before["redis"]), 10, "Redis to die")
    f.client.connection_pool.disconnect()

    r = f.fleet("up", "--cpu-workers", "1", check=True, **TOUCH)
    assert r.stdout.startswith("fleet is up again: redis had stopped"), r.stdout
    after = f.state_file()["pids"]
    assert after["redis"] != before["redis"] and not pid_gone(after["redis"])
    assert {k: v for k, v in after.items() if k != "redis"} == {k: v for k, v in before.items() if k != "redis"}
    assert f.client.info("server")["process_id"] == after["redis"]
    assert f.fleet("status", check=True).returncode == 0
    again = f.fleet("up", "--cpu-workers", "1", check=True, **TOUCH)
    assert again.stdout.startswith("fleet is already up")

    # The worker reconnected by itself: new work is done.
    exp = touch_experiment(tmp_path, [{"name": "after", "text": "back"}])
    assert enqueue(f, exp)["enqueued"] == 1
    wait_for(lambda: f.done_count() == 1, 60, f"the sample after the restart\n{f.log_tails()}")


def test_down_with_redis_dead_returns_quickly_and_the_finished_sample_is_not_made_again(
        local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    f.fleet("up", "--cpu-workers", "1", check=True, **TOUCH)
    wait_for(f.worker_registered, 60, f"the worker\n{f.log_tails()}")
    exp = touch_experiment(tmp_path, [{"name": "slow", "text": "s", "sleep_s": 60}])
    assert enqueue(f, exp)["enqueued"] == 1
    wait_for(lambda: any((exp.parent / "out" / ".fleet-work").rglob("started")), 60, "the job to start")
    (sid,) = [k.decode() for k in f.client.hkeys(f.keys.running)]
    pids = f.state_file()["pids"]
    os.kill(pids["redis"], signal.SIGKILL)
    wait_for(lambda: pid_gone(pids["redis"]), 10, "Redis to die")

    t0 = time.monotonic()
    r = f.fleet("down", "--grace-s", "60", check=True, timeout_s=90)
    took = time.monotonic() - t0
    assert took < 15, (took, r.stdout, f.log_tails())
    assert "redis had already stopped" in r.stdout
    assert f.processes() == {}
    assert (exp.parent / "out" / "slow.txt").exists()  # its job stopped early and wrote its output

    # Up again: the worker records what it could not (its journal); the sample is not made twice.
    f.client.connection_pool.disconnect()
    f.fleet("up", "--cpu-workers", "1", check=True, **TOUCH)
    wait_for(lambda: f.done_count() == 1, 60, f"the journalled record\n{f.log_tails()}")
    rec = CompletionRecord.model_validate_json(f.client.hget(f.keys.records, sid))
    assert rec.deliveries == 1
    assert (f.logs / "worker-cpu0.log").read_text(errors="replace").count(f"start {sid}") == 1


# ---- 4. Flower: a failed sample is a failed task ---------------------------------------------
def _flower_tasks(f: LocalFleet) -> dict:
    req = urllib.request.Request(f.flower_url + "/api/tasks")
    req.add_header("Authorization", "Basic " + base64.b64encode(":".join(f.flower_login()).encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_flower_shows_failed_samples_as_failed_with_their_error(local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    f.fleet("up", "--cpu-workers", "1", check=True, **TOUCH)
    wait_for(f.worker_registered, 60, f"the worker\n{f.log_tails()}")
    q = queue_name(f.namespace, "gpu")

    def payload(sid: str, root: Path) -> str:
        return TaskPayload(kind="touch", sample_id=sid, experiment="flower", group="g", label=f"touch {sid}",
                           output_path=str(root / f"{sid}.txt"), output_root=str(root), shared={"greeting": "hi"},
                           body={"text": sid, "sleep_s": 0}).to_json()

    ids = {what: str(uuid.uuid4()) for what in ("invalid", "outside", "good")}
    f.client.lpush(q, encode_message(json.dumps({"sample_id": "s-invalid", "kind": "touch"}), q, "invalid",
                                     task_id=ids["invalid"]))
    f.client.lpush(q, encode_message(payload("s-outside", Path("/nonexistent-root")), q, "outside",
                                     task_id=ids["outside"]))
    f.client.lpush(q, encode_message(payload("s-good", tmp_path / "out"), q, "good", task_id=ids["good"]))

    def finished() -> dict | None:
        try:
            tasks = _flower_tasks(f)
        except OSError:
            return None
        got = {what: tasks.get(tid, {}) for what, tid in ids.items()}
        return got if all(t.get("state") in ("SUCCESS", "FAILURE") for t in got.values()) else None

    got = wait_for(finished, 60, f"Flower to see the three tasks end\n{f.log_tails()}")
    assert got["good"]["state"] == "SUCCESS"
    assert got["invalid"]["state"] == "FAILURE"
    assert "SampleFailed" in got["invalid"]["exception"] and "PermanentError: invalid payload" in got["invalid"]["exception"]
    assert got["outside"]["state"] == "FAILURE" and "ForbiddenOutput" in got["outside"]["exception"]
    assert "/nonexistent-root" in got["outside"]["exception"]
    # Acknowledged, never delivered again, never retried by Celery.
    wait_for(lambda: f.client.hlen("unacked") == 0, 10, "the acks")
    assert queue_length(f.client, q) == 0
    log = (f.logs / "worker-cpu0.log").read_text(errors="replace")
    for tid in ids.values():
        assert log.count(f"[{tid}] received") == 1
    assert "Retry in" not in log
    # fleet's own records say the same.
    assert FailureRecord.model_validate_json(f.client.hget(f.keys.failed, "s-outside")).error_type == "ForbiddenOutput"


# ---- 5. the supervisor's back-off ----------------------------------------------------------
_CHILD = r"""
import os, sys, time, redis
from fleet.contract import WorkerEntry
url, key, name, mode, go = sys.argv[1:]
if mode == "healthy":  # a worker that made a sample, then broke
    e = WorkerEntry(name=name, hostname="h", pid=os.getpid(), gpus=(), queues=[], done=1, seen_at=time.time())
    redis.Redis.from_url(url).hset(key, name, e.model_dump_json())
    while not os.path.exists(go):
        time.sleep(0.02)
sys.exit(3)
"""


def test_supervisor_back_off_is_capped_and_starts_over_after_a_sample(fleet_ns: Fleet, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from fleet.settings import load_settings
    from fleet.supervisor import BACKOFF_MAX_S, Running, Supervisor

    f = fleet_ns
    settings = load_settings(broker_url=f.url, namespace=f.namespace, state_dir=tmp_path / "state")
    sup = Supervisor(settings, inventory=None, cpu_workers=1, client=f.client)  # type: ignore[arg-type]
    mode = {"now": "broken"}
    go = tmp_path / "go"

    def start(plan) -> None:  # a stand-in worker process: exits 3 (broken), after a sample when healthy
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, f.url, f.keys.workers, f"{plan.name}@{HOST}",
                                 mode["now"], str(go)], env={**os.environ, "PYTHONPATH": REPO})
        sup.running[plan.name] = Running(plan, proc, time.monotonic())

    sup.start = start  # type: ignore[method-assign]

    def one_exit() -> float:
        sup.reconcile()  # starts it: its back-off has passed
        sup.running["cpu0"].proc.wait(10)
        sup.reconcile()  # sees it exit
        delay = sup.backoff["cpu0"] - time.monotonic()
        sup.backoff["cpu0"] = 0.0  # the test does not wait it out
        return delay

    caplog.set_level("INFO", logger="fleet.supervisor")
    delays = [one_exit() for _ in range(7)]
    assert delays == pytest.approx([2, 4, 8, 16, 32, BACKOFF_MAX_S, BACKOFF_MAX_S], abs=0.5)
    assert "worker cpu0 stopped itself: its samples kept failing with unexpected errors" in caplog.text

    # A worker that made a sample: the next exit waits 2 s again.
    mode["now"] = "healthy"
    sup.reconcile()
    wait_for(lambda: f.client.hexists(f.keys.workers, f"cpu0@{HOST}"), 10, "the stand-in's heartbeat entry")
    sup.reconcile()
    assert sup.exits["cpu0"] == 0 and "worker cpu0 made a sample" in caplog.text
    go.touch()
    sup.running["cpu0"].proc.wait(10)
    sup.reconcile()
    assert sup.backoff["cpu0"] - time.monotonic() == pytest.approx(2, abs=0.5)
    sup.shutdown(grace_s=5)


def test_a_broken_worker_exits_non_zero_and_is_restarted_soon(local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    env = {**TOUCH, "FLEET_MAX_CONSECUTIVE_ERRORS": "2", "FLEET_MAX_ATTEMPTS": "1", "FLEET_PLACEMENT_INTERVAL_S": "0.5"}
    f.fleet("up", "--cpu-workers", "1", check=True, **env)
    wait_for(f.worker_registered, 60, f"the worker\n{f.log_tails()}")
    first = f.worker_pids()["cpu0"]
    exp = touch_experiment(tmp_path, [{"name": "bad1", "fail": "boom 1"}, {"name": "bad2", "fail": "boom 2"},
                                      {"name": "good", "text": "fine"}])
    assert enqueue(f, exp, **env)["enqueued"] == 3

    sup_log = f.logs / "supervisor.log"
    wait_for(lambda: "worker cpu0 stopped itself" in sup_log.read_text(), 60, f"the broken worker's exit\n{f.log_tails()}")
    assert "(exit status 3); restarting in 2 s" in sup_log.read_text()
    wait_for(lambda: f.done_count() == 1, 60, f"the good sample on the restarted worker\n{f.log_tails()}")
    assert f.worker_pids()["cpu0"] != first
    wait_for(lambda: "worker cpu0 made a sample: its restart back-off starts over" in sup_log.read_text(), 30,
             "the back-off to start over")
    fails = [FailureRecord.model_validate_json(v) for v in f.client.hvals(f.keys.failed)]
    assert sorted((x.error_type, x.message) for x in fails) == [("RuntimeError", "boom 1"), ("RuntimeError", "boom 2")]
    w = WorkerEntry.model_validate_json(f.client.hget(f.keys.workers, f"cpu0@{HOST}"))
    assert (w.done, w.failed) == (1, 0)
