"""Trust (issue 8): a crafted task cannot write outside the output roots; a sample's own fault
does not stop a healthy worker; concurrent enqueues queue each sample once; identity across
experiments; done means a file of the recorded size; records survive a Redis outage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.contract import CompletionRecord, FailureRecord, TaskPayload, queue_name
from fleet.priority import queue_length
from fleet.publisher import encode_message
from tests.integration.conftest import Fleet, wait_for

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
TOUCH = json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}})


def touch_env(**extra: str) -> dict[str, str]:
    return {"FLEET_KINDS": TOUCH, "PYTHONPATH": REPO, **extra}


def push(f: Fleet, task: TaskPayload) -> None:
    q = queue_name(f.namespace, "gpu")
    f.client.lpush(q, encode_message(task.to_json(), q, task.label))


def crafted(f: Fleet, sid: str, root: Path, out: Path) -> TaskPayload:
    return TaskPayload(kind="touch", sample_id=sid, experiment="evil", group="g", label=f"crafted {sid}",
                       output_path=str(out), output_root=str(root), gpus=0, shared={"greeting": "pwned"},
                       body={"text": "x", "sleep_s": 0})


def failure(f: Fleet, sid: str) -> FailureRecord | None:
    raw = f.client.hget(f.keys.failed, sid)
    return FailureRecord.model_validate_json(raw) if raw else None


def test_crafted_tasks_cannot_write_outside_the_output_roots(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    outside = tmp_path.parent / f"outside-{f.namespace}"
    outside.mkdir()
    victim = outside / "important.txt"
    victim.write_text("precious")
    inside = tmp_path / "results"
    inside.mkdir()
    (inside / "link").symlink_to(outside)
    f.start_worker(**touch_env())
    cases = {
        "a" * 32: crafted(f, "a" * 32, outside, victim),  # a root outside every allowed one
        "b" * 32: crafted(f, "b" * 32, inside, inside / ".." / ".." / outside.name / "important.txt"),  # ..
        "c" * 32: crafted(f, "c" * 32, inside, inside / "link" / "important.txt"),  # a symlink out
        "d" * 32: crafted(f, "d" * 32, inside, inside),  # the root itself
    }
    for t in cases.values():
        push(f, t)
    wait_for(lambda: all(failure(f, sid) for sid in cases), 60, "every crafted task refused")
    for sid in cases:
        fr = failure(f, sid)
        assert fr.error_type == "ForbiddenOutput" and not fr.retryable, fr.message
    assert victim.read_text() == "precious" and sorted(p.name for p in outside.iterdir()) == ["important.txt"]
    assert f.done_count() == 0
    # The worker is fine and still takes honest work.
    push(f, crafted(f, "e" * 32, inside, inside / "ok.txt"))
    wait_for(lambda: f.done_count() == 1, 60, "an honest task done")
    assert (inside / "ok.txt").read_text() == "pwned x"


def test_a_samples_own_fault_does_not_stop_a_healthy_worker(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    root = tmp_path / "results"
    root.mkdir()
    (root / "not a folder").write_text("a file where a folder should be")
    w = f.start_worker(**touch_env(FLEET_MAX_CONSECUTIVE_ERRORS="2"))
    bad = [f"{i}" * 32 for i in range(4)]
    for sid in bad:  # each writes under a path whose parent is a file: ENOTDIR, every time, on any worker
        push(f, crafted(f, sid, root, root / "not a folder" / f"{sid}.txt"))
    wait_for(lambda: all(failure(f, sid) for sid in bad), 60, "four bad samples failed")
    assert {failure(f, sid).error_type for sid in bad} == {"InputError"}
    assert all(not failure(f, sid).retryable for sid in bad)
    push(f, crafted(f, "f" * 32, root, root / "fine.txt"))
    wait_for(lambda: f.done_count() == 1, 60, "the next good sample done by the same worker")
    assert w.poll() is None


def write_touch(path: Path, **spec: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"kind": "touch", "output": "out", **spec}, allow_unicode=True), encoding="utf-8")
    return path


def test_concurrent_enqueues_of_one_experiment_queue_each_sample_once(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    exp = write_touch(tmp_path / "e" / "exp.yaml", name="twice", items=[{"name": f"i{i}"} for i in range(300)])
    procs = [subprocess.Popen([sys.executable, "-m", "fleet.cli", "enqueue", str(exp), "--json"],
                              env=f.env(**touch_env()), stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(o["enqueued"] for o in outs) == 300
    assert queue_length(f.client, queue_name(f.namespace, "gpu")) == 300 and f.client.hlen(f.keys.queued) == 300


def test_experiments_sharing_an_output_folder(fleet_ns: Fleet, video_experiment, tmp_path: Path) -> None:
    f = fleet_ns
    a = video_experiment(name="exp-a")
    assert f.enqueue(a)["enqueued"] == 4
    # The same parameters into another folder: samples of their own (each gets its file).
    b = video_experiment(name="exp-b", output="elsewhere")
    assert f.enqueue(b) == {"planned": 4, "done": 0, "in_flight": 0, "enqueued": 4}
    # Other parameters into A's folder: refused, naming both.
    c = video_experiment(name="exp-c", steps=2)
    r = f.fleet("enqueue", str(c))
    assert r.returncode == 1 and "'exp-a'" in r.stderr and "'exp-c'" in r.stderr, r.stderr
    assert f.client.hlen(f.keys.queued) == 8
    # A itself with a changed parameter re-plans its own paths (that is how a change is made again).
    a2 = video_experiment(name="exp-a", steps=2)
    assert f.enqueue(a2)["enqueued"] == 4


def test_done_means_a_file_of_the_recorded_size(fleet_ns: Fleet, video_experiment) -> None:
    f = fleet_ns
    exp = video_experiment(videos={"c": ["v1"]}, prompts={"*": ["a boat"]})
    f.start_worker()
    assert f.enqueue(exp)["enqueued"] == 1
    wait_for(lambda: f.done_count() == 1, 120, "the sample done")
    rec = CompletionRecord.model_validate_json(next(iter(f.client.hvals(f.keys.records))))
    assert rec.output_bytes == os.path.getsize(rec.output_path) > 0
    assert f.enqueue(exp)["done"] == 1
    with open(rec.output_path, "r+b") as fh:  # a torn copy, a restore from an older backup
        fh.truncate(rec.output_bytes // 2)
    assert f.enqueue(exp) == {"planned": 1, "done": 0, "in_flight": 0, "enqueued": 1}


def test_samples_done_before_ids_included_the_output_root_still_count(fleet_ns: Fleet, video_experiment) -> None:
    from fleet.experiment import load_experiment
    from fleet.kinds.base import PlanContext
    from fleet.planner import plan_experiment

    f = fleet_ns
    exp_path = video_experiment()
    plan = plan_experiment(load_experiment(exp_path), None, PlanContext(legacy_ids=True))
    old = plan.samples[0]
    Path(old.output_path).parent.mkdir(parents=True, exist_ok=True)
    Path(old.output_path).write_bytes(b"an mp4 made by the previous version")
    legacy = {"schema": "fleet.record/1", "sample_id": old.aliases[0], "experiment": "exp", "category": old.group,
              "output_path": old.output_path, "duration_s": 1.0, "worker": "w", "hostname": "h", "gpu": "0",
              "attempt": 1, "deliveries": 1, "model_loaded": False, "model_load_s": 0.0, "finished_at": 1.0}
    f.client.hset(f.keys.records, old.aliases[0], json.dumps(legacy))
    f.client.sadd(f.keys.done, old.aliases[0])
    res = f.enqueue(exp_path)
    assert (res["done"], res["enqueued"]) == (1, 3)
    assert f.client.sismember(f.keys.done, old.sample_id)  # adopted under today's id
    assert f.enqueue(exp_path)["done"] == 1
    rec = CompletionRecord.model_validate_json(f.client.hget(f.keys.records, old.sample_id))
    assert (rec.kind, rec.group, rec.gpus, rec.metrics["adopted_from"]) == ("video", old.group, [0], old.aliases[0])


def test_a_finished_samples_record_survives_a_redis_outage(own_redis, tmp_path: Path, monkeypatch) -> None:
    """The job finishes while Redis is down: the record goes to the worker's journal and is
    replayed by the next heartbeat once Redis is back (AOF keeps what came before)."""
    import redis as redis_lib

    from fleet.settings import load_settings
    from workers.heartbeat import Heartbeat
    from workers.jobs import JobRegistry
    from workers.jobs.base import JobOutcome
    from workers.runner import SampleRunner

    url = own_redis()
    client = redis_lib.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2)
    s = load_settings(broker_url=url, namespace="j", output_roots=[tmp_path], state_dir=tmp_path / "state")
    out = tmp_path / "out.txt"

    class Job(JobRegistry):
        def job(self, kind: str):
            def run(task, ctx):
                out.write_text("made while Redis died")
                for p in own_redis.procs:
                    p.kill()
                    p.wait()
                return JobOutcome(output_path=str(out))
            return run

    r = SampleRunner(s, client, "w@h", (), "cpu", jobs=Job())
    r.redis_retry_s = 0.5
    task = TaskPayload(kind="x", sample_id="s" * 32, experiment="e", group="g", output_path=str(out),
                       output_root=str(tmp_path))
    assert r.run(task.model_dump(by_alias=True), "j.q.gpu") == "done"
    assert r.journal.pending()
    own_redis()  # Redis is back (same port, same AOF)
    Heartbeat(r, ["j.q.gpu"]).beat()
    assert not r.journal.pending()
    assert client.sismember("j:done", "s" * 32)
    rec = CompletionRecord.model_validate_json(client.hget("j:records", "s" * 32))
    assert rec.output_bytes == out.stat().st_size


def test_retried_and_orphaned_samples_go_to_the_front_of_the_queue(fleet_ns: Fleet) -> None:
    from fleet import records

    f, q = fleet_ns, queue_name(fleet_ns.namespace, "gpu")
    for i in range(3):
        f.client.lpush(q, f"backlog {i}".encode())
    records.requeue(f.client, f.keys, "r" * 32, q, b"retried", "[]", None, "\tq\t{}")
    assert f.client.lindex(q, -1) == b"retried"  # kombu BRPOPs: the right end is popped next
    f.client.hset(f.keys.running, "o" * 32, "{}")
    assert records.take_orphan(f.client, f.keys, "o" * 32, "[]", q, b"orphan")
    assert f.client.lindex(q, -1) == b"orphan"
