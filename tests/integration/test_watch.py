"""`fleet watch`: its JSON lines while real workers run an experiment agree with `fleet status`
and the records, and it ends by itself; the rich view renders; Ctrl-C ends it quietly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fleet import gpu_series
from fleet.contract import CompletionRecord, FailureRecord, RunningEntry, WorkerEntry
from fleet.watch import Watcher
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
ENV = {"FLEET_KINDS": json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}}),
       "PYTHONPATH": REPO, "FLEET_MAX_ATTEMPTS": "1"}


def touch_experiment(root: Path, items: list[dict]) -> Path:
    path = root / "watch exp" / "experiment.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"kind": "touch", "name": "watched", "output": "out", "items": items}), encoding="utf-8")
    return path


def watch_proc(f: Fleet, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", "watch", *args], env=f.env(**ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watch_follows_workers_to_the_end_and_agrees_with_status_and_records(fleet_ns: Fleet) -> None:
    f = fleet_ns
    items = ([{"name": f"a{i}", "text": "x", "sleep_s": 0.6, "group": "alpha"} for i in range(4)]
             + [{"name": f"b{i}", "text": "y", "sleep_s": 0.6, "group": "beta"} for i in range(3)]
             + [{"name": "bad", "fail": "boom", "group": "beta"}])
    exp = touch_experiment(f.tmp, items)
    assert f.fleet("enqueue", str(exp), "--json", check=True, **ENV).returncode == 0
    watch = watch_proc(f, str(exp), "--json", "--interval-s", "0.3")
    f.start_workers([0, 1], **ENV)
    out, err = watch.communicate(timeout=120)  # it ends by itself once nothing is queued, running or pending
    assert watch.returncode == 0, err

    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) >= 2
    done = [x["done"] for x in lines]
    assert done == sorted(done), f"done went down: {done}"
    assert lines[0]["total"] == 8 and set(lines[0]["groups"]) == {"alpha", "beta"}

    last = lines[-1]
    assert (last["queued"], last["running"], last["pending"], last["eta_s"]) == (0, 0, 0, 0.0)
    assert last["rate_per_min"] > 0 and last["groups"]["alpha"]["rate_per_min"] > 0
    st = json.loads(f.fleet("status", str(exp), "--json", check=True, **ENV).stdout)
    recs = [CompletionRecord.model_validate_json(v) for v in f.client.hvals(f.keys.records)]
    fails = [FailureRecord.model_validate_json(v) for v in f.client.hvals(f.keys.failed)]
    by_records = {g: (Counter(r.group for r in recs)[g], Counter(x.group for x in fails)[g]) for g in ("alpha", "beta")}
    assert by_records == {"alpha": (4, 0), "beta": (3, 1)}
    for g, (n_done, n_failed) in by_records.items():
        row = last["groups"][g]
        assert (row["done"], row["failed"]) == (n_done, n_failed) == (st["by_group"][g]["done"], st["by_group"][g]["failed"])
        assert row["total"] == st["by_group"][g]["total"]
    assert (last["done"], last["failed"]) == (st["done"], st["failed"]) == (7, 1)

    # Worker rows named every worker that made a sample, and showed what each was running.
    rows = [w for x in lines for w in x["workers"]]
    assert {r.worker for r in recs} <= {w["name"] for w in rows}
    busy = [w for w in rows if w["sample_id"]]
    assert busy and all(w["label"].startswith("touch ") and w["running_s"] >= 0 for w in busy)
    assert all(w["gpus"] == [] and w["util_pct"] is None and w["mem_used_mib"] is None for w in rows)  # CPU workers
    # done / failed per worker are its heartbeat entry's (they lag a beat): never more than it made
    made = Counter(r.worker for r in recs)
    assert any(w["done"] for w in rows) and all(w["done"] <= made[w["name"]] for w in rows)

    # Without an experiment: the whole namespace, as `fleet status` counts it.
    r = f.fleet("watch", "--json", "--count", "1", check=True, **ENV)
    whole = json.loads(r.stdout)
    st_all = json.loads(f.fleet("status", "--json", check=True, **ENV).stdout)
    assert {g: (v["done"], v["failed"]) for g, v in whole["groups"].items()} == \
           {g: (v["done"], v["failed"]) for g, v in st_all["by_group"].items()}


def test_the_rich_view_renders_and_ctrl_c_ends_watch_quietly(fleet_ns: Fleet) -> None:
    f = fleet_ns
    exp = touch_experiment(f.tmp, [{"name": "one", "group": "first group"}, {"name": "two", "group": "second"}])
    f.fleet("enqueue", str(exp), "--json", check=True, **ENV)  # no worker: the work never ends by itself

    r = f.fleet("watch", str(exp), "--count", "1", check=True, **ENV)  # stdout is a pipe, not a terminal
    assert "first group" in r.stdout and "second" in r.stdout and "workers" in r.stdout, r.stdout

    watch = watch_proc(f, str(exp), "--json", "--interval-s", "0.2")
    first = json.loads(watch.stdout.readline())
    assert (first["queued"], first["total"]) == (2, 2)
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=30)
    assert watch.returncode == 0 and "Traceback" not in err, err


def test_worker_rows_join_heartbeat_running_entry_and_gpu_series(fleet_ns: Fleet) -> None:
    """In-process on the real Redis: entries as a GPU worker and the GPU telemetry writer leave
    them (this host has no GPU); a worker silent for a few beats is dropped."""
    f = fleet_ns
    now = time.time()
    busy = WorkerEntry(name="gpus0-1@h", hostname="h", pid=1, gpus=(0, 1), queues=["q"], sample_id="s1",
                       group="g", label="g/v1 seed 42", progress=0.25, done=3, failed=1, seen_at=now)
    gone = WorkerEntry(name="gpu2@h", hostname="h", pid=2, gpus=(2,), queues=["q"], seen_at=now - 120)
    f.client.hset(f.keys.workers, mapping={w.name: w.model_dump_json() for w in (busy, gone)})
    f.client.hset(f.keys.running, "s1", RunningEntry(task={"group": "g"}, queue="q", worker=busy.name, token="t",
                                                     started_at=now - 65).model_dump_json())
    for i, (util, mem) in enumerate(((80.0, 1000), (40.0, 3000))):
        gpu_series.write(f.client, f.keys, gpu_series.series_name("h", i),
                         gpu_series.GpuPoint(t=now, util_pct=util, mem_used_mib=mem))

    frame = Watcher(f.client, f.namespace, heartbeat_s=0.5).refresh()
    (row,) = frame["workers"]
    assert {k: row[k] for k in ("name", "gpus", "sample_id", "label", "progress", "done", "failed", "util_pct",
                                "mem_used_mib")} == {
        "name": "gpus0-1@h", "gpus": [0, 1], "sample_id": "s1", "label": "g/v1 seed 42", "progress": 0.25,
        "done": 3, "failed": 1, "util_pct": 60.0, "mem_used_mib": 4000}
    assert 64 <= row["running_s"] < 70
    assert (frame["running"], frame["groups"]["g"]["running"]) == (1, 1)
