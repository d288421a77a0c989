"""The image kind's experiment section (seed 002), validated by pydantic; every error names
the file and the field. Relative paths resolve against the experiment file's folder::

    kind: image
    name: coco-eval
    prompts: prompts.csv        # columns image_id, prompt; optional negative_prompt
    num_samples: 1000           # the first N rows; default all
    seed_start: 42              # row i (0-based, file order) gets seed seed_start + i
    width: 1024                 # multiples of 16
    height: 1024
    steps: 30
    cfg_scale: 4.0
    cfg_truncation_step: 15     # optional: from this step on, no unconditional pass
    dtype: bf16                 # bf16, fp16 or fp32 (default: the model's)
    negative_prompt: ""
    model: {dir: /models/z-image}
    output: results             # <output>/<image_id>_seed<seed>.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from fleet.errors import InputError
from fleet.kinds.image.spec import DTYPES, SEED_MAX, ImageModelSpec
from fleet.kinds.model_files import ModelEntry, model_spec, resolve

SIZE_FACTOR = 16  # the VAE's 8x times the DiT's 2x2 patch


class ImageExperimentSpec(BaseModel):
    """Kind ``image``: one image per row of a prompts CSV."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image"]
    name: str | None = Field(None, min_length=1)
    prompts: str = Field(min_length=1, description="The prompts CSV")
    num_samples: StrictInt | None = Field(None, ge=1, description="The first N rows (default: all)")
    seed_start: StrictInt = Field(0, ge=0, le=SEED_MAX)
    width: StrictInt = Field(1024, gt=0)
    height: StrictInt = Field(1024, gt=0)
    steps: StrictInt = Field(30, gt=0)
    cfg_scale: float = 4.0
    cfg_truncation_step: StrictInt | None = Field(None, ge=0)
    dtype: Literal["bf16", "fp16", "fp32"] | None = None
    negative_prompt: str = ""
    memory_mib: int | None = Field(None, ge=0, description="GPU memory a sample needs (default: the model's)")
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    model: ModelEntry
    output: str | None = Field(None, description="Output folder (default: the settings' output_dir/<name>, else results/)")

    @field_validator("width", "height")
    @classmethod
    def _mult16(cls, v: int) -> int:
        if v % SIZE_FACTOR:
            raise ValueError(f"must be a multiple of {SIZE_FACTOR}, got {v}")
        return v


class ImageExperiment(BaseModel):
    """A validated image experiment with paths resolved against the file's folder."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    path: Path
    name: str
    kind: str = "image"
    spec: ImageExperimentSpec
    prompts: Path
    output: Path
    model: ImageModelSpec
    dtype: Literal["bf16", "fp16", "fp32"]
    memory_mib: int
    priority: str = "normal"

    @property
    def truncation(self) -> int | None:
        """The CFG truncation step that changes something: None when it is at or past the
        last step, or when there is no unconditional pass to drop (cfg_scale 1)."""
        t = self.spec.cfg_truncation_step
        return t if t is not None and t < self.spec.steps and self.spec.cfg_scale != 1.0 else None


def load_image_experiment(path: Path, data: dict[str, Any], default_output: Path | None = None) -> ImageExperiment:
    """Validate an image experiment document read from ``path``; InputError (one line) on any fault."""
    try:
        spec = ImageExperimentSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "experiment"
        msg = err["msg"].removeprefix("Value error, ")
        raise InputError(f"{path}: {loc}: {msg}") from None
    base = path.resolve().parent
    model, model_memory = model_spec(path, base, spec.model, ImageModelSpec, "image")
    prompts = resolve(base, spec.prompts).resolve()
    if prompts.is_dir():
        raise InputError(f"{path}: prompts: {prompts} is a folder; give the prompts CSV")
    name = spec.name or path.stem
    if spec.output is not None:
        output = resolve(base, spec.output)
    else:
        output = default_output.expanduser() / name if default_output is not None else base / "results"
    short = {v: k for k, v in DTYPES.items()}
    return ImageExperiment(
        path=path.resolve(), name=name, spec=spec, prompts=prompts, output=output.resolve(), model=model,
        dtype=spec.dtype or short[model.dtype],
        memory_mib=spec.memory_mib if spec.memory_mib is not None else (model_memory or 0),
        priority=spec.priority,
    )
