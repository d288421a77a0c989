"""Routing by need (pinned GPUs, memory classes) and the runner's error handling, on a
real Redis. The runner is driven directly (no Celery) with job functions that fail the
way a GPU job does, since this machine has no GPU to run out of memory on."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fleet.contract import FailureRecord, TaskPayload, queue_name
from fleet.errors import GpuOutOfMemory, InputError
from fleet.priority import queue_length, queue_lists
from fleet.publisher import encode_message
from fleet.records import RunningEntry
from fleet.settings import load_settings
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration


def queue_ids(f: Fleet, need: str) -> list[dict]:
    """The payloads waiting in one queue (a message's own, or the queued mark's it refers to)."""
    from fleet.kept_payloads import message_payload

    raws = [m for lst in queue_lists(queue_name(f.namespace, need)) for m in f.client.lrange(lst, 0, -1)]
    return [message_payload(f.client, f.keys, raw) for raw in raws]


def test_pinned_categories_and_memory_classes_route_to_their_queues(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(videos={"镜头 运动": ["a"], "other": ["b"]}, memory_mib=30000)
    placement = json.dumps({"assignment": {"镜头 运动": [1, 0]}})
    r = fleet_ns.fleet("enqueue", str(exp), "--json", FLEET_PLACEMENT=placement,
                       FLEET_MEMORY_CLASSES_MIB="[24000, 48000, 80000]", check=True)
    assert json.loads(r.stdout)["enqueued"] == 4
    assert {p["group"] for p in queue_ids(fleet_ns, "pin.0-1")} == {"镜头 运动"}
    assert {p["group"] for p in queue_ids(fleet_ns, "mem48000")} == {"other"}
    assert queue_length(fleet_ns.client, queue_name(fleet_ns.namespace, "gpu")) == 0


def test_a_need_no_class_can_hold_is_refused_before_publishing(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(memory_mib=100000)
    r = fleet_ns.fleet("enqueue", str(exp), FLEET_MEMORY_CLASSES_MIB="[24000, 80000]")
    assert r.returncode != 0
    (line,) = r.stderr.strip().splitlines()
    assert str(exp) in line and "exceeds the largest memory class" in line
    assert fleet_ns.client.hlen(fleet_ns.keys.queued) == 0
    assert not [k for k in fleet_ns.client.scan_iter(f"{fleet_ns.namespace}.q.*")]


@pytest.fixture
def runner_for(fleet_ns: Fleet, monkeypatch: pytest.MonkeyPatch):
    """A SampleRunner on the test's namespace whose job (for every kind) is ``job(task)``."""
    from workers.jobs import JobRegistry
    from workers.runner import SampleRunner

    class OneJob(JobRegistry):
        def __init__(self, job) -> None:
            super().__init__()
            self.the_job = job

        def job(self, kind: str):
            return lambda task, ctx: self.the_job(task)

    def make(job, classes: list[int] | None = None, **settings: object) -> SampleRunner:
        s = load_settings(broker_url=fleet_ns.url, namespace=fleet_ns.namespace, retry_backoff_s=0, output_roots=[fleet_ns.tmp],
                          state_dir=fleet_ns.tmp / "state", memory_classes_mib=classes or [], **settings)
        r = SampleRunner(s, fleet_ns.client, f"gpu0@{socket.gethostname()}", (0,), "cuda", jobs=OneJob(job))
        return r

    return make


def a_task(tmp_path: Path, **over: object) -> dict:
    body = {"category": "c", "video": "v", "video_path": str(tmp_path / "v.mp4"), "prompt": "p", "prompt_index": 0,
            "seed": 42, "mode": "t2v", "denoising_strength": 0.7, "width": 64, "height": 64, "frames": 5, "fps": 8,
            "steps": 1, "cfg_scale": 1.0, "model": {"dit": ["d"], "text_encoder": "t", "vae": "v", "tokenizer": "k"}}
    base = {"schema": "fleet.task/1", "kind": "video", "sample_id": "s" * 32, "experiment": "e", "group": "c",
            "label": "c/v seed 42 prompt 0", "output_path": str(tmp_path / "out.mp4"), "output_root": str(tmp_path),
            "memory_mib": 30000, "body": body}
    base.update(over)
    return base


