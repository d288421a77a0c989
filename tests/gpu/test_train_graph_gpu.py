"""The training step replayed from a CUDA graph (workers/train_step.py), on the device: it
learns as the eager step does, and a run stopped mid-epoch resumes in graph mode, also from
an eager run's checkpoint (whose optimiser was not capturable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.errors import Preempted
from fleet.kinds.train.experiment import RunSettings
from fleet.kinds.train.synthetic_data import CATEGORICAL, LABEL, NUMERIC, write_tabular_data

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _settings(**change: Any) -> dict[str, Any]:
    base = {"epochs": 2, "batch_size": 1024, "lr": 0.003, "num_workers": 0, "use_amp": True, "amp_dtype": "bf16",
            "data_on_gpu": True, "embedding_dim": 16, "hidden": [256, 128], "checkpoint_every_s": 600.0}
    return RunSettings(**{**base, **change}).model_dump()


def _train(table, run_dir: Path, settings: dict[str, Any], stop_after_steps: int | None = None) -> dict[str, Any]:
    from workers.tabular_trainer import TrainContext, train

    calls = {"n": 0}

    def stopping() -> bool:
        calls["n"] += 1
        return stop_after_steps is not None and calls["n"] >= stop_after_steps

    run_dir.mkdir(parents=True, exist_ok=True)
    tc = TrainContext(device="cuda", run_dir=run_dir, sample_id="s1", stopping=stopping,
                      report=lambda progress, m: None, telemetry=lambda: {})
    return train(table, settings, tc)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory):
    from workers.tabular_trainer import load_table

    root = tmp_path_factory.mktemp("tab")
    write_tabular_data(root, rows=60_000, parts=2)
    return load_table(sorted(str(p) for p in root.glob("*.csv")), LABEL, CATEGORICAL, NUMERIC)


def test_graphed_steps_learn_like_eager_ones(table, tmp_path: Path) -> None:
    graphed = _train(table, tmp_path / "g", _settings())
    eager = _train(table, tmp_path / "e", _settings(cuda_graph=False))
    assert graphed["step_mode"] == "cuda_graph" and eager["step_mode"] == "eager"
    assert graphed["val_auc"] > 0.6 and eager["val_auc"] > 0.6
    # the same kernels in the same order: the losses agree up to bf16 reduction order
    assert abs(graphed["loss"] - eager["loss"]) < 0.01 * eager["loss"]
    fp16 = _train(table, tmp_path / "h", _settings(amp_dtype="fp16", epochs=1))
    assert fp16["step_mode"] == "eager"  # the gradient scaler steps on the host


def test_a_stopped_run_resumes_in_graph_mode_from_an_eager_checkpoint(table, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    with pytest.raises(Preempted):
        _train(table, run_dir, _settings(cuda_graph=False, epochs=3), stop_after_steps=70)  # mid-epoch 2
    with pytest.raises(Preempted):
        _train(table, run_dir, _settings(epochs=3), stop_after_steps=20)  # graphed, stopped again
    final = _train(table, run_dir, _settings(epochs=3))
    assert final["step_mode"] == "cuda_graph" and final["resumed_from_epoch"] >= 1
    epochs = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert final["val_auc"] > 0.6
