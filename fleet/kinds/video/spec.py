"""The video kind's parameters as the worker reads them (from TaskPayload.params)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelSpec(BaseModel):
    """A Wan model by local file paths (absolute once planned). Nothing is downloaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "wan2.1-t2v"
    dit: list[str] = Field(min_length=1, description="DiT weight files (safetensors), shards in order")
    text_encoder: str
    vae: str
    tokenizer: str = Field(description="Folder of the T5 tokenizer (tokenizer.json ...)")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Architectures diffsynth does not know by itself, registered by the worker before it
    # loads these files (workers/wan_model.py, EXTRA_ARCHITECTURES). Names, never code:
    # a message can only pick among what the worker has.
    architectures: list[Literal["fleet-tiny"]] = Field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """What of the model decides a sample's output: the files as named and the dtype.
        (``architectures`` only tells the loader how to read the files.)"""
        return self.model_dump(exclude={"architectures"})


class VideoParams(BaseModel):
    """One video sample's parameters: the experiment's shared ones plus the sample's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str
    video: str = Field(description="Reference video name (file stem)")
    video_path: str
    prompt: str
    prompt_index: int = Field(ge=0)
    negative_prompt: str = ""
    seed: int = Field(ge=0, le=2**64 - 1)
    mode: Literal["t2v", "motion"]
    denoising_strength: float = Field(ge=0.0, le=1.0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    frames: int = Field(gt=0)
    fps: int = Field(gt=0)
    steps: int = Field(gt=0)
    cfg_scale: float
    tiled: bool = True
    model: ModelSpec