def failure(f: Fleet, sid: str) -> FailureRecord:
    return FailureRecord.model_validate_json(f.client.hget(f.keys.failed, sid))


def test_oom_moves_the_sample_to_the_next_memory_class(fleet_ns: Fleet, runner_for, tmp_path: Path) -> None:
    def oom(task: TaskPayload):
        raise GpuOutOfMemory(f"sample needs {task.memory_mib} MiB (declared); ran out on cuda, which had 20000 MiB free")

    r = runner_for(oom, classes=[32000, 48000, 80000])
    q32 = queue_name(fleet_ns.namespace, "mem32000")
    assert r.run(a_task(tmp_path), q32) == "retried"
    (moved,) = queue_ids(fleet_ns, "mem48000")
    assert moved["attempt"] == 2 and moved["sample_id"] == "s" * 32
    assert failure(fleet_ns, "s" * 32).retryable
    assert fleet_ns.client.hexists(fleet_ns.keys.queued, "s" * 32)
    assert not fleet_ns.client.hexists(fleet_ns.keys.running, "s" * 32)

    # At the largest class there is nowhere to go: it fails, saying what it needed and had.
    assert r.run(moved, queue_name(fleet_ns.namespace, "mem80000")) == "failed"
    f = failure(fleet_ns, "s" * 32)
    assert (f.retryable, f.error_type, f.attempt) == (False, "GpuOutOfMemory", 2)
    assert "needs 30000 MiB" in f.message and "had 20000 MiB free" in f.message and "no larger memory class" in f.message
    assert not fleet_ns.client.hexists(fleet_ns.keys.queued, "s" * 32)


def test_bad_input_fails_at_once_without_retry(fleet_ns: Fleet, runner_for, tmp_path: Path) -> None:
    def bad(task: TaskPayload):
        raise InputError(f"{task.params['video_path']}: cannot decode video: moov atom not found")

    r = runner_for(bad)
    assert r.run(a_task(tmp_path), queue_name(fleet_ns.namespace, "gpu")) == "failed"
    f = failure(fleet_ns, "s" * 32)
    assert (f.error_type, f.retryable, f.attempt) == ("InputError", False, 1)
    assert "moov atom not found" in f.traceback_tail
    assert queue_length(fleet_ns.client, queue_name(fleet_ns.namespace, "gpu")) == 0
    st = json.loads(fleet_ns.fleet("status", "--json", "--failed", check=True).stdout)
    assert st["failed"] == 1 and st["by_group"]["c"]["failed"] == 1
    assert [(x["error_type"], x["sample_id"]) for x in st["failures"]] == [("InputError", "s" * 32)]
    text = fleet_ns.fleet("status", "--failed", check=True).stdout
    assert "InputError" in text and "moov atom not found" in text


def test_invalid_payload_is_recorded_not_run(fleet_ns: Fleet, runner_for, tmp_path: Path) -> None:
    ran = []
    r = runner_for(lambda t: ran.append(t))
    assert r.run(a_task(tmp_path, memory_mib="lots"), "q") == "failed"
    assert ran == [] and "invalid payload: memory_mib" in failure(fleet_ns, "s" * 32).message


def test_a_sample_that_keeps_killing_its_worker_fails(fleet_ns: Fleet, runner_for, tmp_path: Path) -> None:
    ran = []
    r = runner_for(lambda t: ran.append(t), max_deliveries=2)
    fleet_ns.client.hset(fleet_ns.keys.deliveries, "s" * 32, 2)  # two earlier starts died with their worker
    assert r.run(a_task(tmp_path), "q") == "failed"
    assert ran == [] and "started 2 times" in failure(fleet_ns, "s" * 32).message


