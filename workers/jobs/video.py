"""The video kind's job: Wan text-to-video or motion transfer, written atomically as an mp4.

Job code only: no Celery here. ``run(task, context)`` reads the task's VideoParams, takes
the resident pipeline from the context's model cache, generates, and writes the file (or
leaves the writing to the runner's finisher: ``JobOutcome.finish``); errors come out as
fleet.errors types (InputError, ModelLoadError, GpuOutOfMemory) or as whatever else went
wrong. Each sample's stages (text, inputs, denoise, vae, convert, encode, write; seconds)
go into its metrics as ``stage_<name>_s``.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from fleet.contract import MetricValue, TaskPayload
from fleet.errors import InputError
from fleet.kinds.video.spec import VideoParams
from workers import deferred_decode, stage_clock, text_embedding_cache
from workers.atomic_output import write_atomically
from workers.jobs.base import JobContext, JobOutcome, finish_now, parse_params, pin_torch_threads
from workers.pipeline_loading import out_of_memory
from workers.reference_video import load_frames
from workers.stage_clock import StageClock
from workers.wan_model import load_pipeline

log = logging.getLogger("fleet.job")

# x264 constant rate factor: 18 is visually lossless for generated video at a few MB per
# 832x480x81 sample. Changing it changes outputs, so it is a constant, not a knob.
VIDEO_CRF = 18
# mbtree off: x264's macroblock-tree rate control made identical frames encode differently
# from one process to the next (seen at 64-pixel heights); a sample must give the same
# file wherever it is made.
X264_OPTIONS = {"crf": str(VIDEO_CRF), "preset": "medium", "x264-params": "mbtree=0"}
SIZE_FACTOR = 16  # Wan2.1's VAE (8x) times the DiT's 2x2 patch: width and height multiples of this
FRAME_FACTOR = 4  # the VAE compresses time 4x after the first frame: frames = 4k + 1


def _check_shape(task: TaskPayload, p: VideoParams, size_factor: int = SIZE_FACTOR,
                 frame_factor: int = FRAME_FACTOR) -> None:
    """Refuse sizes diffsynth would silently round up: the output would not be what was asked."""
    faults = []
    if p.width % size_factor or p.height % size_factor:
        faults.append(f"size {p.width}x{p.height} is not a multiple of {size_factor}")
    if p.frames % frame_factor != 1:
        faults.append(f"frames {p.frames} is not {frame_factor}k+1")
    if faults:
        raise InputError(f"sample {task.sample_id} ({task.output_path}): {'; '.join(faults)}")


def _generate(p: VideoParams, pipe: Any, defer_decode: bool = False) -> Any:
    """Run the pipeline for the sample's parameters; returns the frames on the host as one
    (frames, height, width, 3) uint8 array; with ``defer_decode`` the decode still to do
    (a workers.deferred_decode.PendingDecode; the pipeline's own output when it decoded
    anyway). Stages go to the current StageClock."""
    kwargs: dict[str, Any] = {}
    with stage_clock.ensure() as clock:
        if p.mode == "motion":
            # diffsynth needs exactly num_frames frames at the output size; load_frames cuts or loops.
            with clock.timed("reference"):
                kwargs["input_video"] = load_frames(Path(p.video_path), p.width, p.height, p.frames)
            kwargs["denoising_strength"] = p.denoising_strength
        with deferred_decode.capturing() if defer_decode else nullcontext():
            video = stage_clock.timed_call(lambda progress: pipe(
                prompt=p.prompt,
                negative_prompt=p.negative_prompt,
                seed=p.seed,
                num_inference_steps=p.steps,
                cfg_scale=p.cfg_scale,
                height=p.height,
                width=p.width,
                num_frames=p.frames,
                tiled=p.tiled,
                progress_bar_cmd=progress,
                output_type="floatpoint",  # the VAE's tensor: frames_from_vae converts it in one go
                **kwargs,
            ))
        if isinstance(video, deferred_decode.PendingDecode):
            clock.seconds.pop("vae", None)  # the capture only: the decoder's own clock times the decode
            return video
        with clock.timed("convert"):
            return frames_from_vae(video)


VAE_RANGE = (-1, 1)  # the values the Wan VAE decodes to (diffsynth's min_value, max_value)


def frames_from_vae(video: Any) -> Any:
    """The VAE's output (B, C, T, H, W, on the device) as (T, H, W, 3) uint8 frames on the host.

    Exactly the arithmetic of diffsynth's ``vae_output_to_video`` (``(x - min) * (255 /
    (max - min))``, clipped to 0..255, cast to uint8), so the frames are the ones the
    pipeline's PIL images hold, bit for bit; but on the whole video at once on the device,
    and one copy to the host, instead of 81 small copies and 81 PIL images on the sample's
    critical path. (diffsynth's own cast of a CUDA tensor to uint8 on the host converts on
    the device too.)
    """
    import torch
    from einops import reduce

    lo, hi = VAE_RANGE
    v = reduce(video, "B C T H W -> T H W C", reduction="mean")
    v = ((v - lo) * (255 / (hi - lo))).clip(0, 255)
    return v.to(dtype=torch.uint8).contiguous().cpu().numpy()


def _rgb24(frame: Any) -> Any:
    """One frame as an (H, W, 3) uint8 array: a row of frames_from_vae's array, or a PIL image."""
    import numpy as np

    return frame if isinstance(frame, np.ndarray) else np.asarray(frame.convert("RGB"))


