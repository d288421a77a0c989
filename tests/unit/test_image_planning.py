"""The image kind's producer side (seed 002): the prompts CSV as spreadsheets write it,
seeds = seed_start + row, ids and file names, and every bad input as one line. No Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.errors import InputError
from fleet.experiment import load_experiment
from fleet.kinds.image.prompts_csv import read_prompts_csv
from fleet.planner import plan_experiment

MODEL_JSON = ('{"name": "m", "pipeline": "z-image", "dit": ["dit.safetensors"], "text_encoder": "te.safetensors", '
              '"vae": "vae.safetensors", "tokenizer": "tok", "dtype": "bfloat16"}')


def write_exp(root: Path, csv_bytes: bytes | str, **fields: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "model.json").write_text(MODEL_JSON)
    data = csv_bytes.encode() if isinstance(csv_bytes, str) else csv_bytes
    (root / "prompts.csv").write_bytes(data)
    doc = {"kind": "image", "name": "t2i", "prompts": "prompts.csv", "seed_start": 42, "width": 64, "height": 64,
           "steps": 4, "cfg_scale": 4.0, "model": {"dir": "model"}, "output": "out", **fields}
    import json

    (root / "exp.json").write_text(json.dumps(doc, ensure_ascii=False))
    return root / "exp.json"


def plan(path: Path):
    return plan_experiment(load_experiment(path))


SPREADSHEET = (
    b"\xef\xbb\xbfimage_id,prompt,negative_prompt,notes\r\n"
    b'000001,"a cat, on a ""mat""",,x\r\n'
    b'000002,"line one\r\nline two","blurry, dark",y\r\n'
    b",,,\r\n"
    b"\r\n"
    b"\xe7\x8c\xab,\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab,,z\r\n"
)