def test_a_duplicate_delivery_of_a_running_sample_is_skipped(fleet_ns: Fleet, runner_for, tmp_path: Path) -> None:
    ran = []
    r = runner_for(lambda t: ran.append(t))
    fleet_ns.client.set(fleet_ns.keys.lease("s" * 32), "another-worker-token", px=30000)
    assert r.run(a_task(tmp_path), "q") == "skipped-running"
    assert ran == []


def test_orphan_is_published_again_exactly_once(fleet_ns: Fleet, tmp_path: Path) -> None:
    from fleet import records

    entry = RunningEntry(task=a_task(tmp_path), queue=queue_name(fleet_ns.namespace, "gpu"), worker="dead@h",
                         token="t", started_at=0.0)
    fleet_ns.client.hset(fleet_ns.keys.running, "s" * 32, entry.model_dump_json())
    (found,) = records.orphans(fleet_ns.client, fleet_ns.keys, ttl_s=1.0)
    msg = encode_message(json.dumps(entry.task), entry.queue, "x")
    takes = [records.take_orphan(fleet_ns.client, fleet_ns.keys, "s" * 32, "[]", entry.queue, msg) for _ in range(3)]
    assert takes == [True, False, False]
    assert fleet_ns.client.llen(entry.queue) == 1 and not fleet_ns.client.hexists(fleet_ns.keys.running, "s" * 32)


def test_a_worker_whose_samples_keep_failing_unexpectedly_stops(fleet_ns: Fleet, runner_for, tmp_path: Path) -> None:
    def broken(task: TaskPayload):
        raise RuntimeError("CUDA error: unspecified launch failure")

    r = runner_for(broken, max_consecutive_errors=3)
    stopped: list[str] = []
    r.on_broken = stopped.append  # instead of SIGTERMing the test process
    q = queue_name(fleet_ns.namespace, "gpu")
    outcomes = [r.run(a_task(tmp_path, sample_id=f"{i}" * 32), q) for i in range(3)]
    assert outcomes == ["retried"] * 3  # each sample gets another attempt (on another worker)
    assert len(stopped) == 1 and "3 samples in a row" in stopped[0] and "CUDA error" in stopped[0]
    assert {p["attempt"] for p in queue_ids(fleet_ns, "gpu")} == {2}


def test_the_reaper_tells_a_dead_worker_from_one_that_lost_its_lease_to_an_outage(
    fleet_ns: Fleet, runner_for, tmp_path: Path
) -> None:
    import time

    from fleet.contract import WorkerEntry
    from workers.heartbeat import Heartbeat

    r = runner_for(lambda t: None, heartbeat_s=0.2, lease_ttl_s=1.0)
    beat = Heartbeat(r, ["q"])
    c, k = fleet_ns.client, fleet_ns.keys
    for sid, worker in (("a" * 32, "alive@h"), ("d" * 32, "dead@h")):
        entry = RunningEntry(task=a_task(tmp_path, sample_id=sid), queue="q", worker=worker, token="t", started_at=0.0)
        c.hset(k.running, sid, entry.model_dump_json())  # no lease: Redis was down longer than the lease
    dead = WorkerEntry(name="dead@h", hostname="h", pid=1, gpus=(0,), queues=["q"], sample_id="d" * 32, seen_at=1.0)
    c.hset(k.workers, "dead@h", dead.model_dump_json())
    t0 = time.time()
    assert beat._confirmed_orphans(now=t0) == []  # first sight: suspects only
    alive = WorkerEntry(name="alive@h", hostname="h", pid=2, gpus=(1,), queues=["q"], sample_id="a" * 32,
                        seen_at=t0 + 0.1)  # it beat after the outage
    c.hset(k.workers, "alive@h", alive.model_dump_json())
    assert beat._confirmed_orphans(now=t0 + 0.2) == []  # within two beats: nobody is published yet
    assert [sid for sid, _ in beat._confirmed_orphans(now=t0 + 0.5)] == ["d" * 32]
