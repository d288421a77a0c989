"""The image kind through the real fleet (seed 002's promises): one worker and three make
byte-identical PNGs with the right names and seeds; an interrupted run is finished by a
re-run that makes only what is missing; appended rows enqueue only themselves; bad
input is one line and nothing enqueued."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import yaml

from fleet.contract import CompletionRecord
from tests.integration.conftest import Fleet, wait_for

pytestmark = pytest.mark.integration

ROWS = [(f"{i:06d}", f"prompt {i}, with a comma and \"quotes\"") for i in range(1, 5)] + [("猫 01", "一只猫\n第二行")]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(["image_id", "prompt"])
        w.writerows(rows)


def experiment(root: Path, model: Path, output: str, rows: list[tuple[str, str]] = ROWS, **fields: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "prompts.csv").exists():
        write_csv(root / "prompts.csv", rows)
    doc = {"kind": "image", "name": f"t2i-{output}", "prompts": "prompts.csv", "seed_start": 42, "width": 64, "height": 48,
           "steps": 2, "cfg_scale": 4.0, "cfg_truncation_step": 1, "dtype": "fp32", "model": {"dir": str(model)},
           "output": output, **fields}
    path = root / f"{output}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


def records(f: Fleet) -> dict[str, CompletionRecord]:
    return {k.decode(): CompletionRecord.model_validate_json(v) for k, v in f.client.hgetall(f.keys.records).items()}


def pngs(folder: Path, pattern: str = "*.png") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern)) if p.is_file()}


def test_one_worker_and_three_make_the_same_files(fleet_ns: Fleet, tiny_image_model_dir: Path, tmp_path: Path) -> None:
    one = experiment(tmp_path / "exp", tiny_image_model_dir, "out1")
    three = experiment(tmp_path / "exp", tiny_image_model_dir, "out3")
    w = fleet_ns.start_worker(0)
    assert fleet_ns.enqueue(one)["enqueued"] == 5
    wait_for(lambda: fleet_ns.done_count() == 5, 120, "5 images by one worker")
    fleet_ns.stop(w)
    fleet_ns.start_workers([0, 1, 2])
    assert fleet_ns.enqueue(three)["enqueued"] == 5
    wait_for(lambda: fleet_ns.done_count() == 10, 120, "5 images by three workers")
    a, b = pngs(tmp_path / "exp" / "out1", "*.png"), pngs(tmp_path / "exp" / "out3", "*.png")
    expected = [f"{i}_seed{42 + n}.png" for n, (i, _) in enumerate(ROWS)]
    assert sorted(a) == sorted(expected) and a == b  # names, count and every byte
    assert len(set(a.values())) == 5
    recs = [r for r in records(fleet_ns).values() if "/out3/" in r.output_path]
    assert len({r.worker for r in recs}) >= 2, [r.worker for r in recs]  # the three really shared the work
    assert {Path(r.output_path).name: r.metrics["seed"] for r in recs} == {
        n: 42 + k for k, n in enumerate(expected)}
    # The records outlive Redis: one manifest line per image, with the row's own parameters.
    from workers.manifest import read

    lines = read(tmp_path / "exp" / "out3")
    assert set(lines) == {r.sample_id for r in recs}
    assert sorted((d["params"]["image_id"], d["params"]["seed"]) for d in lines.values()) == sorted(
        (i, 42 + k) for k, (i, _) in enumerate(ROWS))
    assert all(d["worker"] and d["duration_s"] > 0 for d in lines.values())


def test_interrupted_run_is_finished_by_a_rerun_and_new_rows_only_add(fleet_ns: Fleet, tiny_image_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    root = tmp_path / "exp"
    exp = experiment(root, tiny_image_model_dir, "out", steps=24, width=96, height=96)  # slow enough to stop mid-run
    w = fleet_ns.start_worker(0)
    assert fleet_ns.enqueue(exp)["enqueued"] == 5
    wait_for(lambda: fleet_ns.done_count() >= 2, 120, "two images")
    fleet_ns.stop(w, signal.SIGKILL)  # the tmux pane closed
    done = fleet_ns.done_count()
    again = fleet_ns.enqueue(exp)
    assert again["planned"] == 5 and again["done"] == done and again["done"] < 5
    assert again["in_flight"] + again["enqueued"] == 5 - done
    fleet_ns.start_worker(1)
    wait_for(lambda: fleet_ns.done_count() == 5, 240, lambda: f"the rest after the re-run\n{fleet_ns.worker_logs()}")
    assert fleet_ns.enqueue(exp)["enqueued"] == 0
    with open(root / "prompts.csv", "a", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\r\n").writerows([("new1", "a new prompt"), ("new2", "another")])
    res = fleet_ns.enqueue(exp)
    assert (res["planned"], res["done"], res["enqueued"]) == (7, 5, 2)
    wait_for(lambda: fleet_ns.done_count() == 7, 120, "the appended rows")
    names = sorted(pngs(root / "out"))
    assert "new1_seed47.png" in names and "new2_seed48.png" in names and len(names) == 7
    assert not [p for p in (root / "out").iterdir() if p.name.startswith(".") and p.is_file()]  # no temp files left
    assert len((root / "out" / "fleet-manifest.jsonl").read_text().splitlines()) >= 7


@pytest.mark.parametrize("content, fault", [
    ("id,prompt\r\na,b\r\n", "no column 'image_id'"),
    ("image_id,caption\r\na,b\r\n", "no column 'prompt'"),
    ("image_id,prompt\r\na,b\r\nc,\r\n", "line 3: empty prompt"),
    ("image_id,prompt\r\na,b\r\na,c\r\n", "repeats line 2"),
    ("image_id,prompt\r\n../../etc/x,b\r\n", "path separator"),
    ("image_id,prompt\r\na,caf\xe9\r\n", "not UTF-8"),
])
def test_bad_csv_is_one_line_and_nothing_enqueued(fleet_ns: Fleet, tiny_image_model_dir: Path, tmp_path: Path,
                                                  content: str, fault: str) -> None:
    root = tmp_path / "exp"
    root.mkdir()
    (root / "prompts.csv").write_bytes(content.encode("latin-1") if "\xe9" in content else content.encode())
    exp = experiment(root, tiny_image_model_dir, "out")
    r = fleet_ns.fleet("enqueue", str(exp))
    assert r.returncode == 1 and fault in r.stderr and str(root / "prompts.csv") in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(fleet_ns.client.scan_iter(f"{fleet_ns.namespace}*")), "something was enqueued"


@pytest.mark.parametrize("fields, fault", [({"num_samples": 6}, "num_samples: 6 is more than"),
                                           ({"dtype": "fp8"}, "dtype: Input should be")])
def test_bad_experiment_is_one_line_and_nothing_enqueued(fleet_ns: Fleet, tiny_image_model_dir: Path, tmp_path: Path,
                                                         fields: dict, fault: str) -> None:
    exp = experiment(tmp_path / "exp", tiny_image_model_dir, "out", **fields)
    r = fleet_ns.fleet("enqueue", str(exp), "--json")
    assert r.returncode == 1 and fault in r.stderr and str(exp) in r.stderr and not r.stdout, r.stderr
    assert not list(fleet_ns.client.scan_iter(f"{fleet_ns.namespace}*"))


def test_status_counts_the_csv_as_one_group(fleet_ns: Fleet, tiny_image_model_dir: Path, tmp_path: Path) -> None:
    exp = experiment(tmp_path / "exp", tiny_image_model_dir, "out", num_samples=3)
    assert fleet_ns.enqueue(exp)["enqueued"] == 3
    st = json.loads(fleet_ns.fleet("status", str(exp), "--json", check=True).stdout)
    assert st["total"] == 3 and st["queued"] == 3
    assert list(st["by_group"]) == ["prompts.csv"] and st["by_group"]["prompts.csv"]["queued"] == 3, st
