"""records.complete leaves another run's running state alone (a run whose lease lapsed finishes
after the reaper published its sample again and another worker took it)."""

from __future__ import annotations

import time

from fleet import records
from fleet.contract import CompletionRecord, RunningEntry


def _record(sid: str) -> CompletionRecord:
    return CompletionRecord(sample_id=sid, experiment="e", kind="noop", group="g", output_path="/x/o", output_bytes=3,
                            duration_s=1.0, worker="w1", hostname="h", gpus=[], attempt=1, deliveries=1,
                            model_loaded=False, model_load_s=0.0, finished_at=time.time())


def _running(fleet, sid: str, token: str) -> None:
    entry = RunningEntry(task={}, queue="q", worker="w2", token=token, started_at=time.time())
    fleet.client.hset(fleet.keys.running, sid, entry.model_dump_json())
    fleet.client.set(fleet.keys.lease(sid), token, px=60_000)
    fleet.client.hset(fleet.keys.deliveries, sid, 2)


def test_a_late_run_records_done_but_keeps_the_other_run_running(fleet_ns) -> None:
    f, sid = fleet_ns, "s1"
    _running(f, sid, "theirs")
    assert records.complete(f.client, f.keys, _record(sid), token="mine") is False
    assert f.client.sismember(f.keys.done, sid) and f.client.hget(f.keys.done_bytes, sid) == b"3"
    assert f.client.hexists(f.keys.running, sid) and f.client.get(f.keys.lease(sid)) == b"theirs"
    assert f.client.hget(f.keys.deliveries, sid) == b"2"
    # the run that holds it completes: its running state ends
    assert records.complete(f.client, f.keys, _record(sid), token="theirs") is True
    assert not f.client.hexists(f.keys.running, sid) and not f.client.exists(f.keys.lease(sid))
    assert not f.client.hexists(f.keys.deliveries, sid)


def test_without_a_token_or_with_its_own_lease_lapsed_the_running_state_ends(fleet_ns) -> None:
    f = fleet_ns
    _running(f, "s2", "any")
    assert records.complete(f.client, f.keys, _record("s2")) is True  # a journal line from before tokens
    assert not f.client.hexists(f.keys.running, "s2")
    _running(f, "s3", "mine")
    f.client.delete(f.keys.lease("s3"))  # lapsed, nobody took it
    assert records.complete(f.client, f.keys, _record("s3"), token="mine") is True
    assert not f.client.hexists(f.keys.running, "s3")