def test_spreadsheet_csv_reads_as_written(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_bytes(SPREADSHEET)
    rows = read_prompts_csv(tmp_path / "p.csv")
    assert [(r.index, r.image_id, r.prompt, r.negative_prompt) for r in rows] == [
        (0, "000001", 'a cat, on a "mat"', None),
        (1, "000002", "line one\r\nline two", "blurry, dark"),
        (2, "猫", "一只猫", None),
    ]
    assert [r.line for r in rows] == [2, 3, 7]  # where each row starts, for messages


def test_lf_without_bom_gives_the_same_plan(tmp_path: Path) -> None:
    crlf = plan(write_exp(tmp_path, SPREADSHEET))
    lf = plan(write_exp(tmp_path, SPREADSHEET[3:].replace(b"\r\n", b"\n").replace(b"one\nline", b"one\r\nline")))
    assert [s.sample_id for s in crlf.samples] == [s.sample_id for s in lf.samples]


def test_seeds_names_and_bodies(tmp_path: Path) -> None:
    p = plan(write_exp(tmp_path, SPREADSHEET, negative_prompt="low quality"))
    out = tmp_path / "out"
    assert [s.output_path for s in p.samples] == [
        str(out / "000001_seed42.png"), str(out / "000002_seed43.png"), str(out / "猫_seed44.png")]
    assert [s.body["seed"] for s in p.samples] == [42, 43, 44]
    assert [s.body["negative_prompt"] for s in p.samples] == ["low quality", "blurry, dark", "low quality"]
    assert {s.group for s in p.samples} == {"prompts.csv"}
    assert p.shared["dtype"] == "bf16"  # the model's dtype when the experiment names none
    assert len({s.sample_id for s in p.samples}) == 3


def test_num_samples_takes_the_first_rows(tmp_path: Path) -> None:
    p = plan(write_exp(tmp_path, SPREADSHEET, num_samples=2))
    assert [s.body["image_id"] for s in p.samples] == ["000001", "000002"]


def test_appended_rows_keep_every_earlier_id(tmp_path: Path) -> None:
    before = plan(write_exp(tmp_path, SPREADSHEET))
    after = plan(write_exp(tmp_path, SPREADSHEET + b'000009,"a new prompt"\r\n'))
    assert [s.sample_id for s in after.samples[:3]] == [s.sample_id for s in before.samples]
    assert after.samples[3].body["seed"] == 45


def test_ids_follow_what_decides_the_image(tmp_path: Path) -> None:
    base = {s.sample_id for s in plan(write_exp(tmp_path, SPREADSHEET)).samples}
    assert base == {s.sample_id for s in plan(write_exp(tmp_path, SPREADSHEET)).samples}
    for change in ({"seed_start": 43}, {"steps": 5}, {"cfg_scale": 3.0}, {"dtype": "fp32"}, {"width": 80},
                   {"cfg_truncation_step": 2}, {"output": "elsewhere"}):
        ids = {s.sample_id for s in plan(write_exp(tmp_path, SPREADSHEET, **change)).samples}
        assert not ids & base, change
    # A truncation at or past the last step changes no image, so no id either.
    assert base == {s.sample_id for s in plan(write_exp(tmp_path, SPREADSHEET, cfg_truncation_step=4)).samples}


@pytest.mark.parametrize("csv_bytes, fault", [
    (b"id,prompt\n1,a\n", "no column 'image_id'"),
    (b"image_id,text\n1,a\n", "no column 'prompt'"),
    (b"image_id,prompt\n1,\n", "line 2: empty prompt"),
    (b'image_id,prompt\n1,"  "\n', "line 2: empty prompt"),
    (b"image_id,prompt\n1,a\n2,b\n1,c\n", "line 4: image_id '1' repeats line 2"),
    (b"image_id,prompt\n,a\n", "line 2: empty image_id"),
    (b"image_id,prompt\na/b,a\n", "path separator"),
    (b"image_id,prompt\na\\b,a\n", "path separator"),
    (b"image_id,prompt\n..,a\n", "starts with a dot"),
    (b"image_id,prompt\n\"a\tb\",a\n", "control character U+0009"),
    (b"image_id,prompt\n1,a,b\n", "3 fields but the header has 2"),
    (b"image_id,prompt\n1,\"open\n", "malformed CSV"),
    (b"image_id,prompt\n1,caf\xe9\n", "line 2: not UTF-8"),
    (b"\xef\xbb\xbfimage_id,prompt\n\xe9,a\n", "line 2: not UTF-8 (byte 0xe9)"),  # counted after the BOM
    (b"", "empty prompts CSV"),
    (b"image_id,prompt\r\n,\r\n", "no prompt rows after the header"),
    (b"image_id,prompt,prompt\n1,a,b\n", "column 'prompt' appears 2 times"),
])
def test_bad_csv_is_one_line_naming_file_and_fault(tmp_path: Path, csv_bytes: bytes, fault: str) -> None:
    with pytest.raises(InputError) as e:
        plan(write_exp(tmp_path, csv_bytes))
    msg = str(e.value)
    assert fault in msg and str(tmp_path / "prompts.csv") in msg and "\n" not in msg, msg


@pytest.mark.parametrize("fields, fault", [
    ({"num_samples": 4}, "num_samples: 4 is more than the rows"),
    ({"dtype": "int8"}, "dtype: Input should be 'bf16', 'fp16' or 'fp32'"),
    ({"width": 100}, "width: must be a multiple of 16"),
    ({"seed_start": -1}, "seed_start"),
    ({"seed_start": 2**64 - 2}, "passes 2**64-1"),
    ({"steps": 0}, "steps"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"prompts": "missing.csv"}, "prompts CSV not found"),
])
def test_bad_experiment_is_one_line(tmp_path: Path, fields: dict, fault: str) -> None:
    with pytest.raises(InputError) as e:
        plan(write_exp(tmp_path, SPREADSHEET, **fields))
    assert fault in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_video_model_is_refused_for_images(tmp_path: Path) -> None:
    exp = write_exp(tmp_path, SPREADSHEET)
    (tmp_path / "model" / "model.json").write_text(MODEL_JSON.replace('"pipeline": "z-image", ', ""))
    with pytest.raises(InputError, match="names no pipeline"):
        load_experiment(exp)
