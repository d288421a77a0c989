"""The image kind's job: Z-Image text-to-image, written atomically as a PNG.

Job code only: no Celery here. ``run(task, context)`` reads the task's ImageParams, takes
the resident pipeline from the context's model cache (a worker that serves several kinds
keeps one model resident at a time), generates, and writes ``<image_id>_seed<seed>.png``
(or leaves the writing to the runner's finisher: ``JobOutcome.finish``); each sample's
stages (text, inputs, denoise, vae, encode, write; seconds) go into its metrics.
The same parameters give the same bytes on any worker: the noise is drawn on the CPU
from the seed, and the PNG is written with fixed settings and no metadata.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fleet.contract import MetricValue, TaskPayload
from fleet.errors import InputError
from fleet.kinds.image.spec import ImageParams
from workers import text_embedding_cache
from workers.atomic_output import write_atomically
from workers.jobs.base import JobContext, JobOutcome, finish_now, parse_params, pin_torch_threads
from workers.pipeline_loading import out_of_memory
from workers.stage_clock import StageClock

log = logging.getLogger("fleet.job")

PNG_COMPRESS_LEVEL = 6  # zlib's default; fixed so the same pixels give the same file


def params_of(task: TaskPayload) -> ImageParams:
    return parse_params(task, ImageParams, "image")


def write_png(image: Any, path: Path) -> None:
    image.convert("RGB").save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def run(task: TaskPayload, ctx: JobContext) -> JobOutcome:
    """Generate one image and write it to ``task.output_path``.

    The GPU part (text encoding, denoising, decoding to a PIL image) runs here; the PNG
    encoding and the atomic write are the outcome's ``finish``, run before returning
    unless ``ctx.defer_finish`` (the runner then overlaps it with the next sample).
    Raises InputError for invalid parameters, ModelLoadError for bad model files,
    GpuOutOfMemory when CUDA runs out of memory; other errors propagate (from ``finish`` too).
    """
    from workers.image_model import generate, load_image_pipeline

    start = time.perf_counter()
    pin_torch_threads(ctx.threads)
    p = params_of(task)
    final = Path(task.output_path)
    device = ctx.device
    identity = f"{p.model.model_dump_json()}|{p.dtype}"
    pipe, loaded, load_s = ctx.models.get("image", identity, device, lambda: load_image_pipeline(p.model, p.dtype, device))
    factor = max(pipe.height_division_factor, pipe.width_division_factor)
    if p.width % factor or p.height % factor:
        raise InputError(f"sample {task.sample_id} ({final}): size {p.width}x{p.height} is not a multiple of {factor}")
    text_embedding_cache.install(pipe, identity, "ZImageUnit_PromptEmbedder", capacity=ctx.text_cache_entries)
    with StageClock(device, on_step=lambda i, n: ctx.report(progress=i / n)) as clock:
        t_gen = time.perf_counter()
        try:
            image = generate(pipe, p)
        except Exception as exc:
            oom = out_of_memory(exc, task.sample_id, f"{p.width}x{p.height}", task.memory_mib, device)
            if oom is None:
                raise
            raise oom from exc
        generate_s = time.perf_counter() - t_gen

    def finish() -> dict[str, MetricValue]:
        t_write = time.perf_counter()
        spent = [0.0]

        def encode(tmp: Path) -> None:
            t = time.perf_counter()
            write_png(image, tmp)
            spent[0] = time.perf_counter() - t

        write_atomically(final, encode)
        end = time.perf_counter()
        log.info("sample %s: wrote %s (%dx%d, seed %d); encoded in %.2f s, %.2f s after its start", task.sample_id,
                 final, p.width, p.height, p.seed, end - t_write, end - start)
        return {"write_s": round(end - t_write, 4), "stage_encode_s": round(spent[0], 4),
                "stage_write_s": round(end - t_write - spent[0], 4)}

    return finish_now(JobOutcome(
        output_path=str(final), model_loaded=loaded, model_load_s=load_s, finish=finish,
        metrics={"width": image.size[0], "height": image.size[1], "seed": p.seed,
                 "generate_s": round(generate_s, 4), **clock.metrics()},
    ), ctx)
