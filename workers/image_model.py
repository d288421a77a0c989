"""Loading a text-to-image pipeline (diffsynth's Z-Image) from local files, and running it
with the image kind's options; the worker's ModelCache keeps it resident between samples.

Loading is offline, as for video (workers/wan_model.py): every part by local path, the
tokenizer given explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleet.kinds.image.spec import ImageModelSpec, ImageParams
from workers import stage_clock
from workers.pipeline_loading import DTYPES, check_files, load_quietly, require_parts


def _register_fleet_tiny() -> None:
    from workers.tiny_image_model import register_tiny_image_models

    register_tiny_image_models()


# Architectures diffsynth does not know by itself, by the name model.json gives in
# ``architectures``: registered only for the models that say so.
EXTRA_ARCHITECTURES: dict[str, Callable[[], None]] = {"fleet-tiny": _register_fleet_tiny}


def _cast_to_weights(module: Any, args: tuple) -> tuple:
    return (args[0].to(next(module.parameters()).dtype),)


def load_image_pipeline(spec: ImageModelSpec, dtype: str, device: str) -> Any:
    """A ZImagePipeline for ``spec`` in ``dtype`` (bf16, fp16, fp32) on ``device``.

    Raises ModelLoadError (missing file, unrecognised or unreadable weights) or
    GpuOutOfMemory (the model does not fit).
    """
    check_files(spec)
    from diffsynth.pipelines.z_image import ModelConfig, ZImagePipeline

    for arch in spec.architectures:
        EXTRA_ARCHITECTURES[arch]()
    dit_path: str | list[str] = spec.dit[0] if len(spec.dit) == 1 else list(spec.dit)
    configs = [ModelConfig(path=dit_path), ModelConfig(path=spec.text_encoder), ModelConfig(path=spec.vae)]
    pipe = load_quietly(spec.name, device, lambda: ZImagePipeline.from_pretrained(
        torch_dtype=DTYPES[dtype], device=device, model_configs=configs,
        tokenizer_config=ModelConfig(path=spec.tokenizer),
    ))
    pipe = require_parts(pipe, spec.name, device, ("dit", "text_encoder", "vae_decoder", "tokenizer"))
    # diffsynth's Z-Image timestep embedder casts its input to bfloat16 whatever the
    # weights are; cast it to the weights' dtype so fp16 and fp32 run too (a no-op in bf16).
    pipe.dit.t_embedder.mlp.register_forward_pre_hook(_cast_to_weights)
    return pipe


def generate(pipe: Any, p: ImageParams) -> Any:
    """One PIL image for the sample's parameters.

    CFG truncation: from step ``cfg_truncation_step`` (0-based) on, the guided model call
    runs the conditional pass only, as seed 002's ``--cfg_truncation_step`` does.
    """
    trunc = p.cfg_truncation_step
    if trunc is not None and trunc < p.steps and p.cfg_scale != 1.0:
        guided = type(pipe).cfg_guided_model_fn

        def truncated(model_fn: Any, cfg_scale: float, shared: Any, posi: Any, nega: Any, **others: Any) -> Any:
            if others.get("progress_id", 0) >= trunc:
                cfg_scale = 1.0
            return guided(pipe, model_fn, cfg_scale, shared, posi, nega, **others)

        pipe.cfg_guided_model_fn = truncated  # this call only: removed below
    try:
        # Stages (inputs, denoise, vae) go to the current StageClock, when the job keeps one.
        return stage_clock.timed_call(lambda progress: pipe(
            prompt=p.prompt, negative_prompt=p.negative_prompt, cfg_scale=p.cfg_scale, height=p.height,
            width=p.width, seed=p.seed, num_inference_steps=p.steps, progress_bar_cmd=progress,
        ))
    finally:
        pipe.__dict__.pop("cfg_guided_model_fn", None)