def encode_mp4(frames: Any, path: Path, fps: int) -> None:
    """H.264 mp4 (yuv420p, CRF 18) with PyAV; the same frames give the same bytes.

    ``frames``: a (T, H, W, 3) uint8 array or a list of PIL images (the same pixels give the
    same file either way). PyAV rather than diffsynth's save_video: it needs no
    imageio-ffmpeg binary (GPU hosts often lack it), and its x264 options are ours to pin
    (X264_OPTIONS).
    """
    import av

    first = _rgb24(frames[0])
    h, w = first.shape[:2]
    with av.open(str(path), mode="w", format="mp4") as c:
        stream = c.add_stream("libx264", rate=fps, options=X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for img in frames:
            frame = av.VideoFrame.from_ndarray(_rgb24(img), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def write_video_atomically(frames: Any, final: Path, fps: int) -> float:
    """Write ``frames`` as an mp4 at ``final``: the complete file or none (workers/atomic_output.py).
    Returns the seconds spent encoding (the rest is flushing and renaming)."""
    spent = [0.0]

    def encode(tmp: Path) -> None:
        t = time.perf_counter()
        encode_mp4(frames, tmp, fps)
        spent[0] = time.perf_counter() - t

    write_atomically(final, encode)
    return spent[0]


def params_of(task: TaskPayload) -> VideoParams:
    return parse_params(task, VideoParams, "video")


def run(task: TaskPayload, ctx: JobContext) -> JobOutcome:
    """Generate one sample and write it to ``task.output_path``.

    The pipeline comes from ``ctx.models`` (loaded on first use, kept afterwards) on
    ``ctx.device``. The GPU part (text encoding, denoising, decoding, frames to the host)
    runs here; the CPU tail (mp4 encoding, the atomic write) is the outcome's ``finish``,
    run before returning unless ``ctx.defer_finish`` (the runner then overlaps it with the
    next sample). Raises InputError for invalid parameters or reference video,
    ModelLoadError for bad model files, GpuOutOfMemory when CUDA runs out of memory;
    other errors propagate (from ``finish`` too).
    """
    start = time.perf_counter()
    pin_torch_threads(ctx.threads)
    p = params_of(task)
    _check_shape(task, p)  # before loading: a bad task must not cost a model load
    final = Path(task.output_path)
    device = ctx.device
    identity = p.model.model_dump_json()
    pipe, loaded, load_s = ctx.models.get("video", identity, device, lambda: load_pipeline(p.model, device))
    if loaded:
        log.info("sample %s: loaded model %s on %s in %.2f s", task.sample_id, p.model.name, device, load_s)
    # The loaded VAE decides the real factors (Wan2.2's VAE needs multiples of 32).
    _check_shape(task, p, max(SIZE_FACTOR, pipe.height_division_factor, pipe.width_division_factor))
    text_embedding_cache.install(pipe, identity, "WanVideoUnit_PromptEmbedder", ignored=frozenset({"positive"}),
                                 capacity=ctx.text_cache_entries)
    # With the finish deferred, the VAE decode goes to the device's decoder too: it runs
    # beside the next sample's denoising (workers/deferred_decode.py).
    defer_decode = ctx.defer_finish and deferred_decode.install(pipe)
    shape = f"{p.width}x{p.height}x{p.frames}"

    def translated(exc: Exception) -> Exception:
        oom = out_of_memory(exc, task.sample_id, shape, task.memory_mib, device)
        if oom is None:
            return exc
        if defer_decode and deferred_decode.stop_deferring(pipe):
            log.warning("sample %s ran out of GPU memory with a decode beside a denoising; this worker decodes "
                        "in place from now on", task.sample_id)
        return oom

    with StageClock(device, on_step=lambda i, n: ctx.report(progress=i / n)) as clock:
        t_gen = time.perf_counter()
        try:
            made = _generate(p, pipe, defer_decode)
            decoding = (deferred_decode.decoder(device).submit(made, frames_from_vae)
                        if isinstance(made, deferred_decode.PendingDecode) else None)
        except Exception as exc:
            raise translated(exc) from exc
        generate_s = time.perf_counter() - t_gen
    # The decoder holds a pending decode's latents until they are decoded; else these are the frames.
    host_frames = None if decoding is not None else made
    del made
    metrics: dict[str, MetricValue] = {"generate_s": round(generate_s, 4), **clock.metrics()}

    def finish() -> dict[str, MetricValue]:
        extra: dict[str, MetricValue] = {}
        frames = host_frames
        if decoding is not None:
            t_wait = time.perf_counter()
            try:
                frames, stages = decoding.result()
            except Exception as exc:
                raise translated(exc) from exc
            extra.update(stages, stage_decode_wait_s=round(time.perf_counter() - t_wait, 4))
        count, height, width = frames.shape[:3]
        extra.update(frames=count, width=width, height=height)
        t_write = time.perf_counter()
        encode_s = write_video_atomically(frames, final, p.fps)
        end = time.perf_counter()
        log.info("sample %s: wrote %s (%d frames %dx%d); encoded in %.2f s, %.2f s after its start",
                 task.sample_id, final, count, width, height, end - t_write, end - start)
        return {**extra, "write_s": round(end - t_write, 4), "stage_encode_s": round(encode_s, 4),
                "stage_write_s": round(end - t_write - encode_s, 4)}

    return finish_now(JobOutcome(
        output_path=str(final), model_loaded=loaded, model_load_s=load_s, finish=finish, metrics=metrics,
    ), ctx)
