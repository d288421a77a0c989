"""The video kind's job (workers/jobs/video.py) with the tiny Wan model on CPU: loading, t2v,
motion transfer, atomic writes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from fleet.contract import TaskPayload  # noqa: E402
from fleet.errors import GpuOutOfMemory, InputError, ModelLoadError  # noqa: E402
from fleet.kinds.video.spec import ModelSpec  # noqa: E402
from tests.media import read_frames  # noqa: E402
from workers.jobs import video as video_job  # noqa: E402
from workers.jobs.base import JobContext, JobOutcome  # noqa: E402
from workers.model_cache import ModelCache  # noqa: E402
from workers.reference_video import load_frames  # noqa: E402
from workers.tiny_model import spec_from_dir  # noqa: E402
from workers.wan_model import load_pipeline  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def spec(tiny_model_dir: Path) -> ModelSpec:
    return spec_from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    """One cache for the module, as in a worker: the model loads once."""
    return ModelCache()


def make_task(spec: ModelSpec, out: Path, memory_mib: int = 0, **fields: Any) -> TaskPayload:
    params: dict[str, Any] = dict(
        category="cat", video="ref", video_path="",
        prompt="a red balloon 红色气球", prompt_index=0, negative_prompt="blurry", seed=42, mode="t2v",
        denoising_strength=1.0, width=96, height=64, frames=9, fps=15, steps=2, cfg_scale=5.0,
        model=spec.model_dump(),
    )
    params.update(fields)
    return TaskPayload(kind="video", sample_id="s" + out.stem, experiment="exp", group="cat", label="cat/ref",
                       output_path=str(out), output_root=str(out.parent), memory_mib=memory_mib, body=params)


def load(cache: Any, spec: ModelSpec, device: str) -> tuple[Any, bool, float]:
    """The video job's own use of the cache."""
    return cache.get("video", spec.model_dump_json(), device, lambda: load_pipeline(spec, device))


def run_video_sample(task: TaskPayload, cache: Any, device: str) -> JobOutcome:
    ctx = JobContext(gpus=(), device=device, models=cache, work_dir=Path(task.output_root) / ".w",
                     stopping=threading.Event())
    return video_job.run(task, ctx)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp.mp4"))


# ---- model cache --------------------------------------------------------------------------
def test_cache_loads_once_offline(spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # diffsynth's default paths are relative: ./models must not appear
    cache = ModelCache()
    pipe, loaded, load_s = load(cache, spec, "cpu")
    assert loaded and load_s > 0 and cache.resident
    assert pipe.dit is not None and pipe.text_encoder is not None and pipe.vae is not None and pipe.dit2 is None
    again, loaded2, load_s2 = load(cache, spec, "cpu")
    assert again is pipe and not loaded2 and load_s2 == 0.0
    # Another model (here: the same files under another name) replaces the resident one.
    other, loaded3, _ = load(cache, spec.model_copy(update={"name": "wan-tiny-b"}), "cpu")
    assert loaded3 and other is not pipe
    assert not (tmp_path / "models").exists()


def test_cache_missing_file_names_the_path(spec: ModelSpec, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match="nope.safetensors"):
        load(ModelCache(), spec.model_copy(update={"vae": missing}), "cpu")


def test_cache_unrecognised_weights(spec: ModelSpec, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"not.a.wan.layer": torch.zeros(3, 5)}, str(odd))
    with pytest.raises(ModelLoadError, match="unrecognised"):
        load(ModelCache(), spec.model_copy(update={"dit": [str(odd)]}), "cpu")


# ---- samples ------------------------------------------------------------------------------
def test_t2v_sample_writes_requested_video(spec: ModelSpec, cache: ModelCache, tmp_path: Path) -> None:
    out = tmp_path / "cat" / "ref_x_96x64" / "seed_42_prompt_0.mp4"  # parent folders don't exist yet
    result = run_video_sample(make_task(spec, out), cache, "cpu")
    assert isinstance(result, JobOutcome)
    m = result.metrics
    assert (result.output_path, m["frames"], m["width"], m["height"]) == (str(out), 9, 96, 64)
    assert result.model_load_s >= 0.0 and m["generate_s"] > 0 and m["write_s"] > 0
    assert read_frames(out).shape == (9, 64, 96, 3)
    assert leftovers(out.parent) == []


