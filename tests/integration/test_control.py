"""`fleet cancel`, `pause`/`resume`, `retry` and experiment priority (fleet.control), on a real
Redis with real worker processes running the test kind (tests/kinds/touch.py).

Leases and heartbeats are fast here (FLEET_LEASE_TTL_S=3, FLEET_HEARTBEAT_S=0.5); the
reaper's lost-message recovery waits max(10 s, two beats) before it republishes, so the
tests that must show "nothing publishes a cancelled or parked sample again" wait until that
recovery has demonstrably run: they lose one message of another experiment on purpose and
wait until the reaper has published it again and it is done.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import yaml

from fleet import control, records
from fleet.contract import CompletionRecord, FailureRecord, RunningEntry, TaskPayload, queue_name
from fleet.priority import PRIORITIES, SEP, STEPS, priority_list, queue_length
from fleet.publisher import encode_message
from fleet.settings import load_settings
from tests.integration.conftest import Fleet, wait_for

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
TOUCH = json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}})
KIND_ENV = {"FLEET_KINDS": TOUCH, "PYTHONPATH": REPO}


# ---- helpers ---------------------------------------------------------------------------------------
def touch_exp(tmp: Path, name: str, items: list[dict], **fields: object) -> Path:
    """An experiment of the touch kind in its own folder: ``tmp/<name>/experiment.yaml``."""
    path = tmp / name / "experiment.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"kind": "touch", "name": name, "output": "out", "items": items, **fields},
                                   allow_unicode=True), encoding="utf-8")
    return path


def items(*names: str, **extra: object) -> list[dict]:
    return [{"name": n, "text": n, **extra} for n in names]


def run(f: Fleet, *args: str) -> dict:
    """A `fleet` command with the touch kind and --json; its JSON answer."""
    r = f.fleet(*args, "--json", check=True, **KIND_ENV)
    return json.loads(r.stdout)


def worker(f: Fleet, **extra: str):
    return f.start_worker(**KIND_ENV, **extra)


def plan_ids(f: Fleet, exp: Path) -> dict[str, str]:
    """item name -> sample id, as the touch kind plans them."""
    from fleet.experiment import load_experiment
    from fleet.kinds import KindModules
    from fleet.planner import plan_experiment

    kinds = {"touch": KindModules(planner="tests.kinds.touch", job="tests.kinds.touch")}
    e = load_experiment(exp, None, kinds)
    return {Path(s.output_path).stem: s.sample_id for s in plan_experiment(e, None, None, kinds).samples}


def waiting(f: Fleet) -> list[control.Message]:
    """Every message in the namespace's queue lists (all priorities); a reference's experiment
    and group are its queued mark's."""
    return [m for lst in control.queue_lists(f.client, f.keys)
            for m in control.decode_all(f.client, f.keys, f.client.lrange(lst, 0, -1)) if m is not None]


def parked(f: Fleet) -> list[control.Message]:
    return [m for lst in control.parked_lists(f.client, f.keys)
            for m in control.decode_all(f.client, f.keys, f.client.lrange(lst, 0, -1)) if m is not None]


def in_flight(f: Fleet) -> int:
    """Messages of this namespace popped by a worker and not acknowledged yet (kombu's unacked hash)."""
    prefix = queue_name(f.namespace, "")
    return sum(1 for v in f.client.hvals(records.KOMBU_UNACKED) if str(json.loads(v)[2]).startswith(prefix))


def done_records(f: Fleet, experiment: str) -> list[CompletionRecord]:
    """The experiment's completion records, in the order they finished."""
    recs = [CompletionRecord.model_validate_json(v) for v in f.client.hvals(f.keys.records)]
    return sorted((r for r in recs if r.experiment == experiment), key=lambda r: r.finished_at)


def lose_message(f: Fleet, sample_id: str) -> None:
    """Take one sample's message out of its queue, as a Redis restart between a worker's BRPOP and
    its bookkeeping does: the sample stays marked queued with its kept payload."""
    for lst in control.queue_lists(f.client, f.keys):
        for raw in f.client.lrange(lst, 0, -1):
            m = control.decode(raw)
            if m is not None and m.sample_id == sample_id:
                assert f.client.lrem(lst, 1, raw) == 1
                return
    raise AssertionError(f"no message of {sample_id}")


def worker_log(f: Fleet) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(f.tmp.glob("worker*.log")))


