"""The image kind's job (workers/jobs/image.py) with the tiny Z-Image model on CPU: the file
is what the bare pipeline makes for the row's seed, CFG truncation, dtypes, atomic writes,
one resident model per worker across kinds."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from fleet.contract import TaskPayload  # noqa: E402
from fleet.errors import InputError  # noqa: E402
from fleet.kinds.image.spec import ImageModelSpec  # noqa: E402
from workers.jobs import image as image_job  # noqa: E402
from workers.jobs.base import JobContext, JobOutcome  # noqa: E402
from workers.model_cache import ModelCache  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def spec(tiny_image_model_dir: Path) -> ImageModelSpec:
    d = tiny_image_model_dir
    desc = json.loads((d / "model.json").read_text())
    return ImageModelSpec(name=desc["name"], pipeline=desc["pipeline"], dit=[str(d / f) for f in desc["dit"]],
                          text_encoder=str(d / desc["text_encoder"]), vae=str(d / desc["vae"]),
                          tokenizer=str(d / desc["tokenizer"]), dtype=desc["dtype"],
                          architectures=desc["architectures"])


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache()


def make_task(spec: ImageModelSpec, out: Path, **fields: Any) -> TaskPayload:
    params: dict[str, Any] = dict(image_id=out.stem, prompt='a cat, on a "mat" 一只猫', negative_prompt="blurry",
                                  seed=42, row=0, width=64, height=48, steps=3, cfg_scale=4.0,
                                  cfg_truncation_step=None, dtype="fp32", model=spec.model_dump())
    params.update(fields)
    return TaskPayload(kind="image", sample_id="s" + out.stem, experiment="exp", group="prompts.csv",
                       label=out.stem, output_path=str(out), output_root=str(out.parent), body=params)


def run(task: TaskPayload, cache: ModelCache) -> JobOutcome:
    ctx = JobContext(gpus=(), device="cpu", models=cache, work_dir=Path(task.output_root) / ".w",
                     stopping=threading.Event())
    return image_job.run(task, ctx)


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_image_is_the_bare_pipelines_for_the_seed(spec: ImageModelSpec, cache: ModelCache, tmp_path: Path) -> None:
    from workers.image_model import load_image_pipeline

    out = run(make_task(spec, tmp_path / "a_seed42.png"), cache)
    assert out.output_path == str(tmp_path / "a_seed42.png") and out.metrics["seed"] == 42
    got = pixels(tmp_path / "a_seed42.png")
    assert got.shape == (48, 64, 3) and got.std() > 1  # an image, not a flat fill
    pipe = load_image_pipeline(spec, "fp32", "cpu")  # a fresh pipeline, as seed 002's loop would have
    bare = pipe(prompt='a cat, on a "mat" 一只猫', negative_prompt="blurry", cfg_scale=4.0, height=48, width=64,
                seed=42, num_inference_steps=3, progress_bar_cmd=lambda x: x)
    assert np.array_equal(np.asarray(bare.convert("RGB")), got)
    # Another seed, another image; the same seed again, the same bytes.
    run(make_task(spec, tmp_path / "a_seed43.png", seed=43), cache)
    assert not np.array_equal(pixels(tmp_path / "a_seed43.png"), got)
    run(make_task(spec, tmp_path / "again.png"), cache)
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "a_seed42.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_seed42.png", "a_seed43.png", "again.png"]


def test_cfg_truncation_changes_the_image_only_below_steps(spec: ImageModelSpec, cache: ModelCache,
                                                            tmp_path: Path) -> None:
    variants = {"none": None, "t1": 1, "t0": 0, "t3": 3, "t9": 9}  # steps = 3
    img = {}
    for name, t in variants.items():
        run(make_task(spec, tmp_path / f"{name}.png", cfg_truncation_step=t), cache)
        img[name] = pixels(tmp_path / f"{name}.png")
    assert not np.array_equal(img["t1"], img["none"])
    assert not np.array_equal(img["t0"], img["none"]) and not np.array_equal(img["t0"], img["t1"])
    assert np.array_equal(img["t3"], img["none"]) and np.array_equal(img["t9"], img["none"])
    # Truncation at step 0 is no CFG at all: the image of cfg_scale 1.
    run(make_task(spec, tmp_path / "cfg1.png", cfg_scale=1.0), cache)
    assert np.array_equal(pixels(tmp_path / "cfg1.png"), img["t0"])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_dtypes_run(spec: ImageModelSpec, tmp_path: Path, dtype: str) -> None:
    out = tmp_path / f"{dtype}.png"
    run(make_task(spec, out, dtype=dtype, steps=1), ModelCache())
    assert pixels(out).shape == (48, 64, 3)


def test_bad_size_fails_the_sample_before_writing(spec: ImageModelSpec, cache: ModelCache, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a multiple of 16"):
        run(make_task(spec, tmp_path / "x.png", width=72), cache)
    assert list(tmp_path.iterdir()) == []


def test_failing_write_leaves_no_file(spec: ImageModelSpec, cache: ModelCache, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(image: Any, path: Path) -> None:
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(image_job, "write_png", half_write)
    with pytest.raises(OSError, match="disk full"):
        run(make_task(spec, tmp_path / "x.png"), cache)
    assert list(tmp_path.iterdir()) == []


def test_one_resident_model_across_kinds(spec: ImageModelSpec, tiny_model_dir: Path, tmp_path: Path) -> None:
    from workers.jobs import video as video_job
    from workers.tiny_model import spec_from_dir

    cache = ModelCache()
    run(make_task(spec, tmp_path / "i.png"), cache)
    assert cache.resident is not None and cache.resident[0] == "image"
    video = TaskPayload(kind="video", sample_id="v", experiment="e", group="g", label="v",
                        output_path=str(tmp_path / "v.mp4"), output_root=str(tmp_path), body=dict(
                            category="c", video="v", video_path="", prompt="p", prompt_index=0, seed=1, mode="t2v",
                            denoising_strength=1.0, width=64, height=64, frames=5, fps=8, steps=1, cfg_scale=1.0,
                            model=spec_from_dir(tiny_model_dir).model_dump()))
    video_job.run(video, JobContext(gpus=(), device="cpu", models=cache, work_dir=tmp_path / ".w",
                                    stopping=threading.Event()))
    assert cache.resident[0] == "video"  # the image pipeline was dropped for it
    out = run(make_task(spec, tmp_path / "i2.png"), cache)
    assert out.model_loaded and cache.resident[0] == "image"
    assert (tmp_path / "i2.png").read_bytes() == (tmp_path / "i.png").read_bytes()


def test_overlapped_finish_gives_the_sequential_files(spec: ImageModelSpec, cache: ModelCache, tmp_path: Path) -> None:
    """Each PNG is encoded and written in a thread while the next image computes (as the
    runner's finisher does it), with the text cache on: the same bytes as the sequential,
    uncached path; the stages are in the metrics."""
    rows = [("a cat", 42), ("a cat", 43), ("a dog", 44)]
    ctx = JobContext(gpus=(), device="cpu", models=cache, work_dir=tmp_path / ".w", stopping=threading.Event(),
                     defer_finish=True, text_cache_entries=8)
    pending: threading.Thread | None = None
    outcomes = []
    for i, (prompt, seed) in enumerate(rows):
        out = image_job.run(make_task(spec, tmp_path / "overlap" / f"{i}.png", prompt=prompt, seed=seed), ctx)
        assert out.finish is not None and not Path(out.output_path).exists()
        if pending is not None:
            pending.join()
        extra: dict = {}
        pending = threading.Thread(target=lambda o=out, e=extra: e.update(o.finish()))
        pending.start()
        outcomes.append((out, extra))
    assert pending is not None
    pending.join()
    for i, (prompt, seed) in enumerate(rows):
        run(make_task(spec, tmp_path / "seq" / f"{i}.png", prompt=prompt, seed=seed), cache)
        assert (tmp_path / "overlap" / f"{i}.png").read_bytes() == (tmp_path / "seq" / f"{i}.png").read_bytes(), i
    counts = [(o.metrics.get("text_encodes_count", 0), o.metrics.get("text_cache_hits_count", 0)) for o, _ in outcomes]
    assert counts == [(2, 0), (0, 2), (1, 1)]
    stages = {f"stage_{s}_s" for s in ("text", "inputs", "denoise", "vae", "encode", "write")}
    assert all(stages <= set(o.metrics) | set(e) for o, e in outcomes)