def test_motion_sample_loops_a_short_reference(spec: ModelSpec, cache: ModelCache, tmp_path: Path, make_video) -> None:
    ref = make_video(tmp_path / "ref.mp4", 5, 80, 48)  # 5 frames at another size, 9 needed
    frames = load_frames(ref, 96, 64, 9)
    assert len(frames) == 9 and all(f.size == (96, 64) and f.mode == "RGB" for f in frames)
    assert np.array_equal(np.asarray(frames[5]), np.asarray(frames[0]))  # frame 5 loops to frame 0
    out = tmp_path / "motion.mp4"
    task = make_task(spec, out, mode="motion", video_path=str(ref), denoising_strength=0.7)
    result = run_video_sample(task, cache, "cpu")
    assert result.metrics["frames"] == 9 and read_frames(out).shape == (9, 64, 96, 3)


def test_motion_sample_with_bad_reference_is_input_error(spec: ModelSpec, cache: ModelCache, tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    out = tmp_path / "out.mp4"
    with pytest.raises(InputError, match="bad.mp4: cannot decode video"):
        run_video_sample(make_task(spec, out, mode="motion", video_path=str(bad)), cache, "cpu")
    assert not out.exists() and leftovers(tmp_path) == []


def test_same_seed_gives_identical_video(spec: ModelSpec, cache: ModelCache, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    run_video_sample(make_task(spec, a), cache, "cpu")
    run_video_sample(make_task(spec, b), cache, "cpu")
    run_video_sample(make_task(spec, c, seed=142), cache, "cpu")
    assert np.array_equal(read_frames(a), read_frames(b))
    assert a.read_bytes() == b.read_bytes()  # identical frames encode to identical bytes
    assert not np.array_equal(read_frames(a), read_frames(c))


@pytest.mark.parametrize("fields", [{"width": 72}, {"height": 40}, {"frames": 8}])
def test_invalid_shape_is_refused_before_loading(spec: ModelSpec, tmp_path: Path, fields: dict) -> None:
    cache = ModelCache()
    with pytest.raises(InputError, match="not"):
        run_video_sample(make_task(spec, tmp_path / "x.mp4", **fields), cache, "cpu")
    assert not cache.resident


# ---- failures leave nothing behind --------------------------------------------------------
def test_failing_pipeline_leaves_no_file(
    spec: ModelSpec, cache: ModelCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(params: Any, pipe: Any, defer_decode: bool = False) -> list:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(video_job, "_generate", boom)
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="simulated"):
        run_video_sample(make_task(spec, out), cache, "cpu")
    assert not out.exists() and leftovers(tmp_path) == []


def test_failing_write_leaves_no_file(
    spec: ModelSpec, cache: ModelCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_write(frames: list, path: Path, fps: int) -> None:
        Path(path).write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 1000)  # a partial mp4
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(video_job, "encode_mp4", half_write)
    out = tmp_path / "out.mp4"
    with pytest.raises(OSError, match="disk full"):
        run_video_sample(make_task(spec, out), cache, "cpu")
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_becomes_retryable(
    spec: ModelSpec, cache: ModelCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(params: Any, pipe: Any, defer_decode: bool = False) -> list:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    class ResidentOnGpu:  # pretends the model is resident on a GPU this machine doesn't have
        def get(self, kind: str, identity: str, device: str, loader: Any) -> tuple[Any, bool, float]:
            return cache.get(kind, identity, "cpu", lambda: load_pipeline(spec, "cpu"))[0], False, 0.0

    monkeypatch.setattr(video_job, "_generate", oom)
    out = tmp_path / "out.mp4"
    with pytest.raises(GpuOutOfMemory) as info:
        run_video_sample(make_task(spec, out, memory_mib=30000), ResidentOnGpu(), "cuda:0")  # type: ignore[arg-type]
    assert info.value.retryable
    assert "30000 MiB" in str(info.value) and "cuda:0" in str(info.value)
    assert not out.exists()


def test_a_temp_file_left_by_a_killed_write_is_removed(spec: ModelSpec, cache: ModelCache, tmp_path: Path) -> None:
    out = tmp_path / "seed_42_prompt_0 [x].mp4"  # glob characters in the name must not matter
    (tmp_path / f".{out.name}.dead0001.tmp.mp4").write_bytes(b"half an mp4")
    other = tmp_path / ".seed_42_prompt_1.mp4.dead0002.tmp.mp4"  # another sample's: left alone
    other.write_bytes(b"not ours")
    run_video_sample(make_task(spec, out), cache, "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, other.name])


# ---- overlapped finish, text cache, stages -------------------------------------------------
STAGES = {f"stage_{s}_s" for s in ("text", "inputs", "denoise", "vae", "convert", "encode", "write")}


def test_overlapped_finish_gives_the_sequential_files(spec: ModelSpec, cache: ModelCache, tmp_path: Path) -> None:
    """Each sample's finish (mp4 encoding, atomic write) runs in a thread while the next sample
    computes, as the runner's finisher runs it, with the text cache on; the files are the
    sequential, uncached path's, byte for byte."""
    samples = [("a red balloon", 42), ("a red balloon", 142), ("一只猫", 42)]
    progress: list[float] = []
    ctx = JobContext(gpus=(), device="cpu", models=cache, work_dir=tmp_path / ".w", stopping=threading.Event(),
                     defer_finish=True, text_cache_entries=8, on_report=lambda p, m: progress.append(p))
    pending: threading.Thread | None = None
    outcomes = []
    for i, (prompt, seed) in enumerate(samples):
        out = video_job.run(make_task(spec, tmp_path / "overlap" / f"{i}.mp4", prompt=prompt, seed=seed), ctx)
        assert out.finish is not None and not Path(out.output_path).exists()
        if pending is not None:
            pending.join()
        extra: dict = {}
        pending = threading.Thread(target=lambda o=out, e=extra: e.update(o.finish()))
        pending.start()  # encodes while the next sample computes
        outcomes.append((out, extra))
    assert pending is not None
    pending.join()
    for i, (prompt, seed) in enumerate(samples):
        run_video_sample(make_task(spec, tmp_path / "seq" / f"{i}.mp4", prompt=prompt, seed=seed), cache, "cpu")
        assert (tmp_path / "overlap" / f"{i}.mp4").read_bytes() == (tmp_path / "seq" / f"{i}.mp4").read_bytes(), i
    counts = [(o.metrics.get("text_encodes_count", 0), o.metrics.get("text_cache_hits_count", 0)) for o, _ in outcomes]
    assert counts == [(2, 0), (0, 2), (1, 1)]  # prompt and negative prompt; both cached; a new prompt
    for out, extra in outcomes:
        assert STAGES <= set(out.metrics) | set(extra) and all(v >= 0 for k, v in out.metrics.items() if "stage" in k)
    assert progress[-1] == 1.0 and progress.count(1.0) == len(samples)  # every denoising step reported


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frames_from_vae_are_diffsynths_frames(spec: ModelSpec, cache: ModelCache, dtype: str) -> None:
    pipe, _, _ = load(cache, spec, "cpu")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 3, 5, 16, 24, generator=g) * 1.3).to(getattr(torch, dtype))  # some values beyond [-1, 1]
    theirs = np.stack([np.asarray(im) for im in pipe.vae_output_to_video(x)])
    ours = video_job.frames_from_vae(x)
    assert ours.dtype == np.uint8 and ours.flags["C_CONTIGUOUS"] and np.array_equal(ours, theirs)


def test_reference_frames_are_decoded_once_per_file_version(tmp_path: Path, make_video,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import OrderedDict

    from workers import reference_video

    decoded: list[tuple] = []
    real = reference_video.decode_frames
    monkeypatch.setattr(reference_video, "decode_frames", lambda *a: decoded.append(a) or real(*a))
    monkeypatch.setattr(reference_video, "_kept", OrderedDict())
    ref = make_video(tmp_path / "ref.mp4", 5, 80, 48)
    a, b = load_frames(ref, 96, 64, 9), load_frames(ref, 96, 64, 9)
    assert len(decoded) == 1 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    load_frames(ref, 64, 64, 9)  # another size: decoded for it
    assert len(decoded) == 2
    make_video(ref, 6, 80, 48, seed=7)  # the file changes: decoded again
    c = load_frames(ref, 96, 64, 9)
    assert len(decoded) == 3 and not np.array_equal(np.asarray(c[0]), np.asarray(a[0]))
