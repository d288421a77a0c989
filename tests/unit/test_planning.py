"""Experiment files, prompts and planning: deterministic ids, set-difference incrementality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fleet.contract import TaskPayload
from fleet.errors import InputError
from fleet.experiment import load_experiment
from fleet.kinds.video.prompts import load_prompts
from fleet.kinds.video.spec import VideoParams
from fleet.planner import payloads, plan_experiment


@pytest.fixture
def exp_dir(tmp_path: Path, make_video) -> Path:
    for cat, names in {"camera motion": ["镜头仰角旋转", "b"], "single": ["x y"]}.items():
        for i, n in enumerate(names):
            make_video(tmp_path / "data" / cat / f"{n}.mp4", frames=3, width=32, height=32, seed=i)
    (tmp_path / "data" / "single" / "notes.txt").write_text("not a video")
    (tmp_path / "prompts.json").write_text(json.dumps({"*": ["p0", "p1"], "b": ["only b"]}))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text(json.dumps(
        {"name": "wan", "dit": ["dit.safetensors"], "text_encoder": "t5.pth", "vae": "vae.pth", "tokenizer": "tok",
         "dtype": "bfloat16", "memory_mib": 30000}))
    write(tmp_path)
    return tmp_path


def write(d: Path, **fields: object) -> Path:
    spec = {"kind": "video", "dataset": "data", "prompts": "prompts.json", "seeds": [42, 142], "width": 64,
            "height": 48, "frames": 9, "model": {"dir": "m"}, "output": "out"}
    spec.update(fields)
    p = d / "exp.yaml"
    p.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return p


def test_plan_shape_paths_and_determinism(exp_dir: Path) -> None:
    exp = load_experiment(exp_dir / "exp.yaml")
    assert exp.model.dit == [str(exp_dir / "m" / "dit.safetensors")] and exp.memory_mib == 30000
    plan = plan_experiment(exp)
    # (2 + 1 + 2 prompts) x 2 seeds
    assert len(plan.samples) == 10
    assert len({s.sample_id for s in plan.samples}) == 10
    assert str(exp_dir / "out" / "camera motion" / "ref_镜头仰角旋转_64x48" / "seed_142_prompt_1.mp4") in {
        s.output_path for s in plan.samples}
    again = plan_experiment(load_experiment(exp_dir / "exp.yaml"))
    assert [s.sample_id for s in again.samples] == [s.sample_id for s in plan.samples]


def test_changed_parameters_change_ids(exp_dir: Path) -> None:
    base = {s.output_path: s.sample_id for s in plan_experiment(load_experiment(write(exp_dir))).samples}
    steps = {s.output_path: s.sample_id for s in plan_experiment(load_experiment(write(exp_dir, steps=10))).samples}
    assert base.keys() == steps.keys() and not set(base.values()) & set(steps.values())
    # A new seed adds samples and keeps the old ids.
    more = {s.sample_id for s in plan_experiment(load_experiment(write(exp_dir, seeds=[42, 142, 7]))).samples}
    assert set(base.values()) < more and len(more) == 15
    # New content in a reference video changes only that video's samples (motion transfer reads it).
    vid = exp_dir / "data" / "single" / "x y.mp4"
    vid.write_bytes(vid.read_bytes() + b"\0")
    changed = {s.output_path: s.sample_id for s in plan_experiment(load_experiment(write(exp_dir))).samples}
    differ = {p for p in base if base[p] != changed[p]}
    assert differ and all("ref_x y_" in p for p in differ)


def test_payloads_validate_as_tasks(exp_dir: Path) -> None:
    plan = plan_experiment(load_experiment(exp_dir / "exp.yaml"))
    out = list(payloads(plan, plan.samples, lambda s: "q"))
    tasks = [TaskPayload.model_validate_json(p) for _, _, p in out]
    assert [t.sample_id for t in tasks] == [s.sample_id for s in plan.samples]
    assert [t.label for t in tasks] == [s.label for s in plan.samples]
    t = tasks[0]
    params = VideoParams.model_validate(t.params)
    assert t.kind == "video" and t.group == plan.samples[0].group and t.output_root == str(exp_dir / "out")
    assert t.memory_mib == 30000 and params.model.dtype == "bfloat16" and Path(params.video_path).is_absolute()
    assert (params.category, params.seed) == (t.group, plan.samples[0].body["seed"])


def test_category_filter(exp_dir: Path) -> None:
    plan = plan_experiment(load_experiment(exp_dir / "exp.yaml"), ["single"])
    assert {s.group for s in plan.samples} == {"single"} and len(plan.samples) == 4
    with pytest.raises(InputError, match="no category folder 'nope'"):
        plan_experiment(load_experiment(exp_dir / "exp.yaml"), ["nope"])


def test_settings_output_dir_is_the_default_output(exp_dir: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load((exp_dir / "exp.yaml").read_text())
    del spec["output"]
    (exp_dir / "noout.yaml").write_text(yaml.safe_dump(spec))
    assert load_experiment(exp_dir / "noout.yaml", tmp_path / "o").output == (tmp_path / "o" / "noout").resolve()
    assert load_experiment(exp_dir / "noout.yaml").output == (exp_dir / "results").resolve()


@pytest.mark.parametrize(
    "content, fault",
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"a": ["x"], "c": {"b": ["y"]}}', "mixes lists and objects"),
        ('{"a": []}', "a: must be a non-empty list"),
        ('{"a": ["ok", 3]}', "a[1]: must be a non-empty string"),
        ('{"a": ["x"', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_bad_prompts(tmp_path: Path, content: str, fault: str) -> None:
    p = tmp_path / "prompts.json"
    p.write_text(content)
    with pytest.raises(InputError) as e:
        load_prompts(p)
    assert str(e.value).startswith(str(p)) and fault in str(e.value)


def test_per_category_prompts(exp_dir: Path) -> None:
    (exp_dir / "prompts.json").write_text(json.dumps(
        {"camera motion": {"*": ["cm"]}, "single": {"x y": ["s0", "s1", "s2"]}}, ensure_ascii=False))
    plan = plan_experiment(load_experiment(exp_dir / "exp.yaml"))
    assert sorted({(s.group, s.body["prompt"]) for s in plan.samples}) == [
        ("camera motion", "cm"), ("single", "s0"), ("single", "s1"), ("single", "s2")]


@pytest.mark.parametrize(
    "fields, fault",
    [
        ({"frames": 10}, "frames: must be 4k+1"),
        ({"seeds": []}, "seeds: List should have at least 1 item"),
        ({"seeds": [1, 1]}, "seeds: seeds repeat"),
        ({"kind": "audio"}, "kind: must be one of commands, image, train, video"),
        ({"model": {"dit": "x"}}, "model: give either dir"),
        ({"mode": "v2v"}, "mode:"),
    ],
)
def test_bad_experiment(exp_dir: Path, fields: dict, fault: str) -> None:
    p = write(exp_dir, **fields)
    with pytest.raises(InputError) as e:
        load_experiment(p)
    assert str(e.value).startswith(str(p)) and fault in str(e.value), str(e.value)
