"""The operator's view: `fleet status` from the experiment's own records, the list of
experiments, `fleet export` and `fleet logs`, on a real Redis with real worker processes."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleet.contract import CompletionRecord
from fleet.errors import InputError
from fleet.export import finished_rows, write
from tests.integration.conftest import Fleet, LocalFleet, wait_for
from tests.integration.test_control import KIND_ENV, items, touch_exp

pytestmark = pytest.mark.integration


def test_status_and_export_keep_samples_whose_reference_video_is_gone(fleet_ns: Fleet, video_experiment) -> None:
    f = fleet_ns
    exp = video_experiment(videos={"c": ["kept", "made", "gone"]}, prompts={"*": ["a boat"]})
    assert f.enqueue(exp)["enqueued"] == 3
    dataset = exp.parent / "dataset" / "c"
    (dataset / "gone.mp4").unlink()  # after enqueue: its sample fails for good on the worker
    f.start_worker()
    wait_for(lambda: f.done_count() == 2 and f.client.hlen(f.keys.failed) == 1 and not f.client.hlen(f.keys.queued)
             and not f.client.hlen(f.keys.running), 120, "two samples done, one failed")
    (dataset / "made.mp4").unlink()  # a done sample's reference video goes too

    st = json.loads(f.fleet("status", str(exp), "--json", "--failed", check=True).stdout)
    assert (st["total"], st["done"], st["failed"], st["queued"], st["running"]) == (3, 2, 1, 0, 0)
    assert st["by_group"] == {"c": {"total": 3, "done": 2, "failed": 1, "queued": 0, "running": 0, "pending": 0}}
    assert [(x["error_type"], "gone" in x["label"]) for x in st["failures"]] == [("InputError", True)]

    # Without an experiment: one row per experiment, and the namespace's totals as before.
    every = json.loads(f.fleet("status", "--json", check=True).stdout)
    (row,) = every["experiments"]
    assert (row["name"], row["kind"], row["total"], row["done"], row["failed"], row["queued"], row["running"]) == \
        ("experiment", "video", 3, 2, 1, 0, 0)
    assert row["last_enqueued_at"] >= row["first_enqueued_at"] > 0 and row["output_root"] == str(exp.parent / "out")
    assert (every["done"], every["failed"], every["paused"]) == (2, 1, False)
    assert "experiment" in f.fleet("status", check=True).stdout

    # Export: one row per finished sample, from the records, in all three formats alike.
    recs = {k.decode(): CompletionRecord.model_validate_json(v) for k, v in f.client.hgetall(f.keys.records).items()}
    text = f.fleet("export", str(exp), check=True).stdout  # csv on stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["sample_id"] for r in rows} == set(recs)
    for r in rows:
        rec = recs[r["sample_id"]]
        assert (r["group"], r["label"], r["output_path"], r["worker"], r["hostname"], r["gpus"]) == \
            (rec.group, rec.label, rec.output_path, rec.worker, rec.hostname, "")
        assert float(r["duration_s"]) == rec.duration_s and float(r["finished_at"]) == rec.finished_at
        assert {k[len("metric_"):] for k in r if k.startswith("metric_") and r[k] != ""} == set(rec.metrics)
        assert (r["param_seed"], r["param_prompt"], r["param_category"]) == ("42", "a boat", "c")
    jl, pq_path = exp.parent / "x.jsonl", exp.parent / "x.parquet"
    assert "wrote 2 finished samples" in f.fleet("export", "experiment", "--format", "jsonl", "--out", str(jl),
                                                 check=True).stdout  # by name
    f.fleet("export", str(exp), "--format", "parquet", "--out", str(pq_path), check=True)
    import pyarrow.parquet as pq

    from_jsonl = [json.loads(line) for line in jl.read_text(encoding="utf-8").splitlines()]
    from_parquet = pq.read_table(pq_path).to_pylist()
    for got in (from_jsonl, from_parquet):
        assert [(r["sample_id"], r["duration_s"], r["finished_at"], r["param_seed"], r["label"]) for r in got] == \
            [(r["sample_id"], float(r["duration_s"]), float(r["finished_at"]), 42, r["label"]) for r in rows]
    with pytest.raises(InputError, match="needs --out"):  # Parquet is binary: never on stdout
        write(from_jsonl, "parquet", None)

    # Redis loses a record: the manifest still exports it; a newer manifest line wins over Redis.
    lost, newer = sorted(recs)
    f.client.hdel(f.keys.records, lost)
    f.client.srem(f.keys.done, lost)
    line = {**json.loads(recs[newer].model_dump_json(by_alias=True)), "duration_s": 99.5,
            "finished_at": recs[newer].finished_at + 1, "params": {"seed": 42}}
    with open(exp.parent / "out" / "fleet-manifest.jsonl", "a", encoding="utf-8") as m:
        m.write(json.dumps(line) + "\n")
    out = finished_rows(f.client, f.namespace, "experiment", exp.parent / "out")
    assert {r["sample_id"]: r["duration_s"] for r in out} == {lost: recs[lost].duration_s, newer: 99.5}


def test_logs_of_a_worker_and_of_a_sample_across_rotations(local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    small = {"FLEET_LOG_MAX_MIB": "0.002", "FLEET_LOG_BACKUPS": "50", **KIND_ENV}  # rotate at 2 KiB
    f.fleet("up", "--cpu-workers", "1", check=True, **small)
    wait_for(f.worker_registered, 60, "the worker")
    log = f.logs / "worker-cpu0.log"
    first = touch_exp(tmp_path, "first", items("a1", "a2", "a3", "a4"))
    assert json.loads(f.fleet("enqueue", str(first), "--json", check=True, **small).stdout)["enqueued"] == 4
    wait_for(lambda: f.done_count() == 4, 60, "the first batch")
    wait_for(lambda: Path(f"{log}.1").exists(), 30, "the worker's log rotated")
    a1 = next(k.decode() for k, v in f.client.hgetall(f.keys.records).items() if b'"touch a1"' in v)
    # Samples published before the experiments index existed join it at the next enqueue.
    f.client.delete(f.keys.experiment_samples("first"), f.keys.experiments)
    assert json.loads(f.fleet("enqueue", str(first), "--json", check=True, **small).stdout)["done"] == 4
    assert f.client.hlen(f.keys.experiment_samples("first")) == 4 and f.client.hexists(f.keys.experiments, "first")

    # -f from now on: the second batch fills the log past its size (a rotation), the third
    # one's lines are in the fresh file.
    follow = subprocess.Popen([sys.executable, "-m", "fleet.cli", "logs", "cpu0", "-f", "-n", "0"], env=f.env(**small),
                              stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    threading.Thread(target=lambda: seen.extend(follow.stdout), daemon=True).start()

    def following() -> bool:  # -n 0 starts at the end: lines written before it opened the log are not its
        try:
            return any(os.path.realpath(f"/proc/{follow.pid}/fd/{fd}") == os.path.realpath(log)
                       for fd in os.listdir(f"/proc/{follow.pid}/fd"))
        except OSError:
            return False

    wait_for(following, 30, "`fleet logs -f` to open the worker's log")
    f.fleet("enqueue", str(touch_exp(tmp_path, "second", items("b1", "b2", "b3", "b4", "b5"))), check=True, **small)
    wait_for(lambda: Path(f"{log}.2").exists(), 30, "the worker's log rotated again")
    f.fleet("enqueue", str(touch_exp(tmp_path, "third", items("c1"))), check=True, **small)
    wait_for(lambda: sum(" done " in ln for ln in seen) == 6, 30, "-f to print the done lines of b1-b5 and c1")
    follow.send_signal(signal.SIGINT)
    assert follow.wait(20) == 0
    assert not any("touch a1" in ln for ln in seen)  # only what came after -f started

    whole = f.fleet("logs", "cpu0", check=True).stdout.splitlines()
    files = sorted(f.logs.glob("worker-cpu0.log*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    assert len(files) >= 3
    assert whole == [ln for p in files for ln in p.read_text().splitlines()]  # oldest first, nothing lost
    assert whole.index(next(ln for ln in whole if "ready" in ln)) < whole.index(next(ln for ln in whole if re.search(r"\bc1\b", ln)))
    assert f.fleet("logs", "cpu0", "-n", "3", check=True).stdout.splitlines() == whole[-3:]

    mine = f.fleet("logs", a1[:12], check=True).stdout.splitlines()  # Flower's label shows 12 characters
    assert any(f"start {a1}" in ln for ln in mine) and any(f"done {a1}" in ln for ln in mine)
    assert all(f"[{a1}] " in ln for ln in mine)  # every line the worker logged while running it is tagged
    assert f.fleet("logs", "nope").returncode == 1


def test_status_after_enqueue_skips_the_index_check_only_while_every_published_id_is_planned(
        fleet_ns: Fleet, tmp_path: Path) -> None:
    """The first enqueue of a plan marks the samples hash as wholly planned (Keys.index_checked),
    so status need not list it; an enqueue after a sample left the plan must not."""
    from fleet.enqueue import enqueue
    from fleet.experiment import load_experiment
    from fleet.experiment_index import plan_digest
    from fleet.kinds import KindModules
    from fleet.planner import plan_experiment
    from fleet.status import experiment_status

    f = fleet_ns
    kinds = {"touch": KindModules(planner="tests.kinds.touch", job="tests.kinds.touch")}

    def run(names: list[str]) -> tuple[dict, str, str]:
        exp = load_experiment(touch_exp(tmp_path, "ix", items(*names)), kinds=kinds)
        enqueue(f.client, f.namespace, exp, kinds=kinds)
        mark = (f.client.hget(f.keys.index_checked, "ix") or b"").decode()
        st = experiment_status(f.client, f.namespace, exp, None, kinds).as_dict()
        return st, mark, plan_digest([s.sample_id for s in plan_experiment(exp, None, None, kinds).samples])

    st, mark, digest = run(["a", "b", "c"])
    assert (st["total"], st["queued"]) == (3, 3) and mark == f"3 {digest}"
    st, mark_b, digest_b = run(["a", "b", "d"])  # c left the plan, then d was published: c still counts
    assert (st["total"], st["queued"]) == (4, 4)
    assert mark_b == mark and digest_b != digest  # the enqueue did not mark the hash as wholly planned
