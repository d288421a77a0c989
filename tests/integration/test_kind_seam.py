"""The proof of the kinds seam: a kind defined only in tests/ (tests/kinds/touch.py) runs end
to end through the real `fleet up`, `fleet enqueue`, workers, a retry after its worker is
SIGKILLed mid-sample, and `fleet status`, with no change to any core module."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from fleet.contract import CompletionRecord, WorkerEntry
from tests.integration.conftest import LocalFleet, wait_for

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
TOUCH = json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}})


def test_a_kind_defined_in_the_tests_runs_through_the_whole_fleet(local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    env = {"FLEET_KINDS": TOUCH, "PYTHONPATH": REPO}
    exp = tmp_path / "touch exp" / "experiment.yaml"
    exp.parent.mkdir()
    exp.write_text(yaml.safe_dump({"kind": "touch", "name": "seam", "output": "out", "items": [
        {"name": "slow one", "text": "killed once", "sleep_s": 60},
        {"name": "a", "text": "alpha"},
        {"name": "b", "text": "βeta"},
    ]}, allow_unicode=True), encoding="utf-8")

    # Without the kind in the settings, the producer refuses it in one line naming the known kinds.
    r = f.fleet("enqueue", str(exp))
    assert r.returncode == 1 and "kind: must be one of commands, image, train, video, got 'touch'" in r.stderr

    f.fleet("up", "--cpu-workers", "1", check=True, **env)
    res = json.loads(f.fleet("enqueue", str(exp), "--json", check=True, **env).stdout)
    assert res == {"planned": 3, "done": 0, "in_flight": 0, "enqueued": 3}

    # The slow sample is first in the queue: wait until the worker runs it, then SIGKILL the worker.
    def running_slow() -> WorkerEntry | None:
        for raw in f.client.hvals(f.keys.workers):
            w = WorkerEntry.model_validate_json(raw)
            if w.label == "touch slow one":
                return w
        return None

    victim = wait_for(running_slow, 60, "the worker running the slow sample")
    assert victim.gpus == () and victim.group == "items"
    work_marker = exp.parent / "out" / ".fleet-work"
    wait_for(lambda: any(work_marker.rglob("started")), 30, "the slow sample's marker in its work folder")
    os.kill(victim.pid, signal.SIGKILL)

    # The supervisor restarts the worker; the reaper publishes the orphan again; all three finish.
    wait_for(lambda: f.done_count() == 3, 120, "all three samples done after the kill")
    out = exp.parent / "out"
    assert (out / "slow one.txt").read_text() == "hello killed once"
    assert (out / "b.txt").read_text(encoding="utf-8") == "hello βeta"
    recs = {r.label: r for r in (CompletionRecord.model_validate_json(v) for v in f.client.hvals(f.keys.records))}
    assert set(recs) == {"touch slow one", "touch a", "touch b"}
    slow = recs["touch slow one"]
    assert (slow.kind, slow.group, slow.experiment, slow.deliveries) == ("touch", "items", "seam", 2)
    assert slow.metrics["wrote_bytes"] == len("killed once") and slow.metrics["pid"] != victim.pid

    st = json.loads(f.fleet("status", str(exp), "--json", check=True, **env).stdout)
    assert (st["total"], st["done"], st["by_group"]["items"]["done"]) == (3, 3, 3)
    again = json.loads(f.fleet("enqueue", str(exp), "--json", check=True, **env).stdout)
    assert again == {"planned": 3, "done": 3, "in_flight": 0, "enqueued": 0}
