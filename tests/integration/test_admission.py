"""The worker's admission of a popped sample (fleet/admission.py) and its completion, on a
real Redis, with the runner driven directly (no Celery): each decision of the one-script
admission, the second look at a done record whose file the first stat did not see, and the
Redis round trips a sample costs (one to admit, one to complete)."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest

from fleet import admission, control, records
from fleet.contract import TaskPayload
from fleet.settings import load_settings
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration

SIZE = 3  # bytes each test job writes


@pytest.fixture
def runner(fleet_ns: Fleet):
    """A SampleRunner on the test's namespace (a CPU worker) whose job writes SIZE bytes to
    the output and records which samples it ran (``runner.ran``)."""
    from workers.jobs import JobRegistry
    from workers.jobs.base import JobOutcome
    from workers.runner import SampleRunner

    ran: list[str] = []

    def job(task: TaskPayload, ctx: object) -> JobOutcome:
        ran.append(task.sample_id)
        Path(task.output_path).write_bytes(b"x" * SIZE)
        return JobOutcome(output_path=task.output_path)

    class OneJob(JobRegistry):
        def job(self, kind: str):
            return job

    s = load_settings(broker_url=fleet_ns.url, namespace=fleet_ns.namespace, output_roots=[fleet_ns.tmp],
                      state_dir=fleet_ns.tmp / "state")
    r = SampleRunner(s, fleet_ns.client, f"cpu0@{socket.gethostname()}", (), "cpu", jobs=OneJob())
    r.ran = ran  # type: ignore[attr-defined]
    return r


def a_task(f: Fleet, sid: str, experiment: str = "e") -> dict:
    return {"schema": "fleet.task/1", "kind": "touch", "sample_id": sid, "experiment": experiment, "group": "g",
            "label": f"sample {sid[:4]}", "output_path": str(f.tmp / "out" / f"{sid}.out"),
            "output_root": str(f.tmp), "body": {}}


def mark_done(f: Fleet, sid: str, size: int | None = SIZE, file: bool = True) -> None:
    """Leave ``sid`` as a finished worker does: its done mark and size (None: a record from
    before sizes were kept), its output file, and a queued mark of a duplicate message."""
    f.client.sadd(f.keys.done, sid)
    if size is not None:
        f.client.hset(f.keys.done_bytes, sid, size)
    if file:
        out = f.tmp / "out" / f"{sid}.out"
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(b"x" * SIZE)
    f.client.hset(f.keys.queued, sid, json.dumps(["e", "g"]))


def round_trips(f: Fleet, monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count the test client's round trips from now on: commands by name, pipelines as one."""
    seen: Counter = Counter()
    command, pipeline = f.client.execute_command, f.client.pipeline

    def counted_command(*args, **kwargs):
        seen[str(args[0]).upper()] += 1
        return command(*args, **kwargs)

    def counted_pipeline(*args, **kwargs):
        p = pipeline(*args, **kwargs)
        run = p.execute

        def execute(*a, **k):
            seen["PIPELINE"] += 1
            return run(*a, **k)

        p.execute = execute
        return p

    monkeypatch.setattr(f.client, "execute_command", counted_command)
    monkeypatch.setattr(f.client, "pipeline", counted_pipeline)
    return seen


def test_a_sample_costs_one_round_trip_to_admit_and_one_to_complete(
    fleet_ns: Fleet, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    f, k = fleet_ns, fleet_ns.keys
    (f.tmp / "out").mkdir()
    assert runner.run(a_task(f, "1" * 32), "q") == "done"  # loads the scripts into this Redis
    sid = "2" * 32
    f.client.hset(k.queued, sid, json.dumps(["e", "g"]))
    seen = round_trips(f, monkeypatch)
    assert runner.run(a_task(f, sid), "q") == "done"
    assert seen == Counter({"EVALSHA": 2}), seen
    # What the two scripts left: the record and its size, and nothing transient.
    assert f.client.sismember(k.done, sid) and int(f.client.hget(k.done_bytes, sid)) == SIZE
    assert json.loads(f.client.hget(k.records, sid))["deliveries"] == 1
    for key in (k.queued, k.running, k.deliveries):
        assert not f.client.hexists(key, sid), key
    assert not f.client.exists(k.lease(sid))
    assert runner.ran == ["1" * 32, sid]


@pytest.mark.parametrize(("case", "outcome", "runs"), [
    ("done", "skipped-done", False),
    ("done before sizes were kept", "skipped-done", False),
    ("done, but the file has another size", "done", True),
    ("done, but the file is gone", "done", True),
    ("done, the file lands just after the first stat", "skipped-done", False),
    ("cancelled", "skipped-cancelled", False),
    ("cancelled, then enqueued again", "done", True),
    ("experiment paused", "parked", False),
    ("everything paused", "parked", False),
    ("leased by another worker", "skipped-running", False),
])
def test_each_decision_of_the_admission_script(
    fleet_ns: Fleet, runner, monkeypatch: pytest.MonkeyPatch, case: str, outcome: str, runs: bool
) -> None:
    f, k, sid = fleet_ns, fleet_ns.keys, "a" * 32
    ck = control.ControlKeys(f.namespace)
    (f.tmp / "out").mkdir()
    if case == "done":
        mark_done(f, sid)
    elif case == "done before sizes were kept":
        mark_done(f, sid, size=None)
    elif case == "done, but the file has another size":
        mark_done(f, sid, size=SIZE + 1)
    elif case == "done, but the file is gone":
        mark_done(f, sid, file=False)
    elif case == "done, the file lands just after the first stat":
        mark_done(f, sid)
        stat, looks = admission.output_size, []

        def late(path: str) -> str:  # the first stat misses the file another worker is renaming into place
            looks.append(path)
            return "" if len(looks) == 1 else stat(path)

        monkeypatch.setattr(admission, "output_size", late)
    elif case.startswith("cancelled"):
        f.client.zadd(ck.cancelled, {sid: 1.0})  # a tombstone; the kept payload and queued mark are gone
        if case.endswith("again"):
            f.client.hset(k.payloads, sid, "kept")  # a later enqueue keeps a payload again
    elif case == "experiment paused":
        f.client.sadd(ck.paused, "e")
    elif case == "everything paused":
        f.client.sadd(ck.paused, control.ALL)
    elif case == "leased by another worker":
        f.client.set(k.lease(sid), "another-worker-token", px=30000)

    for script in (admission._ADMIT, records._COMPLETE):
        f.client.script_load(script)  # loaded: every EVALSHA below is one round trip
    seen = round_trips(f, monkeypatch)
    assert runner.run(a_task(f, sid), "q") == outcome
    assert runner.ran == ([sid] if runs else [])
    # One round trip decides, two when a done record's file was not seen; a run adds its record's.
    looked_twice = case in ("done, but the file is gone", "done, the file lands just after the first stat")
    assert seen["EVALSHA"] == 1 + looked_twice + runs, seen
    if outcome != "parked":  # parking is fleet.control.park's, after the script
        assert set(seen) == {"EVALSHA"}, seen
    if outcome == "skipped-done":
        assert not f.client.hexists(k.queued, sid)  # the duplicate's mark is dropped
    if not runs:  # nothing claimed: no running entry, no delivery counted
        assert not f.client.hexists(k.running, sid) and not f.client.hexists(k.deliveries, sid)
        if outcome != "skipped-running":
            assert not f.client.exists(k.lease(sid))
    if case.startswith("done, the file lands"):
        assert len(looks) == 2  # the record said done and no file was seen: a second look
    if outcome == "parked":
        (parked,) = [p for p in f.client.hkeys(ck.parked)]
        assert f.client.llen(parked) == 1
