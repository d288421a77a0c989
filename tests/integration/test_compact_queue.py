"""The compact queue (fleet.kept_payloads), through a real worker on a real Redis: a bulk
message is a reference its worker expands from the queued mark, samples queued in the
earlier layout (full base64 messages, [experiment, group] marks, kept payloads apart) still
run and are still recovered, a reference to nothing is skipped, one to an unknown head fails
with a record, a cancelled experiment enqueued again runs to the end, and the output owners
index refuses a second experiment's overwrite in both its forms."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from fleet import control, records
from fleet.contract import FailureRecord, queue_name
from fleet.kept_payloads import message_payload, reference, reference_of
from fleet.priority import NORMAL_STEP, priority_list, queue_length
from fleet.publisher import encode_message, message_body
from tests.integration.conftest import Fleet, wait_for

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
KIND_ENV = {"FLEET_KINDS": json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}}),
            "PYTHONPATH": REPO}


def touch_exp(tmp: Path, name: str, names: list[str], output: str = "out") -> Path:
    path = tmp / name / "experiment.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"kind": "touch", "name": name, "output": output,
                                    "items": [{"name": n, "text": n} for n in names]}), encoding="utf-8")
    return path


def enqueue(f: Fleet, exp: Path) -> dict:
    return json.loads(f.fleet("enqueue", str(exp), "--json", check=True, **KIND_ENV).stdout)


def old_message(payload: dict, queue: str) -> bytes:
    """A message as fleet wrote them before the compact queue (and as Celery's send_task does):
    base64 body, every header."""
    tid = f"old-{payload['sample_id']}"
    body = base64.b64encode(json.dumps([[payload], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                        "chord": None}]).encode()).decode()
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": {"lang": "py", "task": "fleet.sample", "id": tid, "root_id": tid, "retries": 0,
                                   "timelimit": [None, None], "argsrepr": f"old: {payload['label']}",
                                   "kwargsrepr": "{}", "ignore_result": True},
                       "properties": {"correlation_id": tid, "reply_to": "", "delivery_mode": 2,
                                      "delivery_info": {"exchange": "", "routing_key": queue}, "priority": NORMAL_STEP,
                                      "body_encoding": "base64", "delivery_tag": f"tag-{tid}"}}).encode()


def test_references_old_layout_and_owners_through_a_real_worker(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    q = queue_name(f.namespace, "gpu")
    lst = priority_list(q, NORMAL_STEP)

    # 1. `fleet enqueue` keeps each payload once, in its queued mark; the message only refers to it.
    new = touch_exp(tmp_path, "new", ["n1", "n2"])
    assert enqueue(f, new)["enqueued"] == 2
    raws = f.client.lrange(lst, 0, -1)
    assert all(reference_of(message_body(json.loads(m))[0][0]) and b"n1.txt" not in m and len(m) < 400 for m in raws)
    by_label = {p["label"]: p for p in (message_payload(f.client, f.keys, m) for m in raws)}
    assert by_label["touch n1"]["output_path"].endswith("n1.txt") and by_label["touch n1"]["shared"] == {"greeting": "hello"}
    assert f.client.hlen(f.keys.payloads) == 0 and f.client.hlen(f.keys.queued) == 2

    # 2. A sample queued by the earlier layout: [experiment, group] mark, kept payload apart, base64 message.
    old_root = tmp_path / "old" / "out"
    old = [{"schema": "fleet.task/1", "kind": "touch", "sample_id": f"{c}" * 32, "experiment": "old", "group": "items",
            "label": f"touch {c}", "output_path": str(old_root / f"{c}.txt"), "output_root": str(old_root), "gpus": 0,
            "shared": {"greeting": "hi"}, "body": {"text": c, "sleep_s": 0}} for c in "ab"]
    for p in old:
        f.client.hset(f.keys.queued, p["sample_id"], json.dumps(["old", "items"]))
        f.client.hset(f.keys.payloads, p["sample_id"], "\t" + q + "\t" + json.dumps(p))
    f.client.lpush(lst, old_message(old[0], q))  # the other one's message was lost
    # 3. A reference to a sample with no mark (a copy of a message already taken), and one whose head is unknown.
    f.client.lpush(lst, encode_message(reference("f" * 32), q, "nothing", priority=NORMAL_STEP))
    f.client.hset(f.keys.queued, "e" * 32, "0123456789abcdef\t" + q + '\t,"group":"g","label":"x","output_path":"/x"}')
    f.client.lpush(lst, encode_message(reference("e" * 32), q, "headless", priority=NORMAL_STEP))

    # 4. Cancelled, then enqueued again: the tombstone goes, so its samples run to the end.
    again = touch_exp(tmp_path, "again", ["c1"])
    enqueue(f, again)
    assert control.cancel(f.client, f.namespace, "again").cancelled == 1
    assert queue_length(f.client, q) == 5 and enqueue(f, again)["enqueued"] == 1
    c1 = [m for m in control.decode_all(f.client, f.keys, f.client.lrange(lst, 0, -1)) if m and m.experiment == "again"]
    assert len(c1) == 1 and f.client.zscore(control.ControlKeys(f.namespace).cancelled, c1[0].sample_id) is None

    f.start_worker(FLEET_HEARTBEAT_S="0.5", FLEET_LEASE_TTL_S="3", **KIND_ENV)
    wait_for(lambda: f.done_count() == 4, 60, "n1, n2, the old sample with a message, c1")
    assert (new.parent / "out" / "n1.txt").read_text() == "hello n1" and (old_root / "a.txt").read_text() == "hi a"
    assert (again.parent / "out" / "c1.txt").read_text() == "hello c1"
    failure = FailureRecord.model_validate_json(wait_for(lambda: f.client.hget(f.keys.failed, "e" * 32), 30, "headless"))
    assert "unknown payload head 0123456789abcdef" in failure.message
    # The old sample whose message was lost comes back from its kept payload (reaper: >= 10 s grace).
    wait_for(lambda: f.client.sismember(f.keys.done, "b" * 32), 60, "the lost old-layout sample recovered")
    assert (old_root / "b.txt").read_text() == "hi b" and f.client.hlen(f.keys.payloads) == 0
    assert f.client.hlen(f.keys.queued) == 0 and queue_length(f.client, q) == 0
    assert not f.client.sismember(f.keys.done, "f" * 32) and not f.client.hexists(f.keys.failed, "f" * 32)
    log = "".join(p.read_text(errors="replace") for p in f.tmp.glob("worker*.log"))
    assert f"sample {'f' * 32} has no kept payload" in log

    # 5. Output owners: another experiment writing n1.txt with other parameters is refused, by the
    #    index (its hash of the path) and by the earlier index keyed by the path itself.
    thief = tmp_path / "new" / "thief.yaml"
    thief.write_text(yaml.safe_dump({"kind": "touch", "name": "thief", "output": "out",
                                     "items": [{"name": "n1", "text": "other"}]}), encoding="utf-8")
    r = f.fleet("enqueue", str(thief), **KIND_ENV)
    assert r.returncode == 1 and "is also written by experiment 'new'" in r.stderr and str(thief) in r.stderr
    f.client.hset(f.keys.outputs, str(old_root / "a.txt"), json.dumps(["a" * 32, "old"]))
    intruder = touch_exp(tmp_path, "intruder", ["a"], output=str(old_root))
    r = f.fleet("enqueue", str(intruder), **KIND_ENV)
    assert r.returncode == 1 and "is also written by experiment 'old'" in r.stderr
    assert records.stale_queued(f.client, f.keys, queue_name(f.namespace, "")) == []


def test_a_reference_is_expanded_by_the_admission_round_trip(fleet_ns: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner driven directly (no Celery): a reference costs one script call to expand and
    claim, as a whole payload does; a done one a second look; a paused one is parked."""
    import socket
    from collections import Counter

    from fleet.kept_payloads import head_id, mark
    from fleet.settings import load_settings
    from workers.jobs import JobRegistry
    from workers.jobs.base import JobOutcome
    from workers.runner import SampleRunner

    f, k = fleet_ns, fleet_ns.keys
    out = f.tmp / "out"
    out.mkdir()
    ran: list[str] = []

    def job(task, ctx) -> JobOutcome:
        ran.append(task.sample_id)
        Path(task.output_path).write_text(task.params["greeting"])
        return JobOutcome(output_path=task.output_path)

    class OneJob(JobRegistry):
        def job(self, kind: str):
            return job

    s = load_settings(broker_url=f.url, namespace=f.namespace, output_roots=[f.tmp], state_dir=f.tmp / "state")
    runner = SampleRunner(s, f.client, f"cpu0@{socket.gethostname()}", (), "cpu", jobs=OneJob())
    head = json.dumps({"schema": "fleet.task/1", "kind": "touch", "experiment": "e", "output_root": str(out),
                       "attempt": 1, "shared": {"greeting": "hej"}})[:-1]
    f.client.hset(k.payload_heads, head_id(head), head)

    def queue_one(sid: str) -> None:
        tail = f',"group":"g","label":"s {sid[:2]}","output_path":"{out / sid}.out","gpus":0,"body":{{}}}}'
        f.client.hset(k.queued, sid, mark(head_id(head), "q", tail))

    queue_one("1" * 32)
    assert runner.run({"ref": "1" * 32}, "q") == "done"  # loads the scripts
    queue_one("2" * 32)
    seen: Counter = Counter()
    command = f.client.execute_command
    monkeypatch.setattr(f.client, "execute_command", lambda *a, **kw: (seen.update([str(a[0]).upper()]),
                                                                        command(*a, **kw))[1])
    assert runner.run({"ref": "2" * 32}, "q") == "done" and seen == Counter({"EVALSHA": 2}), seen
    assert (out / f"{'2' * 32}.out").read_text() == "hej" and not f.client.hexists(k.queued, "2" * 32)
    assert json.loads(f.client.hget(k.records, "2" * 32))["experiment"] == "e"

    queue_one("2" * 32)  # a copy of a done sample's message, its mark published again: a second look
    seen.clear()
    assert runner.run({"ref": "2" * 32}, "q") == "skipped-done" and seen == Counter({"EVALSHA": 2}), seen
    assert not f.client.hexists(k.queued, "2" * 32) and ran == ["1" * 32, "2" * 32]
    assert runner.run({"ref": "2" * 32}, "q") == "skipped-done"  # no mark any more: the record says done
    assert runner.run({"ref": "9" * 32}, "q") == "skipped-gone"

    f.client.sadd(control.ControlKeys(f.namespace).paused, "e")
    queue_one("3" * 32)
    assert runner.run({"ref": "3" * 32}, "q") == "parked" and ran == ["1" * 32, "2" * 32]
    assert f.client.hexists(k.queued, "3" * 32) and not f.client.hexists(k.running, "3" * 32)
