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

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from fleet.errors import InputError
from fleet.kinds.video.spec import ModelSpec

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
# torch.Generator.manual_seed takes 0 .. 2**64 - 1 (diffsynth seeds its noise with it)
SEED_MAX = 2**64 - 1


class ModelEntry(BaseModel):
    """The model as written in the experiment: a folder with model.json, or explicit files."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = None
    name: str | None = None
    dit: list[str] | str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    architectures: list[Literal["fleet-tiny"]] | None = None
    memory_mib: int | None = Field(None, ge=0, description="Default GPU memory a sample of this model needs")

    @model_validator(mode="after")
    def _complete(self) -> "ModelEntry":
        if self.dir is None and not (self.dit and self.text_encoder and self.vae and self.tokenizer):
            raise ValueError("give either dir (a folder with model.json) or all of dit, text_encoder, vae, tokenizer")
        return self


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


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q)


def _model_spec(path: Path, base: Path, entry: ModelEntry) -> tuple[ModelSpec, int | None]:
    fields: dict[str, Any] = {}
    root = base
    if entry.dir is not None:
        root = _resolve(base, entry.dir)
        manifest = root / "model.json"
        try:
            fields = json.loads(manifest.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: model.dir: {manifest} not found") from None
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: model.dir: {manifest}: not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise InputError(f"{path}: model.dir: {manifest}: must hold a JSON object")
    own = entry.model_dump(exclude_none=True, exclude={"dir", "memory_mib"})
    fields.update(own)
    memory = entry.memory_mib if entry.memory_mib is not None else fields.pop("memory_mib", None)
    # Files named in the experiment resolve against the experiment; those from model.json against its folder.
    def res(key: str, value: str) -> str:
        return str(_resolve(base if key in own else root, value).resolve())

    try:
        dit = fields.get("dit")
        fields["dit"] = [res("dit", d) for d in ([dit] if isinstance(dit, str) else (dit or []))]
        for key in ("text_encoder", "vae", "tokenizer"):
            if key in fields:
                fields[key] = res(key, fields[key])
        return ModelSpec(**fields), memory
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"{path}: model.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    except TypeError as e:
        raise InputError(f"{path}: model: {e}") from None


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
    model, model_memory = _model_spec(path, base, spec.model)
    dataset = _resolve(base, spec.dataset).resolve()
    if dataset.exists() and not dataset.is_dir():
        raise InputError(f"{path}: dataset: {dataset} is a file; give the folder of category folders")
    if not dataset.is_dir():
        raise InputError(f"{path}: dataset: folder {dataset} not found")
    prompts = _resolve(base, spec.prompts).resolve()
    name = spec.name or path.stem
    if spec.output is not None:
        output = _resolve(base, spec.output)
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
