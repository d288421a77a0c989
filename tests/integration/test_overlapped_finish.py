"""The overlapped finish (workers/finisher.py, docs/ARCHITECTURE.md "Overlapped finish"): a
sample's CPU tail runs in a thread of its worker while the next sample computes.

The runner is driven in this process against the real Redis (and, for stopping, a real
`fleet worker` process): a record is written only once its file is in place, the next
sample runs meanwhile, a failing finish fails its own sample, the finishing sample's lease
is renewed and advertised, it is given back on an immediate stop, and a warm stop waits
for it. The tiny video model checks that the worker's overlapped files are the bare
pipeline's, byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from fleet import records as fleet_records
from fleet.contract import CompletionRecord, FailureRecord, RunningEntry, TaskPayload, WorkerEntry, queue_name
from fleet.kinds import KindModules
from fleet.priority import queue_length
from fleet.settings import load_settings
from tests.integration.conftest import Fleet, wait_for
from workers.jobs import JobRegistry
from workers.runner import SampleRunner

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
FINISHING = {"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.finishing"}}


@pytest.fixture
def make_runner(fleet_ns: Fleet, tmp_path: Path) -> Iterator[Callable[..., SampleRunner]]:
    """``make_runner(**settings)``: a SampleRunner in this process on the test's namespace."""
    made: list[SampleRunner] = []

    def make(**overrides: object) -> SampleRunner:
        settings = load_settings(broker_url=fleet_ns.url, namespace=fleet_ns.namespace, state_dir=tmp_path / "state",
                                 output_roots=[tmp_path], retry_backoff_s=0, lease_ttl_s=5, **overrides)
        jobs = JobRegistry({k: KindModules(**v) for k, v in FINISHING.items()})
        runner = SampleRunner(settings, fleet_ns.client, f"cpu{len(made)}@test", (), "cpu", jobs=jobs)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        for hold in (tmp_path / "out").glob("*.hold"):
            hold.unlink()  # a failed test must not leave a finish waiting
        runner.close(30)


def q(f: Fleet) -> str:
    """The test's queue (in its namespace, so the fixture's cleanup removes what is left in it)."""
    return queue_name(f.namespace, "gpu")


def touch(tmp_path: Path, name: str, fail: str = "", hold: bool = False) -> dict:
    """The payload the touch planner would publish for item ``name`` (its finish held while
    ``<output>.hold`` exists)."""
    out = tmp_path / "out" / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    if hold:
        out.with_name(out.name + ".hold").write_text("")
    return TaskPayload(kind="touch", sample_id=f"s{name:0>31}", experiment="overlap", group="items", label=name,
                       output_path=str(out), output_root=str(tmp_path / "out"), shared={"greeting": "hello"},
                       body={"text": name, "sleep_s": 0, "ignore_stop": False, "fail": fail}).model_dump(by_alias=True)


def release(payload: dict) -> None:
    Path(payload["output_path"] + ".hold").unlink()


def record(f: Fleet, payload: dict) -> CompletionRecord | None:
    raw = f.client.hget(f.keys.records, payload["sample_id"])
    return CompletionRecord.model_validate_json(raw) if raw else None


