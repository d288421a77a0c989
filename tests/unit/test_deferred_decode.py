"""A video sample's VAE decode run by the device's decoder beside the next sample
(workers/deferred_decode.py): the capture, the VAE's lock, draining, and with the tiny Wan
model on CPU the same files as decoding in place."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from fleet.errors import GpuOutOfMemory  # noqa: E402
from fleet.kinds.video.spec import ModelSpec  # noqa: E402
from tests.unit.test_video_job import make_task, run_video_sample  # noqa: E402
from workers import deferred_decode  # noqa: E402
from workers.jobs import video as video_job  # noqa: E402
from workers.jobs.base import JobContext  # noqa: E402
from workers.model_cache import ModelCache  # noqa: E402
from workers.tiny_model import spec_from_dir  # noqa: E402


class FakeVae:
    """decode blocks until ``release`` is set; encode notes that it ran."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.encoded = threading.Event()
        self.decoding = threading.Event()
        self.grad_in_decode: bool | None = None

    def decode(self, latents: Any, device: str = "cpu", tiled: bool = True) -> Any:
        self.grad_in_decode = torch.is_grad_enabled()
        self.decoding.set()
        assert self.release.wait(10)
        return latents * 2

    def encode(self, video: Any, device: str = "cpu") -> Any:
        self.encoded.set()
        return video


class FakePipe:
    def __init__(self) -> None:
        self.vae = FakeVae()


def test_capture_returns_the_decode_to_do_and_plain_calls_decode() -> None:
    pipe = FakePipe()
    assert deferred_decode.install(pipe) and deferred_decode.install(pipe)  # idempotent
    pipe.vae.release.set()
    x = torch.ones(2)
    assert torch.equal(pipe.vae.decode(x, device="cpu"), x * 2)  # outside capturing(): decoded in place
    with deferred_decode.capturing():
        pending = pipe.vae.decode(x, device="cpu", tiled=False)
    assert isinstance(pending, deferred_decode.PendingDecode) and pending.kwargs == {"device": "cpu", "tiled": False}
    frames, stages = deferred_decode.Decoder("cpu").submit(pending, lambda v: v + 1).result(10)
    assert torch.equal(frames, x * 2 + 1) and {"stage_vae_s", "stage_convert_s"} <= set(stages)
    assert pipe.vae.grad_in_decode is False  # the decoder's thread runs without autograd, as the pipeline does


def test_an_encode_waits_for_a_running_decode() -> None:
    """The Wan VAE's clear_cache resets the encoder's caches with the decoder's: a motion
    sample's input-video encoding must not run inside another sample's decode."""
    pipe = FakePipe()
    deferred_decode.install(pipe)
    with deferred_decode.capturing():
        pending = pipe.vae.decode(torch.ones(1))
    future = deferred_decode.Decoder("cpu").submit(pending, lambda v: v)
    encoder = threading.Thread(target=pipe.vae.encode, args=(torch.ones(1),))
    assert pipe.vae.decoding.wait(10)  # the decode holds the VAE once it has begun
    encoder.start()
    assert not pipe.vae.encoded.wait(0.3)  # held back while the decode runs
    pipe.vae.release.set()
    assert pipe.vae.encoded.wait(10)
    encoder.join(10)
    assert future.result(10)[0].item() == 2


def test_drain_waits_for_queued_decodes() -> None:
    pipe = FakePipe()
    deferred_decode.install(pipe)
    with deferred_decode.capturing():
        pending = pipe.vae.decode(torch.ones(1))
    dec = deferred_decode.Decoder("cpu")
    future = dec.submit(pending, lambda v: v)
    dec.drain(timeout_s=0.05)
    assert not future.done()  # still blocked: drain gave up at its timeout
    pipe.vae.release.set()
    dec.drain()
    assert future.done() and future.exception() is None


