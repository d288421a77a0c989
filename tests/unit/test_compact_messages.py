"""The compact queue's formats, without Redis: the message encode_message writes and the
worker's gate takes, references, queued marks and what they expand to (fleet.kept_payloads)."""

from __future__ import annotations

import base64
import json
import os

import pytest

from fleet.contract import TASK_SAMPLE, TaskPayload
from fleet.kept_payloads import GROUP_START, head_id, is_legacy, kept_payload, mark, reference, reference_of, unkeep
from fleet.kinds.base import Plan, Sample
from fleet.planner import payload_head, payloads, tails
from fleet.publisher import encode_message, message_body, message_sample_id, output_key
from workers.transport import why_not_a_task


class _Exp:
    kind, name, priority = "touch", "exp 实验", "normal"

    def __init__(self, tmp) -> None:
        self.path, self.output = tmp / "e.yaml", tmp / "out"


def _plan(tmp) -> Plan:
    out = tmp / "out"
    samples = [Sample(f"{i:032x}", "镜头 运动" if i % 2 else "g\"1", f"item {i}", str(out / f"{i}.txt"),
                      {"text": f"t{i}", "n": i}, memory_mib=1000 * i, gpus=i % 2, retries=None if i else 2)
               for i in range(3)]
    return Plan(_Exp(tmp), samples, {"greeting": "hello", "nested": {"a": [1, 2]}})


def test_a_bulk_message_is_a_small_reference_that_the_gate_takes(tmp_path) -> None:
    sid = "ab" * 16
    raw = encode_message(reference(sid), "fleet.q.gpu", "exp: item 1 [abababababab]", priority=6)
    env = json.loads(raw)
    assert why_not_a_task(env) is None
    assert message_body(env) == [[{"ref": sid}], {}, {}] and message_sample_id(raw) == sid
    assert reference_of(message_body(env)[0][0]) == sid
    # kombu needs the routing key, the priority and a delivery tag (the task id, and last: fleet.control
    # finds it at the end); Celery the task name and id; Flower shows argsrepr.
    assert env["headers"] == {"task": TASK_SAMPLE, "id": env["properties"]["delivery_tag"],
                              "argsrepr": "exp: item 1 [abababababab]"}
    assert env["properties"]["delivery_info"] == {"exchange": "", "routing_key": "fleet.q.gpu"}
    assert env["properties"]["priority"] == 6 and list(env["properties"])[-1] == "delivery_tag"
    assert len(raw) < 400


def test_the_gate_takes_base64_bodies_and_refuses_malformed_references() -> None:
    env = json.loads(encode_message(reference("s" * 32), "q", "x"))
    sent = dict(env, body=base64.b64encode(b'[[{"sample_id": "s"}], {}, {}]').decode(),
                properties=dict(env["properties"], body_encoding="base64"), **{"content-encoding": "utf-8"})
    assert why_not_a_task(sent) is None and message_sample_id(sent) == "s"  # what send_task writes
    for bad in ({"ref": 5}, {"ref": ""}, {"ref": "s", "kind": "touch"}):
        e = dict(env, body=json.dumps([[bad], {}, {}]))
        assert "reference" in why_not_a_task(e), bad
    assert "decode" in why_not_a_task(dict(env, body="[[{not json"))
    assert "base64 or JSON" in why_not_a_task(dict(env, properties=dict(env["properties"], body_encoding="gzip")))


@pytest.mark.parametrize("payload", [{"sample_id": "x"}, {"ref": "x", "more": 1}, ["ref"], {"ref": None}])
def test_only_exactly_one_ref_is_a_reference(payload) -> None:
    assert reference_of(payload) is None


def test_marks_keep_the_payload_the_planner_made(tmp_path) -> None:
    plan = _plan(tmp_path)
    head = payload_head(plan)
    hid = head_id(head)
    whole = {smp.sample_id: p for smp, _, p in payloads(plan, plan.samples, lambda s: "q")}
    for smp, q, tail in tails(plan, plan.samples, lambda s: "q"):
        assert tail.startswith(GROUP_START) and smp.sample_id not in tail  # the id is the hash field
        got = unkeep(mark(hid, q, tail), smp.sample_id, {hid: head}.get)
        assert got == ("q", whole[smp.sample_id])
        task = TaskPayload.model_validate_json(got[1])
        assert (task.sample_id, task.group, task.memory_mib, task.params["greeting"]) == (
            smp.sample_id, smp.group, smp.memory_mib, "hello")
    assert unkeep(mark(hid, "q", tail), "x", {}.get) is None  # an unknown head
    assert unkeep(kept_payload("q2", '{"a":1}'), "x", {}.get) == ("q2", '{"a":1}')  # kept whole
    legacy = f'{hid}\tq\t,"sample_id":"{"0" * 32}"' + tail  # the earlier layout: the id in the tail
    assert unkeep(legacy, "0" * 32, {hid: head}.get)[1].count('"sample_id"') == 1
    assert is_legacy('["exp","g"]') and unkeep('["exp","g"]', "x", {}.get) is None


def test_output_keys_are_short_and_tell_paths_apart() -> None:
    keys = {output_key(f"/out/镜头/{i}.mp4") for i in range(1000)}
    assert len(keys) == 1000 and {len(k) for k in keys} == {12}


def test_output_sizes_by_folder_match_stat(tmp_path) -> None:
    from fleet import output_files

    paths = []
    for i in range(1500):  # over BY_FOLDER_FROM: stat'ed relative to their folders
        folder = tmp_path / f"{i % 3}"
        folder.mkdir(exist_ok=True)
        p = folder / f"{i}.out"
        if i % 4:
            p.write_bytes(b"x" * (i % 5))
        paths.append(str(p))
    paths += [str(tmp_path / "no such folder" / "a.out"), str(tmp_path) + "/", str(tmp_path / "0")]
    want = [os.stat(p).st_size if os.path.exists(p) else None for p in paths]
    assert output_files.sizes(paths) == want and output_files.sizes(paths[:10]) == want[:10]