def test_the_record_waits_for_the_file_while_the_next_sample_runs(
    fleet_ns: Fleet, make_runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.heartbeat import Heartbeat

    runner = make_runner()
    completed = fleet_records.complete

    def complete_after_the_file(client, keys, rec: CompletionRecord, *rest: object) -> None:
        assert Path(rec.output_path).read_text().startswith("hello "), "record before its file"
        completed(client, keys, rec, *rest)

    monkeypatch.setattr(fleet_records, "complete", complete_after_the_file)
    a, b = touch(tmp_path, "a", hold=True), touch(tmp_path, "b", hold=True)
    assert runner.run(a, q(fleet_ns)) == "finishing"  # the task returns (its message is acked) with the file pending
    assert not Path(a["output_path"]).exists() and record(fleet_ns, a) is None
    assert fleet_ns.client.hexists(fleet_ns.keys.running, a["sample_id"])
    assert runner.finishing is not None and runner.finishing.sample_id == a["sample_id"] and runner.current is None

    # The heartbeat renews the finishing sample's lease and says the worker is finishing it.
    lease = fleet_ns.keys.lease(a["sample_id"])
    fleet_ns.client.pexpire(lease, 500)
    Heartbeat(runner, [q(fleet_ns)]).beat()
    assert fleet_ns.client.pttl(lease) > 1000
    entry = WorkerEntry.model_validate_json(fleet_ns.client.hget(fleet_ns.keys.workers, runner.worker))
    assert entry.finishing == a["sample_id"]

    # The next sample computes meanwhile; handing over its own finish waits for a's (one pending at most).
    outcome: list[str] = []
    second = threading.Thread(target=lambda: outcome.append(runner.run(b, q(fleet_ns))))
    second.start()
    from tests.kinds import finishing

    wait_for(lambda: b["sample_id"] in finishing.COMPUTED, 30, "the second sample's compute")
    second.join(0.3)
    assert second.is_alive() and record(fleet_ns, a) is None
    release(a)
    second.join(30)
    assert outcome == ["finishing"]
    ra = wait_for(lambda: record(fleet_ns, a), 30, "a's record")
    assert ra.output_bytes == Path(a["output_path"]).stat().st_size
    assert ra.metrics["finished_in"].startswith("fleet-finish-") and ra.metrics["computed_in"] != ra.metrics["finished_in"]
    assert not runner.close(0.2)  # b is held: a stopping worker would wait for it
    release(b)
    assert runner.close(30)
    rb = record(fleet_ns, b)
    assert rb is not None and rb.metrics["stage_wait_s"] > 0 and "stage_record_prev_s" in rb.metrics
    assert 0 < rb.metrics["gpu_held_s"] < rb.duration_s  # its tail, held, counts toward no GPU time
    assert fleet_ns.client.hlen(fleet_ns.keys.running) == 0 and runner.finishing is None
    assert not fleet_ns.client.exists(lease)


def test_a_failing_finish_fails_its_own_sample(fleet_ns: Fleet, make_runner, tmp_path: Path) -> None:
    runner = make_runner()
    a = touch(tmp_path, "a", fail="finish: encoder crashed (simulated)", hold=True)
    b = touch(tmp_path, "b")
    assert runner.run(a, q(fleet_ns)) == "finishing"
    release(a)  # a fails in the finisher while b computes (or after: either way it is a's failure)
    assert runner.run(b, q(fleet_ns)) == "finishing"
    assert runner.close(30)
    raw = fleet_ns.client.hget(fleet_ns.keys.failed, a["sample_id"])
    failure = FailureRecord.model_validate_json(raw)
    assert (failure.error_type, failure.attempt, failure.retryable) == ("RuntimeError", 1, True)
    assert "encoder crashed" in failure.message and failure.metrics.get("computed_in")  # a's own metrics
    assert record(fleet_ns, a) is None and not Path(a["output_path"]).exists()
    assert queue_length(fleet_ns.client, q(fleet_ns)) == 1  # a's attempt 2, at the front of its queue
    assert fleet_ns.client.hexists(fleet_ns.keys.queued, a["sample_id"])
    rb = record(fleet_ns, b)
    assert rb is not None and Path(b["output_path"]).read_text() == "hello b"
    assert not fleet_ns.client.hexists(fleet_ns.keys.failed, b["sample_id"])
    assert fleet_ns.client.hlen(fleet_ns.keys.running) == 0
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_an_immediate_stop_gives_the_finishing_sample_back(fleet_ns: Fleet, make_runner, tmp_path: Path) -> None:
    from workers.heartbeat import Heartbeat
    from workers.main import Stopper

    runner = make_runner()
    a = touch(tmp_path, "a", hold=True)
    assert runner.run(a, q(fleet_ns)) == "finishing"
    Stopper(runner, Heartbeat(runner, [q(fleet_ns)]), runner.worker).give_back()  # what a second Ctrl-C does
    assert not fleet_ns.client.hexists(fleet_ns.keys.running, a["sample_id"])
    assert not fleet_ns.client.exists(fleet_ns.keys.lease(a["sample_id"]))
    assert fleet_ns.client.hexists(fleet_ns.keys.queued, a["sample_id"]) and queue_length(fleet_ns.client, q(fleet_ns)) == 1


def test_a_warm_stop_waits_for_the_finishing_sample(fleet_ns: Fleet, tmp_path: Path) -> None:
    env = {"FLEET_KINDS": json.dumps(FINISHING), "PYTHONPATH": REPO}
    exp = tmp_path / "exp" / "experiment.yaml"
    exp.parent.mkdir()
    exp.write_text(yaml.safe_dump({"kind": "touch", "name": "overlap", "output": "out",
                                   "items": [{"name": "a", "text": "alpha"}, {"name": "b", "text": "beta"}]}))
    out = exp.parent / "out"
    out.mkdir()
    holds = [out / "a.txt.hold", out / "b.txt.hold"]
    for h in holds:
        h.write_text("")
    w = fleet_ns.start_worker(**env)
    assert json.loads(fleet_ns.fleet("enqueue", str(exp), "--json", check=True, **env).stdout)["enqueued"] == 2

    def finishing_while_running() -> WorkerEntry | None:
        e = fleet_ns.worker_entry(0)
        return e if e is not None and e.finishing is not None and e.sample_id is not None else None

    first = wait_for(finishing_while_running, 60, "one sample finishing while the other runs")
    os.killpg(w.pid, signal.SIGTERM)  # warm stop: the running sample ends, then the pending finish
    held = RunningEntry.model_validate_json(fleet_ns.client.hget(fleet_ns.keys.running, first.finishing))
    Path(held.task["output_path"] + ".hold").unlink()  # the finishing one's file lands
    wait_for(lambda: fleet_ns.done_count() == 1, 30, "the first record")
    with pytest.raises(subprocess.TimeoutExpired):
        w.wait(1.0)  # the second is held: the worker waits for its finish ...
    second = fleet_ns.client.hkeys(fleet_ns.keys.running)
    assert len(second) == 1 and fleet_ns.client.exists(fleet_ns.keys.lease(second[0].decode()))  # ... leased
    for h in holds:
        h.unlink(missing_ok=True)
    assert w.wait(30) == 0
    assert fleet_ns.done_count() == 2 and fleet_ns.client.hlen(fleet_ns.keys.running) == 0
    assert (out / "a.txt").read_text() == "hello alpha" and (out / "b.txt").read_text() == "hello beta"


def test_overlapped_video_files_are_the_bare_pipelines(fleet_ns: Fleet, make_runner, tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    """Three tiny-model samples (two sharing a prompt) through the runner, finishes in the
    background and the text cache on, against the video job run bare (sequential, no cache)."""
    import threading as _threading

    from workers.jobs import video as video_job
    from workers.jobs.base import JobContext
    from workers.model_cache import ModelCache
    from workers.tiny_model import spec_from_dir

    spec = spec_from_dir(tiny_model_dir)
    runner = make_runner()
    tasks = []
    for i, (prompt, seed) in enumerate([("a red kite", 42), ("a red kite", 142), ("一只猫", 42)]):
        for where in ("fleet", "bare"):
            out = tmp_path / "out" / where / f"{i}.mp4"
            tasks.append(TaskPayload(
                kind="video", sample_id=f"{where[0]}{i:0>31}", experiment="v", group="c", label=str(i),
                output_path=str(out), output_root=str(tmp_path / "out"), body=dict(
                    category="c", video="v", video_path="", prompt=prompt, prompt_index=0, negative_prompt="blurry",
                    seed=seed, mode="t2v", denoising_strength=1.0, width=64, height=64, frames=5, fps=8, steps=2,
                    cfg_scale=5.0, model=spec.model_dump())))
    bare_cache = ModelCache()
    for t in tasks:
        if t.sample_id.startswith("f"):
            assert runner.run(t.model_dump(by_alias=True), q(fleet_ns)) == "finishing"
        else:
            video_job.run(t, JobContext(gpus=(), device="cpu", models=bare_cache, work_dir=tmp_path / "w",
                                        stopping=_threading.Event()))
    assert runner.close(60)
    recs = {t.sample_id: record(fleet_ns, t.model_dump()) for t in tasks if t.sample_id.startswith("f")}
    for i in range(3):
        fleet_file, bare_file = tmp_path / "out" / "fleet" / f"{i}.mp4", tmp_path / "out" / "bare" / f"{i}.mp4"
        assert fleet_file.read_bytes() == bare_file.read_bytes(), i
    metrics = [recs[f"f{i:0>31}"].metrics for i in range(3)]
    # Prompt and negative prompt encoded for the first; the second's both cached; the third's new prompt encoded.
    assert [(m.get("text_encodes_count", 0), m.get("text_cache_hits_count", 0)) for m in metrics] == [(2, 0), (0, 2), (1, 1)]
    for m in metrics:
        assert {f"stage_{s}_s" for s in ("text", "inputs", "denoise", "vae", "convert", "encode", "write")} <= set(m)
