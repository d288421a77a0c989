"""`fleet up` keeps applying the placement policy while it runs (fake GPU inventory, real
supervisor, real workers on the CPU): a worker whose GPU a colleague takes finishes its
sample and stops; it comes back when the GPU is free again."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from fleet.contract import CompletionRecord, WorkerEntry
from fleet.priority import queue_length
from tests.integration.conftest import LocalFleet, pid_gone, wait_for

pytestmark = pytest.mark.integration
HOST = socket.gethostname()


def write_gpus(path: Path, colleague_on: set[int] = frozenset()) -> None:
    gpus = []
    for i in (0, 1):
        used = 75000 if i in colleague_on else 500
        procs = [{"pid": 999999, "used_mib": 74500, "user": "alice", "name": "train.py"}] if i in colleague_on else []
        gpus.append({"index": i, "uuid": f"GPU-fake-{i}", "name": "Fake A800", "memory_total_mib": 81920,
                     "memory_used_mib": used, "memory_free_mib": 81920 - used, "utilization_pct": 90 if procs else 0,
                     "processes": procs})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(gpus))
    os.replace(tmp, path)  # readers never see half a file


def records(f: LocalFleet) -> list[CompletionRecord]:
    return [CompletionRecord.model_validate_json(v) for v in f.client.hvals(f.keys.records)]


def known_ids(f: LocalFleet) -> set[str]:
    """Every sample id the fleet has seen (queued, running or done)."""
    return {k.decode() for h in (f.keys.queued, f.keys.running, f.keys.records) for k in f.client.hkeys(h)}


def entry(f: LocalFleet, name: str) -> WorkerEntry | None:
    raw = f.client.hget(f.keys.workers, f"{name}@{HOST}")
    return WorkerEntry.model_validate_json(raw) if raw else None


def test_workers_yield_to_a_colleague_and_come_back(local_fleet: LocalFleet, video_experiment, tmp_path: Path) -> None:
    f = local_fleet
    gpus = tmp_path / "gpus.json"
    write_gpus(gpus)
    env = {"FLEET_FAKE_GPUS": str(gpus), "FLEET_PLACEMENT_INTERVAL_S": "0.3"}
    f.fleet("up", "--min-free-mib", "30000", check=True, **env)
    wait_for(lambda: entry(f, "gpu0") and entry(f, "gpu1"), 60, "a worker on each fake GPU")
    pid1 = f.worker_pids()["gpu1"]

    exp = video_experiment(videos={"c": [f"v{i}" for i in range(6)]}, prompts={"*": ["wind"]}, steps=25,
                           width=96, height=96)
    assert f.enqueue(exp)["enqueued"] == 6
    running = wait_for(lambda: (e := entry(f, "gpu1")) is not None and e.sample_id, 120, "gpu1 running a sample")

    shown = json.loads(f.fleet("gpus", "--json", check=True, **env).stdout)
    on1 = shown["gpus"][1]["fleet_workers"]
    assert [w["name"] for w in shown["gpus"][0]["fleet_workers"]] == [f"gpu0@{HOST}"]
    assert [w["name"] for w in on1] == [f"gpu1@{HOST}"] and on1[0]["sample_id"] in known_ids(f) | {None}
    assert shown["gpus"][1]["memory_total_mib"] == 81920

    write_gpus(gpus, colleague_on={1})  # a colleague takes GPU 1
    # gpu1 finishes the sample it has (never killed), then stops taking work.
    wait_for(lambda: pid_gone(pid1), 120, "gpu1 worker to finish its sample and stop")
    by_sample = {r.sample_id: r for r in records(f)}
    assert running in by_sample and by_sample[running].worker == f"gpu1@{HOST}"
    last_gpu1 = max(r.finished_at for r in records(f) if r.worker == f"gpu1@{HOST}")
    assert last_gpu1 == by_sample[running].finished_at  # nothing after the colleague came
    wait_for(lambda: "gpu1" not in f.worker_pids(), 30, "the supervisor to drop gpu1")
    log = (f.logs / "supervisor.log").read_text()
    assert "GPU 1:" in log and "free <" in log and "stop worker gpu1" in log

    wait_for(lambda: f.done_count() == 6, 180, "gpu0 finishing the rest")
    assert all(r.worker == f"gpu0@{HOST}" for r in records(f) if r.finished_at > last_gpu1)

    write_gpus(gpus)  # the colleague leaves: gpu1 comes back and takes work again
    wait_for(lambda: "gpu1" in f.worker_pids() and f.worker_pids()["gpu1"] != pid1, 60, "gpu1 restarted")
    more = video_experiment(videos={"c": [f"v{i}" for i in range(6)]}, prompts={"*": ["wind", "rain", "snow"]},
                            steps=25, width=96, height=96)
    assert f.enqueue(more)["enqueued"] == 12
    wait_for(lambda: any(r.worker == f"gpu1@{HOST}" and r.finished_at > last_gpu1 for r in records(f)), 180,
             "gpu1 taking work again")


def test_multi_gpu_work_goes_first_on_a_group_worker(local_fleet: LocalFleet, video_experiment, tmp_path: Path) -> None:
    f = local_fleet
    gpus = tmp_path / "gpus.json"
    write_gpus(gpus)
    env = {"FLEET_FAKE_GPUS": str(gpus), "FLEET_PLACEMENT_INTERVAL_S": "0.3"}
    f.fleet("up", check=True, **env)
    wait_for(lambda: entry(f, "gpu0") and entry(f, "gpu1"), 60, "a worker on each fake GPU")

    single = video_experiment(videos={"one": ["a", "b"]}, prompts={"*": ["x"]}, root=tmp_path / "single",
                              name="single")
    multi = video_experiment(videos={"two": ["m"]}, prompts={"*": ["y", "z"]}, gpus_per_sample=2,
                             root=tmp_path / "multi", name="multi")
    assert f.enqueue(multi)["enqueued"] == 2
    assert queue_length(f.client, "fleet.q.gpus2") == 2  # every priority list (fleet.priority)
    # The single-GPU workers make way (after their sample); a worker holding both GPUs takes the work.
    wait_for(lambda: sum(r.gpus == [0, 1] for r in records(f)) == 2, 120, "both 2-GPU samples done")
    assert {r.worker for r in records(f)} == {f"gpus0-1@{HOST}"}
    log = (f.logs / "supervisor.log").read_text()
    assert "2-GPU work queued: group of GPUs [0, 1]" in log
    # With no multi-GPU work left, the group is released and single-GPU work runs again.
    assert f.enqueue(single)["enqueued"] == 2
    wait_for(lambda: sum(r.gpus in ([0], [1]) for r in records(f)) == 2, 120, "single-GPU samples done")
    wait_for(lambda: "gpus0-1" not in f.worker_pids(), 30, "the group worker stopped")


def test_up_with_every_gpu_taken_waits_for_one(local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    gpus = tmp_path / "gpus.json"
    write_gpus(gpus, colleague_on={0, 1})
    env = {"FLEET_FAKE_GPUS": str(gpus), "FLEET_PLACEMENT_INTERVAL_S": "0.3"}
    out = f.fleet("up", "--exclusive", check=True, **env).stdout
    assert "none yet: no GPU is usable" in out and f.worker_pids() == {}
    assert "not idle for exclusive mode" in (f.logs / "supervisor.log").read_text()
    write_gpus(gpus, colleague_on={1})  # GPU 0 comes free
    wait_for(lambda: entry(f, "gpu0") is not None, 60, "a worker on the GPU that came free")
    assert list(f.worker_pids()) == ["gpu0"]


def test_auto_slots_grow_once_the_first_worker_measured_its_peak(local_fleet: LocalFleet, video_experiment,
                                                                 tmp_path: Path) -> None:
    f = local_fleet
    gpus = tmp_path / "gpus.json"
    write_gpus(gpus)
    env = {"FLEET_FAKE_GPUS": str(gpus), "FLEET_PLACEMENT_INTERVAL_S": "0.3"}
    f.fleet("up", "--gpus", "0", "--slots", "auto", check=True, **env)
    wait_for(lambda: entry(f, "gpu0"), 60, "the first worker")
    shown = json.loads(f.fleet("gpus", "--json", check=True, **env).stdout)["gpus"][0]["placement"]
    assert shown["text"] == "1 slot (auto: measuring, 0 of 2 samples)" and list(f.worker_pids()) == ["gpu0"]

    # The fake NVML lists the worker's process holding 20000 MiB: what it measures after each sample.
    data = json.loads(gpus.read_text())
    data[0].update(memory_used_mib=20500, memory_free_mib=81920 - 20500,
                   processes=[{"pid": f.worker_pids()["gpu0"], "used_mib": 20000, "name": "python3"}])
    gpus.with_suffix(".tmp").write_text(json.dumps(data))
    os.replace(gpus.with_suffix(".tmp"), gpus)
    assert f.enqueue(video_experiment(videos={"c": ["v0"]}, prompts={"*": ["wind", "rain"]}))["enqueued"] == 2

    # 81920 - 500 (colleagues') - 8192 (10 % margin) = 73228 MiB usable: 3 slots of 20000.
    wait_for(lambda: {"gpu0s1", "gpu0s2"} <= set(f.worker_pids()), 90, "two more workers on GPU 0")
    assert (e := entry(f, "gpu0")) is not None and (e.peak_mib, e.peak_samples) == (20000, 2)
    shown = json.loads(f.fleet("gpus", "--json", check=True, **env).stdout)["gpus"][0]["placement"]
    assert shown["slots"] == 3 and shown["text"] == (
        "3 slots (auto: peak 19.5 GiB/sample measured over 2 samples, 71.5 GiB usable after 8.0 GiB margin)")
    assert "gpu0s3" not in f.worker_pids() and "-> 3 slots (auto: peak" in (f.logs / "supervisor.log").read_text()
