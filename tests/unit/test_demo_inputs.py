"""What `fleet demo image` builds plans as promised: a spreadsheet-style CSV (BOM, CRLF, a
quoted comma, quotes and a line break, a Chinese id) read back row for row."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffsynth")

from fleet.demo import IMAGE_ROWS, build_demo  # noqa: E402
from fleet.experiment import load_experiment  # noqa: E402
from fleet.kinds.base import PlanContext  # noqa: E402
from fleet.planner import check_inputs, plan_experiment  # noqa: E402


def test_image_demo_plans_one_sample_per_row(tmp_path: Path, tiny_image_model_dir: Path) -> None:
    shutil.copytree(tiny_image_model_dir, tmp_path / "demo" / "model")  # the build the demo would make
    exp_path = build_demo(tmp_path / "demo", "image")
    raw = (tmp_path / "demo" / "prompts.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # as a spreadsheet saves it
    exp = load_experiment(exp_path)
    plan = plan_experiment(exp)
    check_inputs(plan, plan.samples, PlanContext())  # the model's files are all there
    assert [(s.body["image_id"], s.body["prompt"]) for s in plan.samples] == IMAGE_ROWS
    assert [Path(s.output_path).name for s in plan.samples] == [
        f"{i}_seed{42 + n}.png" for n, (i, _) in enumerate(IMAGE_ROWS)]
    assert build_demo(tmp_path / "demo", "image") == exp_path  # a second build keeps what is there
