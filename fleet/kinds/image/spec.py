"""The image kind's parameters as the worker reads them (from TaskPayload.params)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The experiment's short names for the dtype a pipeline runs in -> torch's names.
DTYPES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


class ImageModelSpec(BaseModel):
    """A text-to-image model by local file paths (absolute once planned). Nothing is downloaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "z-image"
    pipeline: Literal["z-image"] = Field(description="z-image (diffsynth's ZImagePipeline)")
    dit: list[str] = Field(min_length=1, description="DiT weight files (safetensors), shards in order")
    text_encoder: str
    vae: str
    tokenizer: str = Field(description="Folder of the text encoder's tokenizer")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Architectures diffsynth does not know by itself (workers/image_model.py): names, never code.
    architectures: list[Literal["fleet-tiny"]] = Field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """What of the model decides an image: the files as named and the pipeline (the dtype
        the sample runs in is its own parameter)."""
        return self.model_dump(exclude={"architectures", "dtype"})


class ImageParams(BaseModel):
    """One image sample's parameters: the experiment's shared ones plus the row's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_id: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    seed: int = Field(ge=0, le=SEED_MAX)
    row: int = Field(ge=0, description="0-based row of the prompts CSV (seed = seed_start + row)")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    steps: int = Field(gt=0)
    cfg_scale: float
    cfg_truncation_step: int | None = Field(None, ge=0, description="From this step (0-based) on, no unconditional pass")
    dtype: Literal["bf16", "fp16", "fp32"]
    model: ImageModelSpec