def test_dropping_a_model_waits_for_its_decode() -> None:
    """A worker that switches models must not free (or load beside) a model whose decode runs."""
    pipe = FakePipe()
    deferred_decode.install(pipe)
    cache = ModelCache()
    cache.get("video", "x", "cpu", lambda: pipe)
    with deferred_decode.capturing():
        pending = pipe.vae.decode(torch.ones(1))
    future = deferred_decode.decoder("cpu").submit(pending, lambda v: v)
    threading.Timer(1.0, pipe.vae.release.set).start()
    cache.clear()  # drains: returns only once the decode (released after 1 s) is done
    assert future.done() and cache.resident is None


# ---- the video job, tiny Wan model on CPU ----------------------------------------------------
@pytest.fixture(scope="module")
def spec(tiny_model_dir: Path) -> ModelSpec:
    return spec_from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache()


def deferring_context(cache: ModelCache, root: Path) -> JobContext:
    return JobContext(gpus=(), device="cpu", models=cache, work_dir=root / ".w", stopping=threading.Event(),
                      defer_finish=True, text_cache_entries=8)


def test_deferred_decodes_give_the_in_place_files(spec: ModelSpec, cache: ModelCache, tmp_path: Path,
                                                  make_video: Any) -> None:
    """t2v and motion samples one after the other, each decoded by the decoder while the next
    one computes (the motion samples encode their reference video meanwhile): the files are
    those of decoding in place, byte for byte; the decode's stages come with the finish."""
    ref = make_video(tmp_path / "ref video.mp4", 9, 96, 64)
    samples: list[dict[str, Any]] = [
        dict(seed=1), dict(mode="motion", video_path=str(ref), denoising_strength=0.7, seed=2),
        dict(mode="motion", video_path=str(ref), denoising_strength=0.5, seed=3), dict(seed=4, prompt="一只猫"),
    ]
    ctx = deferring_context(cache, tmp_path)
    outcomes = [video_job.run(make_task(spec, tmp_path / "deferred" / f"{i}.mp4", **f), ctx)
                for i, f in enumerate(samples)]  # four decodes queued, the first ones running meanwhile
    extras = [o.finish() for o in outcomes if o.finish is not None]
    assert len(extras) == len(samples)
    for i, f in enumerate(samples):
        run_video_sample(make_task(spec, tmp_path / "inplace" / f"{i}.mp4", **f), cache, "cpu")
        assert (tmp_path / "deferred" / f"{i}.mp4").read_bytes() == (tmp_path / "inplace" / f"{i}.mp4").read_bytes(), i
    for out, extra in zip(outcomes, extras, strict=True):
        assert "stage_vae_s" not in out.metrics and "stage_denoise_s" in out.metrics
        assert {"stage_vae_s", "stage_convert_s", "stage_decode_wait_s", "stage_encode_s"} <= set(extra)
        assert (extra["frames"], extra["width"], extra["height"]) == (9, 96, 64)


def test_out_of_memory_in_a_deferred_decode_fails_that_sample(
    spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ModelCache()  # its own pipeline: this one stops deferring
    out = tmp_path / "oom.mp4"
    outcome = video_job.run(make_task(spec, out, memory_mib=123), deferring_context(cache, tmp_path))
    pipe = cache.get("video", spec.model_dump_json(), "cpu", lambda: None)[0]
    wrapping = getattr(pipe.vae, deferred_decode.ATTRIBUTE)
    deferred_decode.decoder("cpu").drain()  # that decode is done; the next one runs out of memory

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    assert outcome.finish is not None
    outcome.finish()
    monkeypatch.setattr(wrapping, "decode", oom)
    second = tmp_path / "oom2.mp4"
    failing = video_job.run(make_task(spec, second, memory_mib=123), deferring_context(cache, tmp_path))
    assert failing.finish is not None
    with pytest.raises(GpuOutOfMemory, match="123 MiB") as info:
        failing.finish()
    assert info.value.retryable and not second.exists() and out.exists()
    # The overlap needs the decode's memory beside the denoising's: after an OOM the worker
    # decodes in place (its retry included).
    monkeypatch.undo()
    third = tmp_path / "after.mp4"
    in_place = video_job.run(make_task(spec, third), deferring_context(cache, tmp_path))
    assert "stage_vae_s" in in_place.metrics and in_place.finish is not None
    assert "stage_decode_wait_s" not in in_place.finish() and third.exists()
