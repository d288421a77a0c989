"""Loading a Wan pipeline (diffsynth) from local files, for the video job; the worker's
ModelCache (workers/model_cache.py) keeps it resident between samples.

Loading is fully offline: every ``ModelConfig`` gets a local ``path=`` and the tokenizer
is given explicitly, because diffsynth's default tokenizer config downloads from the hub
(and leaves a ``./models`` folder behind when it fails).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fleet.kinds.video.spec import ModelSpec
from workers.pipeline_loading import DTYPES, check_files, is_out_of_memory, load_quietly, require_parts
from workers.vae_decoding import blend_on_device

__all__ = ["EXTRA_ARCHITECTURES", "is_out_of_memory", "load_pipeline"]

log = logging.getLogger("fleet.model")


def _register_fleet_tiny() -> None:
    from workers.tiny_model import register_tiny_models

    register_tiny_models()


# Architectures diffsynth does not know by itself, by the name a model.json gives in
# ``architectures``: registered only for the models that say so, never for real Wan files.
EXTRA_ARCHITECTURES: dict[str, Callable[[], None]] = {"fleet-tiny": _register_fleet_tiny}


def load_pipeline(spec: ModelSpec, device: str) -> Any:
    """Load a WanVideoPipeline for ``spec`` onto ``device`` from local files only.

    Raises ModelLoadError (missing file, unrecognised architecture, unreadable weights)
    or GpuOutOfMemory (the model does not fit on the device).
    """
    check_files(spec)
    # Heavy imports here: importing diffsynth takes ~5 s and this module is imported early.
    from diffsynth.pipelines.wan_video import ModelConfig, WanVideoPipeline

    for arch in spec.architectures:
        EXTRA_ARCHITECTURES[arch]()
    # Several DiT shards form one ModelConfig: diffsynth hashes and loads them as one state dict.
    dit_path: str | list[str] = spec.dit[0] if len(spec.dit) == 1 else list(spec.dit)
    model_configs = [ModelConfig(path=dit_path), ModelConfig(path=spec.text_encoder), ModelConfig(path=spec.vae)]
    pipe = load_quietly(spec.name, device, lambda: WanVideoPipeline.from_pretrained(
        torch_dtype=DTYPES[spec.dtype], device=device, model_configs=model_configs,
        tokenizer_config=ModelConfig(path=spec.tokenizer),
    ))
    pipe = require_parts(pipe, spec.name, device, ("dit", "text_encoder", "vae"))
    # Tiles blended on the GPU, not in bf16 on the host (workers/vae_decoding.py): same frames.
    if not blend_on_device(pipe.vae):
        log.info("model %s: its VAE lacks diffsynth's tiling parts; tiled decoding stays diffsynth's own", spec.name)
    return pipe
