"""Training runs through the real fleet (seed 004): a worker SIGKILLed mid-run and `fleet
down` mid-epoch both end in a run that continues from its checkpoint, without repeating an
epoch in metrics.jsonl."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from fleet.contract import CompletionRecord
from fleet.kinds.train.synthetic_data import CATEGORICAL, LABEL, NUMERIC, write_tabular_data
from tests.integration.conftest import Fleet, wait_for

pytestmark = pytest.mark.integration


def experiment(root: Path, rows: int = 30_000, **fields: object) -> Path:
    write_tabular_data(root / "data", rows=rows, parts=3)
    doc = {"kind": "train", "name": "ctr", "data": "data", "label": LABEL, "categorical": CATEGORICAL,
           "numeric": NUMERIC, "epochs": 4, "batch_size": 192, "lr": 0.003, "num_workers": 0, "use_amp": False,
           "checkpoint_every_s": 0.5, "gpus": 0, "output": "runs", **fields}
    (root / "train.yaml").write_text(yaml.safe_dump(doc))
    return root / "train.yaml"


def epochs(run_dir: Path) -> list[int]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(x)["epoch"] for x in p.read_text().splitlines()] if p.exists() else []


def test_a_killed_worker_s_run_resumes_from_its_checkpoint(fleet_ns: Fleet, tmp_path: Path) -> None:
    exp = experiment(tmp_path / "exp")
    run_dir = tmp_path / "exp" / "runs" / "run"
    w = fleet_ns.start_named_worker("cpu0", "--cpu")
    assert fleet_ns.enqueue(exp)["enqueued"] == 1
    wait_for(lambda: len(epochs(run_dir)) >= 1 and (run_dir / "checkpoint.pt").exists(), 120, "a first epoch")
    fleet_ns.stop(w, signal.SIGKILL)
    fleet_ns.start_named_worker("cpu1", "--cpu", "--slot", "1")  # the reaper gives it the orphaned run
    wait_for(lambda: fleet_ns.done_count() == 1, 240, "the run to finish on the other worker")
    (raw,) = fleet_ns.client.hvals(fleet_ns.keys.records)
    rec = CompletionRecord.model_validate_json(raw)
    assert rec.worker.startswith("cpu1@") and rec.metrics["resumed_from_epoch"] >= 1
    assert epochs(run_dir) == [1, 2, 3, 4]  # none repeated, none lost
    assert rec.metrics["val_auc"] > 0.6


def test_down_mid_epoch_and_up_again_continues_the_run(local_fleet, tmp_path: Path) -> None:
    f = local_fleet
    # enough epochs that `fleet down` (a second or two, more on a loaded host) lands mid-run however
    # fast this host trains: with 14, a clean-clone CI run once finished before the stop reached it
    n = 60
    exp = experiment(tmp_path / "exp", epochs=n)
    run_dir = tmp_path / "exp" / "runs" / "run"
    f.fleet("up", "--cpu-workers", "1", check=True)
    assert f.enqueue(exp)["enqueued"] == 1
    wait_for(lambda: len(epochs(run_dir)) >= 1, 120, "a first epoch")
    f.fleet("down", check=True)  # the worker checkpoints at its next step and gives the run back
    import torch

    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]
    assert 1 <= state["epoch"] < n  # stopped mid-run (a checkpoint at its next step)
    done_before = epochs(run_dir)
    f.fleet("up", "--cpu-workers", "1", check=True)
    wait_for(lambda: f.done_count() == 1, 240, "the run to finish after fleet up")
    assert epochs(run_dir) == list(range(1, n + 1)) and epochs(run_dir)[: len(done_before)] == done_before
    (raw,) = f.client.hvals(f.keys.records)
    rec = CompletionRecord.model_validate_json(raw)
    assert (rec.metrics["resumed_from_epoch"], rec.metrics["resumed_from_batch"]) == (state["epoch"], state["batch"])
