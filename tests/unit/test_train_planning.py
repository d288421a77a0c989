"""The train kind's producer side (seed 004): sharded tables, the grid, and bad configurations."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fleet.errors import InputError
from fleet.experiment import load_experiment
from fleet.kinds.train.synthetic_data import CATEGORICAL, LABEL, NUMERIC, write_tabular_data
from fleet.planner import plan_experiment


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tab") / "data"
    write_tabular_data(d, rows=1200, parts=12)  # part10..part12 must come after part2
    return d


def exp(tmp: Path, folder: Path, **fields: object) -> Path:
    doc = {"kind": "train", "name": "ctr", "data": str(folder), "label": LABEL, "categorical": CATEGORICAL,
           "numeric": NUMERIC, "epochs": 2, **fields}
    p = tmp / "train.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def test_shards_are_one_table_in_part_order(tmp_path: Path, data: Path) -> None:
    e = load_experiment(exp(tmp_path, data))
    assert [p.name for p in e.table.shards] == [f"interactions_part{i}.csv" for i in range(1, 13)]
    assert e.table.name == "interactions" and LABEL in e.table.columns


def test_grid_expands_to_one_named_run_per_combination(tmp_path: Path, data: Path) -> None:
    plan = plan_experiment(load_experiment(exp(tmp_path, data, lr=0.01, grid={"lr": [0.001, 0.01],
                                                                              "hidden": [[64], [128, 64]],
                                                                              "use_amp": [False]})))
    assert [s.body["run"] for s in plan.samples] == [
        "lr=0.001_hidden=64_use_amp=false", "lr=0.001_hidden=128x64_use_amp=false",
        "lr=0.01_hidden=64_use_amp=false", "lr=0.01_hidden=128x64_use_amp=false"]
    assert [s.body["settings"]["lr"] for s in plan.samples] == [0.001, 0.001, 0.01, 0.01]
    assert plan.samples[1].body["settings"]["hidden"] == [128, 64] and plan.samples[0].body["settings"]["epochs"] == 2
    assert all(s.output_path.endswith(f"{s.body['run']}/result.json") for s in plan.samples)
    assert len({s.sample_id for s in plan.samples}) == 4
    assert [s.sample_id for s in plan_experiment(load_experiment(exp(tmp_path, data))).samples] != []
    single = plan_experiment(load_experiment(exp(tmp_path, data)))
    assert [s.body["run"] for s in single.samples] == ["run"]


@pytest.mark.parametrize("fields, fault", [
    ({"categorical": ["user_id", "colour"]}, "categorical: no column 'colour' in table 'interactions'"),
    ({"label": "clicked"}, "label: no column 'clicked'"),
    ({"grid": {"learning_rate": [0.1]}}, "grid.learning_rate: not a run setting"),
    ({"grid": {"batch_size": [64, -1]}}, "grid run batch_size=-1: batch_size"),
    ({"amp_dtype": "fp8"}, "amp_dtype: Input should be 'bf16' or 'fp16'"),
    ({"numeric": ["hour", "tab"], "categorical": ["tab"]}, "column 'tab' is given twice"),
    ({"epochs": 0}, "epochs"),
    ({"data": "nowhere"}, "data: folder"),
    ({"optimizer": "sgd"}, "optimizer: Extra inputs are not permitted"),
])
def test_bad_configuration_is_one_line(tmp_path: Path, data: Path, fields: dict, fault: str) -> None:
    with pytest.raises(InputError) as e:
        load_experiment(exp(tmp_path, data, **fields))
    assert fault in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_shards_must_agree(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_tabular_data(d, rows=40, parts=2)
    (d / "interactions_part2.csv").write_text("user_id,video_id\n1,2\n")
    with pytest.raises(InputError, match="header differs"):
        load_experiment(exp(tmp_path, d))
    (d / "interactions.csv").write_text("a\n")
    with pytest.raises(InputError, match="both interactions.csv and interactions_part1.csv"):
        load_experiment(exp(tmp_path, d))
