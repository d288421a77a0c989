"""The video kind's job: Wan text-to-video or motion transfer, written atomically as an mp4.

Job code only: no Celery here. ``run(task, context)`` reads the task's VideoParams, takes
the resident pipeline from the context's model cache, generates, and writes the file;
errors come out as fleet.errors types (InputError, ModelLoadError, GpuOutOfMemory) or as
whatever else went wrong.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fleet.contract import TaskPayload
from fleet.errors import InputError
from fleet.kinds.video.spec import VideoParams
from workers.atomic_output import write_atomically
from workers.jobs.base import JobContext, JobOutcome, parse_params, pin_torch_threads
from workers.pipeline_loading import out_of_memory
from workers.reference_video import load_frames
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


def _no_progress(iterable: Any) -> Any:
    """Progress-bar stand-in: the worker reports progress through records, not tqdm on stderr."""
    return iterable


def _generate(p: VideoParams, pipe: Any) -> list[Any]:
    """Run the pipeline for the sample's parameters; returns the frames as PIL images."""
    kwargs: dict[str, Any] = {}
    if p.mode == "motion":
        # diffsynth needs exactly num_frames frames at the output size; load_frames cuts or loops.
        kwargs["input_video"] = load_frames(Path(p.video_path), p.width, p.height, p.frames)
        kwargs["denoising_strength"] = p.denoising_strength
    return pipe(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        seed=p.seed,
        num_inference_steps=p.steps,
        cfg_scale=p.cfg_scale,
        height=p.height,
        width=p.width,
        num_frames=p.frames,
        tiled=p.tiled,
        progress_bar_cmd=_no_progress,
        **kwargs,
    )


def encode_mp4(frames: list[Any], path: Path, fps: int) -> None:
    """H.264 mp4 (yuv420p, CRF 18) with PyAV; the same frames give the same bytes.

    PyAV rather than diffsynth's save_video: it needs no imageio-ffmpeg binary (GPU hosts
    often lack it), and its x264 options are ours to pin (X264_OPTIONS).
    """
    import av
    import numpy as np

    w, h = frames[0].size
    with av.open(str(path), mode="w", format="mp4") as c:
        stream = c.add_stream("libx264", rate=fps, options=X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(img.convert("RGB")), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def write_video_atomically(frames: list[Any], final: Path, fps: int) -> None:
    """Write ``frames`` as an mp4 at ``final``: the complete file or none (workers/atomic_output.py)."""
    write_atomically(final, lambda tmp: encode_mp4(frames, tmp, fps))


def params_of(task: TaskPayload) -> VideoParams:
    return parse_params(task, VideoParams, "video")


def run(task: TaskPayload, ctx: JobContext) -> JobOutcome:
    """Generate one sample and write it to ``task.output_path``.

    The pipeline comes from ``ctx.models`` (loaded on first use, kept afterwards) on
    ``ctx.device``. Raises InputError for invalid parameters or reference video,
    ModelLoadError for bad model files, GpuOutOfMemory when CUDA runs out of memory;
    other errors propagate.
    """
    start = time.perf_counter()
    pin_torch_threads(ctx.threads)
    p = params_of(task)
    _check_shape(task, p)  # before loading: a bad task must not cost a model load
    final = Path(task.output_path)
    device = ctx.device
    pipe, loaded, load_s = ctx.models.get("video", p.model.model_dump_json(), device, lambda: load_pipeline(p.model, device))
    if loaded:
        log.info("sample %s: loaded model %s on %s in %.2f s", task.sample_id, p.model.name, device, load_s)
    # The loaded VAE decides the real factors (Wan2.2's VAE needs multiples of 32).
    _check_shape(task, p, max(SIZE_FACTOR, pipe.height_division_factor, pipe.width_division_factor))

    t_gen = time.perf_counter()
    try:
        frames = _generate(p, pipe)
    except Exception as exc:
        oom = out_of_memory(exc, task.sample_id, f"{p.width}x{p.height}x{p.frames}", task.memory_mib, device)
        if oom is None:
            raise
        raise oom from exc
    t_write = time.perf_counter()
    write_video_atomically(frames, final, p.fps)
    end = time.perf_counter()
    width, height = frames[0].size
    log.info(
        "sample %s: wrote %s (%d frames %dx%d) in %.2f s, model load %.2f s",
        task.sample_id, final, len(frames), width, height, end - start, load_s,
    )
    return JobOutcome(
        output_path=str(final), model_loaded=loaded, model_load_s=load_s,
        metrics={"frames": len(frames), "width": width, "height": height,
                 "generate_s": round(t_write - t_gen, 4), "write_s": round(end - t_write, 4)},
    )
