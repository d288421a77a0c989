"""The video fleet end to end: real Redis, real `fleet worker` processes, real diffsynth."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from fleet.contract import CompletionRecord, queue_name
from fleet.priority import queue_length
from tests.integration.conftest import Fleet, wait_for
from tests.media import read_frames

pytestmark = pytest.mark.integration


def records(f: Fleet) -> dict[str, CompletionRecord]:
    return {k.decode(): CompletionRecord.model_validate_json(v) for k, v in f.client.hgetall(f.keys.records).items()}


def test_end_to_end_incremental(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(videos={"cat a": ["v1", "视频 二"], "camera_motion": ["dolly"]})
    first = fleet_ns.enqueue(exp)
    assert first == {"planned": 6, "done": 0, "in_flight": 0, "enqueued": 6}
    assert queue_length(fleet_ns.client, queue_name(fleet_ns.namespace, "gpu")) == 6  # every priority list
    # Enqueued again before any worker runs: all in flight, nothing published twice.
    assert fleet_ns.enqueue(exp) == {"planned": 6, "done": 0, "in_flight": 6, "enqueued": 0}

    fleet_ns.start_worker()
    wait_for(lambda: fleet_ns.done_count() == 6, 120, "6 samples done")

    recs = records(fleet_ns)
    assert len(recs) == 6
    outputs = sorted(Path(r.output_path) for r in recs.values())
    root = exp.parent / "out"
    assert root / "cat a" / "ref_视频 二_64x64" / "seed_42_prompt_1.mp4" in outputs
    for out in outputs:
        frames = read_frames(out)
        assert frames.shape == (5, 64, 64, 3), out
    assert [f.name for f in root.rglob("*") if f.name.startswith(".")] == []  # no temp files left
    loaded = [r for r in recs.values() if r.model_loaded]
    assert len(loaded) == 1 and loaded[0].model_load_s > 0  # one model load per worker
    assert all(r.model_load_s == 0 for r in recs.values() if not r.model_loaded)
    assert all(r.gpus == [] for r in recs.values()) and all(r.attempt == 1 and r.duration_s > 0 for r in recs.values())

    status = json.loads(fleet_ns.fleet("status", str(exp), "--json", check=True).stdout)
    assert (status["total"], status["done"], status["queued"], status["running"], status["failed"]) == (6, 6, 0, 0, 0)
    assert status["by_group"]["cat a"]["done"] == 4

    # Re-run: nothing to do.
    assert fleet_ns.enqueue(exp) == {"planned": 6, "done": 6, "in_flight": 0, "enqueued": 0}
    # A new video enqueues exactly its samples.
    video_experiment(videos={"cat a": ["v1", "视频 二", "v3"], "camera_motion": ["dolly"]})
    dry = fleet_ns.enqueue(exp, "--dry-run")
    assert dry["enqueued"] == 0 and {s["video"] for s in dry["would_enqueue"]} == {"v3"} and len(dry["would_enqueue"]) == 2
    assert fleet_ns.enqueue(exp)["enqueued"] == 2
    wait_for(lambda: fleet_ns.done_count() == 8, 60, "the new video's samples")
    # A deleted output makes exactly that sample not done.
    victim = root / "camera_motion" / "ref_dolly_64x64" / "seed_42_prompt_0.mp4"
    victim.unlink()
    dry = fleet_ns.enqueue(exp, "--dry-run")
    assert [s["output"] for s in dry["would_enqueue"]] == [str(victim)]
    assert fleet_ns.enqueue(exp)["enqueued"] == 1
    wait_for(victim.exists, 60, "the deleted sample made again")
    # A changed parameter that decides the output makes new samples, not a reuse of old files.
    video_experiment(videos={"cat a": ["v1", "视频 二", "v3"], "camera_motion": ["dolly"]}, steps=2)
    assert fleet_ns.enqueue(exp, "--dry-run")["done"] == 0


def test_same_sample_on_two_workers_is_identical(fleet_ns: Fleet, video_experiment, tmp_path: Path) -> None:
    exp = video_experiment(videos={"c": ["only"]}, prompts={"only": ["a red kite over the sea"]})
    assert fleet_ns.enqueue(exp)["enqueued"] == 1
    a = fleet_ns.start_worker(slot=0)
    wait_for(lambda: fleet_ns.done_count() == 1, 120, "first sample")
    first = records(fleet_ns)
    (sid, rec), = first.items()
    kept = shutil.copy(rec.output_path, tmp_path / "first.mp4")
    fleet_ns.stop(a)
    Path(rec.output_path).unlink()
    assert fleet_ns.enqueue(exp)["enqueued"] == 1
    fleet_ns.start_worker(slot=1)
    wait_for(lambda: Path(rec.output_path).exists() and records(fleet_ns)[sid].worker != rec.worker, 120, "second worker")
    assert records(fleet_ns)[sid].worker.startswith("cpu1@")
    assert np.array_equal(read_frames(Path(kept)), read_frames(Path(rec.output_path)))


def test_worker_killed_mid_sample(fleet_ns: Fleet, video_experiment) -> None:
    # Enough steps that the sample runs for seconds, so the kill lands inside it.
    exp = video_experiment(videos={"c": ["slow"]}, prompts={"*": ["a storm"]}, steps=60, width=128, height=128)
    assert fleet_ns.enqueue(exp)["enqueued"] == 1
    out = exp.parent / "out" / "c" / "ref_slow_128x128" / "seed_42_prompt_0.mp4"
    w = fleet_ns.start_worker(slot=0)
    wait_for(lambda: (e := fleet_ns.worker_entry(0)) is not None and e.sample_id is not None, 60, "sample running")
    fleet_ns.stop(w, signal.SIGKILL)
    assert not out.exists()
    assert fleet_ns.client.hlen(fleet_ns.keys.running) == 1  # the dead worker's sample, lease expiring
    # The visibility timeout is hours; the fleet's lease brings the sample back instead.
    fleet_ns.start_worker(slot=1)
    wait_for(lambda: fleet_ns.done_count() == 1, 180, "sample done after the kill")
    rec = next(iter(records(fleet_ns).values()))
    assert rec.worker.startswith("cpu1@") and rec.deliveries == 2
    assert read_frames(out).shape == (5, 128, 128, 3)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # a temp file the kill left is cleaned up
    assert fleet_ns.client.hlen(fleet_ns.keys.running) == 0 and fleet_ns.client.hlen(fleet_ns.keys.queued) == 0
