"""A kind that plans as columns (fleet.kinds.base.Columns): enqueue, status and re-runs read
ids, groups and output paths and make ``Sample`` objects only for what they publish, with
the same results as a plan of samples; a real worker runs what was published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import yaml

from fleet.enqueue import enqueue
from fleet.experiment import load_experiment
from fleet.kinds import KindModules
from fleet.kinds.base import Columns, Plan, Sample
from fleet.status import experiment_status
from tests.integration.conftest import Fleet, wait_for
from tests.kinds import touch

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
KINDS = {"touch": KindModules(planner="tests.kinds.touch", job="tests.kinds.touch")}
KIND_ENV = {"FLEET_KINDS": json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}}),
            "PYTHONPATH": REPO}


def write_exp(root: Path, name: str, items: list[dict], columns: bool) -> Path:
    path = root / name / "experiment yaml.yaml"  # a space in the name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"kind": "touch", "name": name, "output": "out", "columns": columns,
                                    "items": items}), encoding="utf-8")
    return path


def test_a_plan_has_samples_or_columns_and_reads_the_same() -> None:
    samples = [Sample(f"id{i}", "g" if i < 2 else "h", f"l{i}", f"/o/{i}", {"i": i}) for i in range(4)]
    by_samples = Plan(object(), samples)  # type: ignore[arg-type]
    asked: list[list[int]] = []

    def make(at):  # noqa: ANN001, ANN202
        asked.append(list(at))
        return [samples[i] for i in at]

    by_columns = Plan(object(), columns=Columns([s.sample_id for s in samples], [s.group for s in samples],  # type: ignore[arg-type]
                                                [s.output_path for s in samples], make))
    for plan in (by_samples, by_columns):
        assert (plan.ids, plan.groups, plan.outputs) == (["id0", "id1", "id2", "id3"], ["g", "g", "h", "h"],
                                                          ["/o/0", "/o/1", "/o/2", "/o/3"])
        assert [s.sample_id for s in plan.at([3, 1])] == ["id3", "id1"] and len(plan) == 4
    assert asked == [[3, 1]]  # the columns were read without a Sample; only at() made any
    assert by_columns.samples == samples and asked[-1] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        Plan(object(), samples, columns=by_columns._columns)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Plan(object())  # type: ignore[arg-type]


def test_columns_plan_enqueues_reruns_and_counts_like_samples(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    client = redis.Redis.from_url(f.url)
    items = [{"name": f"item {i}", "text": f"t{i}", "group": "a" if i % 3 else "b"} for i in range(9)]
    cols = load_experiment(write_exp(tmp_path, "cols", items, True), kinds=KINDS)
    plain = load_experiment(write_exp(tmp_path, "plain", items, False), kinds=KINDS)
    touch.MADE.clear()
    got = enqueue(client, f.namespace, cols, kinds=KINDS).as_dict()
    assert got == {"planned": 9, "done": 0, "in_flight": 0, "enqueued": 9} and touch.MADE == [9]
    assert enqueue(client, f.namespace, plain, kinds=KINDS).as_dict()["enqueued"] == 9  # other outputs, other ids

    touch.MADE.clear()
    st_cols = experiment_status(client, f.namespace, cols, None, KINDS).as_dict()
    st_plain = experiment_status(client, f.namespace, plain, None, KINDS).as_dict()
    assert st_cols == st_plain and st_cols["queued"] == 9 and st_cols["by_group"]["b"]["queued"] == 3
    assert touch.MADE == []  # status made no Sample

    # A real worker makes them; the re-run then publishes nothing and makes no Sample.
    f.start_worker(**KIND_ENV)
    wait_for(lambda: f.done_count() == 18, 90, "18 samples done")
    touch.MADE.clear()
    assert enqueue(client, f.namespace, cols, kinds=KINDS).as_dict() == {
        "planned": 9, "done": 9, "in_flight": 0, "enqueued": 0}
    assert sum(touch.MADE) == 0
    assert experiment_status(client, f.namespace, cols, None, KINDS).as_dict() == \
        experiment_status(client, f.namespace, plain, None, KINDS).as_dict()
    assert (cols.output / "item 4.txt").read_text() == "hello t4"

    # Added items later: only they are made and published.
    more = items + [{"name": "item 9", "text": "t9"}]
    cols2 = load_experiment(write_exp(tmp_path, "cols", more, True), kinds=KINDS)
    touch.MADE.clear()
    assert enqueue(client, f.namespace, cols2, kinds=KINDS).as_dict()["enqueued"] == 1 and touch.MADE == [1]
