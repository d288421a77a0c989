"""The train kind's job on the CPU with the synthetic data: it learns, a stopped run
checkpoints and resumes without repeating an epoch, and an AMP dtype the device lacks is
refused in one line."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pandas")

from fleet.contract import TaskPayload  # noqa: E402
from fleet.errors import InputError, Preempted  # noqa: E402
from fleet.experiment import load_experiment  # noqa: E402
from fleet.kinds.train.synthetic_data import CATEGORICAL, LABEL, NUMERIC, write_tabular_data  # noqa: E402
from fleet.planner import payloads, plan_experiment  # noqa: E402
from workers.jobs import train as train_job  # noqa: E402
from workers.jobs.base import JobContext  # noqa: E402
from workers.model_cache import ModelCache  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tab") / "data"
    write_tabular_data(d, rows=24_000, parts=3)
    return d


def task_for(tmp: Path, data: Path, **fields: object) -> TaskPayload:
    import yaml

    doc = {"kind": "train", "data": str(data), "label": LABEL, "categorical": CATEGORICAL, "numeric": NUMERIC,
           "epochs": 3, "batch_size": 256, "lr": 0.003, "num_workers": 0, "use_amp": False, "output": "runs",
           **fields}
    (tmp / "t.yaml").write_text(yaml.safe_dump(doc))
    plan = plan_experiment(load_experiment(tmp / "t.yaml"))
    return TaskPayload.model_validate_json(next(p for _, _, p in payloads(plan, plan.samples[:1], lambda s: "q")))


def ctx(stop: threading.Event | None = None, reports: list | None = None) -> JobContext:
    def on_report(progress, metrics) -> None:
        if reports is not None:
            reports.append(progress)

    return JobContext(gpus=(), device="cpu", models=ModelCache(), work_dir=Path("/nonexistent"),
                      stopping=stop or threading.Event(), on_report=on_report)


def epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_learns(tmp_path: Path, data: Path) -> None:
    task = task_for(tmp_path, data, num_workers=2, persistent_workers=True, pin_memory=True, use_amp=True,
                    amp_dtype="bf16")
    out = train_job.run(task, ctx())
    assert out.metrics["val_auc"] > 0.62, out.metrics  # the synthetic signal is learnable
    run_dir = Path(task.output_path).parent
    assert epochs(run_dir) == [1, 2, 3]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss", "val_auc", "val_logloss", "samples_per_s", "gpu_util_pct"} <= set(m) for m in lines)
    assert json.loads(Path(task.output_path).read_text())["final"]["epoch"] == 3


def test_a_stopped_run_resumes_from_its_checkpoint(tmp_path: Path, data: Path) -> None:
    task = task_for(tmp_path, data, epochs=3)
    stop, reports = threading.Event(), []

    def stop_in_epoch_two(progress, metrics) -> None:
        reports.append(progress)
        if progress is not None and progress > 0.5:  # past the middle of epoch 2 of 3
            stop.set()

    c = JobContext(gpus=(), device="cpu", models=ModelCache(), work_dir=tmp_path / "w", stopping=stop,
                   on_report=stop_in_epoch_two)
    with pytest.raises(Preempted, match="checkpoint saved"):
        train_job.run(task, c)
    run_dir = Path(task.output_path).parent
    assert epochs(run_dir) == [1] and not Path(task.output_path).exists()
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ck["state"]["epoch"] == 1 and ck["state"]["batch"] > 0
    out = train_job.run(task, ctx())  # another worker, another attempt
    assert (out.metrics["resumed_from_epoch"], out.metrics["resumed_from_batch"]) == (1, ck["state"]["batch"])
    assert epochs(run_dir) == [1, 2, 3]


def test_fp16_amp_on_a_cpu_worker_is_refused_in_one_line(tmp_path: Path, data: Path) -> None:
    with pytest.raises(InputError) as e:
        train_job.run(task_for(tmp_path, data, use_amp=True, amp_dtype="fp16"), ctx())
    assert "amp_dtype fp16" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_value_in_the_data_names_its_column(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_tabular_data(d, rows=50, parts=1)
    text = (d / "interactions_part1.csv").read_text().splitlines()
    cells = text[5].split(",")
    cells[4] = "n/a"  # duration_s
    text[5] = ",".join(cells)
    (d / "interactions_part1.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match="numeric column 'duration_s'"):
        train_job.run(task_for(tmp_path, d), ctx())