def running_label(f: Fleet, label: str) -> bool:
    w = f.worker_entry()
    return w is not None and w.label == label


# ---- cancel ------------------------------------------------------------------------------------------
def test_cancel_removes_queued_samples_and_nothing_publishes_them_again(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    a = touch_exp(tmp_path, "doomed", items("a1", "a2", "a3") + items("g1", group="other"))
    b = touch_exp(tmp_path, "kept", items("b1", "b2"))
    assert run(f, "enqueue", str(a))["enqueued"] == 4
    assert run(f, "enqueue", str(b))["enqueued"] == 2
    ids_a, ids_b = plan_ids(f, a), plan_ids(f, b)
    lose_message(f, ids_b["b2"])  # the reaper must publish this one again, and only this one

    # --category is --group: only that group goes first.
    res = run(f, "cancel", "doomed", "--category", "other")
    assert res == {"experiment": "doomed", "groups": ["other"], "cancelled": 1, "running": 0, "messages_removed": 1}
    r = f.fleet("cancel", str(a), check=True, **KIND_ENV)  # by file; plain text
    assert r.stdout.strip() == "cancelled 3 queued samples of doomed (0 running asked to stop)"

    gone = set(ids_a.values())
    assert {m.experiment for m in waiting(f)} == {"kept"} and len(waiting(f)) == 1
    assert not gone & {k.decode() for k in f.client.hkeys(f.keys.queued)}
    assert not gone & {k.decode() for k in f.client.hkeys(f.keys.payloads)}
    # Lost-message recovery, two beats apart, sees only the lost message of "kept".
    prefix = queue_name(f.namespace, "")
    assert records.stale_queued(f.client, f.keys, prefix) == [ids_b["b2"]]

    worker(f)
    # b2 comes back only through the reaper's lost-message recovery (grace >= 10 s): once it
    # is done, that recovery has run over the cancelled samples for several beats.
    wait_for(lambda: f.client.sismember(f.keys.done, ids_b["b2"]), 90, "the reaper to recover the lost b2")
    wait_for(lambda: f.done_count() == 2, 30, "b1 and b2 done")
    assert not gone & {k.decode() for k in f.client.smembers(f.keys.done)}
    assert not gone & {k.decode() for k in f.client.hkeys(f.keys.payloads)}
    assert not gone & {k.decode() for k in f.client.hkeys(f.keys.queued)}
    assert not gone & {k.decode() for k in f.client.hkeys(f.keys.running)}
    assert waiting(f) == [] and not any((a.parent / "out").glob("*.txt"))
    assert "was cancelled" not in worker_log(f)  # none of them was even delivered

    # Cancelled is not forbidden: enqueueing the experiment again publishes it anew.
    assert run(f, "enqueue", str(a))["enqueued"] == 4
    wait_for(lambda: f.done_count() == 6, 60, "the re-enqueued experiment done")


def test_a_message_popped_before_the_cancel_is_skipped_not_run(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    a = touch_exp(tmp_path, "popped", items("p1"))
    run(f, "enqueue", str(a))
    (lst,) = control.queue_lists(f.client, f.keys)
    (message,) = f.client.lrange(lst, 0, -1)
    f.client.delete(lst)  # "popped" by a worker ...
    assert run(f, "cancel", "popped")["cancelled"] == 1  # ... the cancel finds its queued mark, not its message
    f.client.rpush(lst, message)  # ... and the worker gets it now
    worker(f)
    wait_for(lambda: "was cancelled; skipping it" in worker_log(f), 60, "the worker to skip the cancelled sample")
    wait_for(lambda: not f.client.llen(lst) and not in_flight(f), 30, "the message acknowledged")
    sid = plan_ids(f, a)["p1"]
    assert not f.client.sismember(f.keys.done, sid) and not f.client.hexists(f.keys.running, sid)
    assert not f.client.hexists(f.keys.failed, sid) and not (a.parent / "out" / "p1.txt").exists()


def test_running_samples_of_a_cancelled_experiment_stop_or_finish_and_are_never_published_again(
        fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    a = touch_exp(tmp_path, "half", [{"name": "slow", "text": "s", "sleep_s": 60}] + items("h1", "h2"))
    run(f, "enqueue", str(a))
    worker(f)
    wait_for(lambda: running_label(f, "touch slow"), 60, "the worker running the slow sample")
    t0 = time.monotonic()
    res = run(f, "cancel", "half")
    assert (res["cancelled"], res["running"]) == (2, 1)
    # The heartbeat sees the cancellation and sets the sample's stop event; the touch job honours
    # it (it stops sleeping and writes its file), so the sample ends long before its 60 s.
    ids = plan_ids(f, a)
    wait_for(lambda: f.client.sismember(f.keys.done, ids["slow"]), 30, "the cancelled running sample to end")
    assert time.monotonic() - t0 < 30
    wait_for(lambda: f.worker_entry() is not None and f.worker_entry().sample_id is None, 10, "the worker idle")
    assert waiting(f) == [] and f.client.hlen(f.keys.queued) == 0 and f.client.hlen(f.keys.running) == 0
    assert not f.client.sismember(f.keys.done, ids["h1"]) and not f.client.sismember(f.keys.done, ids["h2"])

    # A job that ignores the stop event runs on; when it then fails, the error would be retried,
    # but a cancelled sample is not: no retry, no failure record, nothing queued.
    b = touch_exp(tmp_path, "stubborn", [{"name": "stub", "text": "s", "sleep_s": 3, "ignore_stop": True,
                                          "fail": "boom after the cancel"}])
    run(f, "enqueue", str(b))
    wait_for(lambda: running_label(f, "touch stub"), 60, "the worker running the stubborn sample")
    assert run(f, "cancel", "stubborn")["running"] == 1
    wait_for(lambda: "was cancelled; not retrying it" in worker_log(f), 30, "the stubborn sample to fail, cancelled")
    sid = plan_ids(f, b)["stub"]
    wait_for(lambda: not f.client.hexists(f.keys.running, sid), 10, "its run ended")
    assert waiting(f) == [] and not f.client.hexists(f.keys.queued, sid) and not f.client.hexists(f.keys.failed, sid)
    assert not f.client.sismember(f.keys.done, sid) and not f.client.hexists(f.keys.payloads, sid)


@pytest.fixture
def runner_for(fleet_ns: Fleet, monkeypatch: pytest.MonkeyPatch):
    """A SampleRunner on the test's namespace whose job (every kind) is ``job(task, ctx)``."""
    from workers.jobs import JobRegistry
    from workers.runner import SampleRunner

    class OneJob(JobRegistry):
        def __init__(self, job) -> None:
            super().__init__()
            self.the_job = job

        def job(self, kind: str):
            return self.the_job

    def make(job, **settings: object) -> SampleRunner:
        s = load_settings(broker_url=fleet_ns.url, namespace=fleet_ns.namespace, retry_backoff_s=0, output_roots=[fleet_ns.tmp],
                          state_dir=fleet_ns.tmp / "state", heartbeat_s=0.05, lease_ttl_s=0.2,
                          max_consecutive_errors=100, **settings)
        r = SampleRunner(s, fleet_ns.client, f"cpu0@{socket.gethostname()}", (), "cpu", jobs=OneJob(job))
        return r

    return make


def a_task(f: Fleet, experiment: str = "e", sid: str = "s" * 32, **over: object) -> dict:
    d = {"schema": "fleet.task/1", "kind": "touch", "sample_id": sid, "experiment": experiment, "group": "g",
         "label": "a task", "output_path": str(f.tmp / "out" / f"{sid}.txt"), "output_root": str(f.tmp / "out"),
         "gpus": 0, "shared": {"greeting": "hello"}, "body": {"text": "x", "sleep_s": 0}}
    d.update(over)
    return d


def publish_one(f: Fleet, task: dict, queue: str, step: int) -> None:
    """What enqueue leaves for one sample: its queued mark keeping its payload (here whole), and a
    message referring to it in its priority list."""
    from fleet.kept_payloads import kept_payload, reference

    f.client.hset(f.keys.queued, task["sample_id"], kept_payload(queue, json.dumps(task)))
    f.client.hset(control.ControlKeys(f.namespace).priorities, task["experiment"], step)
    f.client.lpush(priority_list(queue, step),
                   encode_message(reference(task["sample_id"]), queue, task["label"], priority=step))


def test_a_cancelled_sample_that_fails_is_not_retried(fleet_ns: Fleet, runner_for) -> None:
    f = fleet_ns
    q = queue_name(f.namespace, "gpu")

    def cancelled_mid_run(task: TaskPayload, ctx) -> None:
        assert control.cancel(f.client, f.namespace, task.experiment).running == 1
        raise RuntimeError("CUDA error: something unexpected")  # would be retried if not cancelled

    task = a_task(f)
    publish_one(f, task, q, PRIORITIES["normal"])
    f.client.delete(priority_list(q, 6))  # delivered
    r = runner_for(cancelled_mid_run)
    assert r.run(task, q) == "cancelled"
    assert queue_length(f.client, q) == 0 and not f.client.hexists(f.keys.queued, task["sample_id"])
    assert not f.client.hexists(f.keys.failed, task["sample_id"]) and not f.client.hexists(f.keys.running, task["sample_id"])
    assert r.run(task, q) == "skipped-cancelled"  # and a late duplicate of its message is skipped

    # A dead worker's cancelled sample is dropped by the reaper, not published again.
    from workers.heartbeat import Heartbeat

    task2 = a_task(f, sid="d" * 32)
    entry = RunningEntry(task=task2, queue=q, worker="dead@h", token="t", started_at=0.0)
    f.client.hset(f.keys.running, "d" * 32, entry.model_dump_json())
    f.client.hset(f.keys.payloads, "d" * 32, "\t" + q + "\t{}")
    assert control.cancel(f.client, f.namespace, "e").running == 1
    hb = Heartbeat(runner_for(lambda t, c: None), [q])
    wait_for(lambda: (hb.reap(), not f.client.hexists(f.keys.running, "d" * 32))[1], 10, "the reaper to drop it")
    assert queue_length(f.client, q) == 0 and not f.client.hexists(f.keys.queued, "d" * 32)


# ---- pause / resume ---------------------------------------------------------------------------------
def test_pause_parks_running_samples_finish_resume_restores_in_order(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    p = touch_exp(tmp_path, "paused one", [{"name": "slow", "text": "s", "sleep_s": 6}] + items("p1", "p2", "p3"))
    other = touch_exp(tmp_path, "other", items("o1"))
    run(f, "enqueue", str(p))
    run(f, "enqueue", str(other))
    ids, oid = plan_ids(f, p), plan_ids(f, other)["o1"]
    lose_message(f, oid)  # its recovery by the reaper shows the reaper ran while p1-p3 were parked
    worker(f)
    wait_for(lambda: running_label(f, "touch slow"), 60, "the worker running the slow sample")

    res = run(f, "pause", "paused one")
    assert res == {"experiment": "paused one", "parked": 3, "running": 1, "paused": ["paused one"]}
    assert [m.sample_id for m in parked(f)] == [ids["p3"], ids["p2"], ids["p1"]]  # right end = front
    st = run(f, "status", str(p))
    assert st["paused"] is True and st["queued"] == 3 and st["priority"] == "normal"
    assert run(f, "status")["paused_experiments"] == ["paused one"]
    assert "paused" in f.fleet("status", str(p), check=True, **KIND_ENV).stdout

    # The running sample finishes; the lost message of the other experiment is recovered and runs.
    wait_for(lambda: f.client.sismember(f.keys.done, ids["slow"]), 30, "the running sample to finish while paused")
    wait_for(lambda: f.client.sismember(f.keys.done, oid), 90, "the reaper to recover the lost message of 'other'")
    # ... and nothing of the paused experiment ran or was published again meanwhile.
    assert f.done_count() == 2 and len(parked(f)) == 3 and waiting(f) == []
    assert {k.decode() for k in f.client.hkeys(f.keys.queued)} == {ids["p1"], ids["p2"], ids["p3"]}
    assert records.stale_queued(f.client, f.keys, queue_name(f.namespace, "")) == []

    res = run(f, "resume", "paused one")
    assert res == {"experiment": "paused one", "unparked": 3, "paused": []}
    wait_for(lambda: f.done_count() == 5, 60, "the resumed samples done")
    assert [r.label for r in done_records(f, "paused one")] == ["touch slow", "touch p1", "touch p2", "touch p3"]
    assert all(r.deliveries == 1 for r in done_records(f, "paused one"))
    assert parked(f) == [] and f.client.hlen(control.ControlKeys(f.namespace).parked) == 0


def test_a_paused_fleet_parks_what_workers_receive_and_resume_runs_it(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    worker(f)
    assert run(f, "pause") == {"experiment": None, "parked": 0, "running": 0, "paused": ["*"]}
    assert run(f, "status")["paused"] is True
    q = touch_exp(tmp_path, "late", items("l1", "l2", "l3"))
    run(f, "enqueue", str(q))  # published into the queue: the worker receives them and parks them
    wait_for(lambda: len(parked(f)) == 3 and not waiting(f) and not in_flight(f), 60, "the worker to park all three")
    assert f.done_count() == 0 and f.client.hlen(f.keys.running) == 0 and f.client.hlen(f.keys.queued) == 3
    assert worker_log(f).count("is paused; parked it") == 3
    # Resuming one experiment while the whole fleet is paused resumes nothing.
    r = f.fleet("resume", "late", check=True, **KIND_ENV)
    assert "0 parked samples" in r.stdout and "stays paused while the whole fleet is" in r.stdout
    assert run(f, "resume") == {"experiment": None, "unparked": 3, "paused": []}
    wait_for(lambda: f.done_count() == 3, 60, "the parked samples done after resume")
    assert [r.label for r in done_records(f, "late")] == ["touch l1", "touch l2", "touch l3"]


# ---- retry ------------------------------------------------------------------------------------------
def test_retry_republishes_exactly_the_failed_samples_at_the_front(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    env = {"FLEET_MAX_ATTEMPTS": "1", "FLEET_MAX_CONSECUTIVE_ERRORS": "100"}
    r = touch_exp(tmp_path, "flaky", items("r1", "r2", "r3", "r4", "r5"))
    s = touch_exp(tmp_path, "unrelated", items("s1"))
    # A folder where a sample writes its file makes the job fail (until someone removes it).
    blockers = [r.parent / "out" / "r2.txt", r.parent / "out" / "r4.txt", s.parent / "out" / "s1.txt"]
    for b in blockers:
        (b / "in the way").mkdir(parents=True)
    run(f, "enqueue", str(r))
    run(f, "enqueue", str(s))
    rid, sid = plan_ids(f, r), plan_ids(f, s)["s1"]
    w = worker(f, **env)
    wait_for(lambda: f.done_count() == 3 and f.client.hlen(f.keys.failed) == 3 and not f.client.hlen(f.keys.queued),
             60, "three done, three failed for good")
    f.stop(w)
    wait_for(lambda: f.worker_entry() is None, 30, "the worker gone")

    for b in blockers:
        (b / "in the way").rmdir()
        b.rmdir()
    backlog = touch_exp(tmp_path, "backlog", items("k1", "k2"))
    run(f, "enqueue", str(backlog))  # waiting when the retry comes: the retried samples go before it

    res = run(f, "retry", str(r))
    assert res == {"experiment": "flaky", "retried": 2, "failed": 2, "not_planned": 0}
    queued = [m for m in waiting(f) if m.experiment == "flaky"]
    assert sorted(m.sample_id for m in queued) == sorted([rid["r2"], rid["r4"]])
    assert {k.decode() for k in f.client.hkeys(f.keys.queued)} >= {rid["r2"], rid["r4"]}  # marks keep payloads
    assert run(f, "retry", str(r))["retried"] == 0  # queued now: not published twice
    assert f.fleet("retry", "flaky", **KIND_ENV).returncode == 1  # retry re-plans: it needs the file

    worker(f, **env)
    wait_for(lambda: f.done_count() == 7, 60, "the retried samples and the backlog done")
    order = [x.label for x in sorted(done_records(f, "flaky") + done_records(f, "backlog"), key=lambda x: x.finished_at)]
    assert order[-4:] == ["touch r2", "touch r4", "touch k1", "touch k2"]
    retried = {x.label: x for x in done_records(f, "flaky")}
    assert retried["touch r2"].attempt == 1 and retried["touch r4"].attempt == 1
    assert not f.client.sismember(f.keys.done, sid)  # the other experiment's failure is left alone
    assert FailureRecord.model_validate_json(f.client.hget(f.keys.failed, sid)).retryable is False
    assert not f.client.hexists(f.keys.failed, rid["r2"])


# ---- priority ---------------------------------------------------------------------------------------
def test_the_priority_lists_are_kombus() -> None:
    from kombu.transport import redis as kombu_redis

    assert SEP == kombu_redis.Channel.sep and list(STEPS) == list(kombu_redis.PRIORITY_STEPS)
    ch = object.__new__(kombu_redis.Channel)  # _q_for_pri and priority only read class attributes
    for step in STEPS:
        assert kombu_redis.Channel._q_for_pri(ch, "ns.q.gpu", step) == priority_list("ns.q.gpu", step)
    assert sorted(PRIORITIES.values()) == list(STEPS) and PRIORITIES["urgent"] == 0  # 0 is served first


def test_an_urgent_experiment_enqueued_later_runs_before_the_backlog(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    low = touch_exp(tmp_path, "someday", items("w1", "w2"), priority="low")
    routine = touch_exp(tmp_path, "routine", [{"name": "n0", "text": "n0", "sleep_s": 8}] + items("n1", "n2", "n3", "n4"))
    run(f, "enqueue", str(low))
    run(f, "enqueue", str(routine))
    q = queue_name(f.namespace, "gpu")
    assert f.client.llen(priority_list(q, 9)) == 2 and f.client.llen(priority_list(q, 6)) == 5
    worker(f)
    wait_for(lambda: running_label(f, "touch n0"), 60, "the worker on the routine backlog")
    # kombu reports the bare queue as the routing key of a message from a priority list.
    (entry,) = [RunningEntry.model_validate_json(v) for v in f.client.hvals(f.keys.running)]
    assert entry.queue == q
    high = touch_exp(tmp_path, "soon", items("h1", "h2"), priority="high")
    urgent = touch_exp(tmp_path, "now", items("u1", "u2"), priority="urgent")
    run(f, "enqueue", str(high))
    run(f, "enqueue", str(urgent))
    assert f.client.llen(q) == 2 and run(f, "status", str(urgent))["priority"] == "urgent"
    wait_for(lambda: f.done_count() == 11, 90, "everything done")
    order = [r.label.removeprefix("touch ") for r in sorted(
        (CompletionRecord.model_validate_json(v) for v in f.client.hvals(f.keys.records)), key=lambda r: r.finished_at)]
    assert order == ["n0", "u1", "u2", "h1", "h2", "n1", "n2", "n3", "n4", "w1", "w2"]


def test_retries_orphans_and_recovered_messages_keep_their_priority(fleet_ns: Fleet, runner_for) -> None:
    f = fleet_ns
    q = queue_name(f.namespace, "gpu")

    def flaky(task: TaskPayload, ctx) -> None:
        raise RuntimeError("unexpected")  # retried on the same queue

    # A retry of an urgent sample goes back to the urgent list, at its front, saying priority 0.
    for exp, step in (("urgent one", 0), ("low one", 9)):
        task = a_task(f, experiment=exp, sid=f"{step}" * 32)
        publish_one(f, task, q, step)
        f.client.delete(priority_list(q, step))  # delivered
        assert runner_for(flaky).run(task, q) == "retried"
        (raw,) = f.client.lrange(priority_list(q, step), 0, -1)
        assert json.loads(raw)["properties"]["priority"] == step and control.decode(raw).sample_id == task["sample_id"]
        assert queue_length(f.client, q) == 1
        f.client.delete(priority_list(q, step), f.keys.queued)

    # A dead worker's high sample goes back to the high list.
    from workers.heartbeat import Heartbeat

    task = a_task(f, experiment="high one", sid="h" * 32)
    publish_one(f, task, q, 3)
    f.client.delete(priority_list(q, 3))
    f.client.hdel(f.keys.queued, "h" * 32)
    entry = RunningEntry(task=task, queue=q, worker="dead@h", token="t", started_at=0.0)
    f.client.hset(f.keys.running, "h" * 32, entry.model_dump_json())
    hb = Heartbeat(runner_for(flaky), [q])
    wait_for(lambda: (hb.reap(), f.client.llen(priority_list(q, 3)))[1], 10, "the reaper to publish the orphan")
    (raw,) = f.client.lrange(priority_list(q, 3), 0, -1)
    assert json.loads(raw)["properties"]["priority"] == 3
    f.client.delete(priority_list(q, 3), f.keys.queued)

    # A lost message of a low sample is published again in the low list.
    task = a_task(f, experiment="low one", sid="l" * 32)
    publish_one(f, task, q, 9)
    f.client.delete(priority_list(q, 9))  # lost
    now = time.time()
    assert records.recover_lost(f.client, f.keys, queue_name(f.namespace, ""), 5.0, now) == []
    assert records.recover_lost(f.client, f.keys, queue_name(f.namespace, ""), 5.0, now + 6) == ["l" * 32]
    (raw,) = f.client.lrange(priority_list(q, 9), 0, -1)
    assert json.loads(raw)["properties"]["priority"] == 9 and queue_length(f.client, q) == 1
