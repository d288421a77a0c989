"""The video kind's experiment section (seed 001), validated by pydantic; every error
names the file and the field. Relative paths resolve against the experiment file's
folder, so a copied experiment folder works on another host::

    kind: video
    dataset: dataset            # <category>/<video>.mp4
    prompts: prompts.json       # see fleet.prompts
    seeds: [42, 142]
    mode: motion                # t2v | motion (from the reference video)
    denoising_strength: 0.7     # motion only
    width: 832                  # multiple of 16
    height: 480                 # multiple of 16
    frames: 81                  # 4k+1
    fps: 15
    steps: 50
    cfg_scale: 5.0
    model: {dir: models/wan}    # a folder with model.json, or the files one by one
    output: results
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from fleet.errors import InputError
from fleet.kinds.model_files import ModelEntry, model_spec, resolve
from fleet.kinds.video.spec import ModelSpec

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
# torch.Generator.manual_seed takes 0 .. 2**64 - 1 (diffsynth seeds its noise with it)
SEED_MAX = 2**64 - 1


class VideoExperiment(BaseModel):
    """Kind ``video``: categories x reference videos x prompts x seeds."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["video"]
    name: str | None = Field(None, min_length=1)
    dataset: str
    prompts: str
    seeds: list[StrictInt] = Field(min_length=1, description="Integers 0 .. 2**64-1 (no booleans)")
    categories: list[str] | None = Field(None, description="Only these categories (default: every folder)")
    mode: Literal["t2v", "motion"] = "motion"
    denoising_strength: float = Field(0.7, ge=0.0, le=1.0)
    negative_prompt: str = ""
    width: int = Field(832, gt=0)
    height: int = Field(480, gt=0)
    frames: int = Field(81, gt=0)
    fps: int = Field(15, gt=0)
    steps: int = Field(50, gt=0)
    cfg_scale: float = 5.0
    tiled: bool = True
    memory_mib: int | None = Field(None, ge=0, description="GPU memory a sample needs (default: the model's)")
    gpus_per_sample: int = Field(1, ge=1, le=16, description="GPUs one sample holds (a worker started with --gpus)")
    priority: Literal["low", "normal", "high", "urgent"] = Field(
        "normal", description="Which of its queues' priority lists its samples wait in (fleet.priority)")
    model: ModelEntry
    output: str | None = Field(None, description="Output root (default: the settings' output_dir/<name>, else results/)")

    @field_validator("width", "height")
    @classmethod
    def _mult16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be a multiple of 16 (Wan works on 16-pixel blocks), got {v}")
        return v

    @field_validator("frames")
    @classmethod
    def _frames(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"must be 4k+1 (1, 5, 9, ..., 81), got {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds repeat")
        bad = [s for s in v if not 0 <= s <= SEED_MAX]
        if bad:
            raise ValueError(f"seed {bad[0]} is outside 0 .. 2**64-1 (what torch's generator accepts)")
        return v


class LoadedExperiment(BaseModel):
    """A validated experiment with paths resolved against the file's folder."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    path: Path
    name: str
    kind: str = "video"
    spec: VideoExperiment
    dataset: Path
    prompts: Path
    output: Path
    model: ModelSpec
    memory_mib: int
    priority: str = "normal"  # low | normal | high | urgent (fleet.priority); not part of any sample id


def load_video_experiment(path: Path, data: dict[str, Any], default_output: Path | None = None) -> LoadedExperiment:
    """Validate a video experiment document read from ``path``; InputError (one line, file
    and field) on any fault. ``default_output`` (the settings' output_dir) holds ``<name>/``
    when the file names no output.
    """
    try:
        spec = VideoExperiment.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "experiment"
        msg = err["msg"].removeprefix("Value error, ")
        raise InputError(f"{path}: {loc}: {msg}") from None
    base = path.resolve().parent
    model, model_memory = model_spec(path, base, spec.model, ModelSpec, "video")
    dataset = resolve(base, spec.dataset).resolve()
    if dataset.exists() and not dataset.is_dir():
        raise InputError(f"{path}: dataset: {dataset} is a file; give the folder of category folders")
    if not dataset.is_dir():
        raise InputError(f"{path}: dataset: folder {dataset} not found")
    prompts = resolve(base, spec.prompts).resolve()
    name = spec.name or path.stem
    if spec.output is not None:
        output = resolve(base, spec.output)
    else:
        output = default_output.expanduser() / name if default_output is not None else base / "results"
    return LoadedExperiment(
        path=path.resolve(),
        name=name,
        spec=spec,
        dataset=dataset,
        prompts=prompts,
        output=output.resolve(),
        model=model,
        memory_mib=spec.memory_mib if spec.memory_mib is not None else (model_memory or 0),
        priority=spec.priority,
    )
