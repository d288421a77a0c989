"""A diffusion model as an experiment names it: a folder with model.json, or its files one by one.

Shared by the kinds that run diffsynth pipelines (video: Wan; image: Z-Image). Paths
named in the experiment resolve against the experiment file's folder, those of a
model.json against that folder; every error names the file and the field. Nothing is
downloaded: a model is local files, checked to exist before anything is published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.errors import InputError

Spec = TypeVar("Spec", bound=BaseModel)


class ModelEntry(BaseModel):
    """The ``model:`` section of an experiment."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = None
    name: str | None = None
    pipeline: str | None = Field(None, description="Which diffsynth pipeline the files are for (image kind: z-image)")
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


def resolve(base: Path, p: str) -> Path:
    """``p`` (``~`` expanded) relative to ``base`` unless absolute."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q)


def model_spec(path: Path, base: Path, entry: ModelEntry, spec_cls: type[Spec], kind: str) -> tuple[Spec, int | None]:
    """The ``spec_cls`` of ``entry`` with absolute file paths, and its declared memory (MiB or None).

    ``path`` is the experiment file (for messages), ``base`` its folder. A model.json that
    names a ``pipeline`` the kind's spec has no field for (an image model given to a video
    experiment) is refused by name.
    """
    fields: dict[str, Any] = {}
    root = base
    if entry.dir is not None:
        root = resolve(base, entry.dir)
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
    if "pipeline" in fields and "pipeline" not in spec_cls.model_fields:
        raise InputError(f"{path}: model: {fields.get('name') or root} is a {fields['pipeline']!r} model; "
                         f"kind {kind} needs a Wan video model")

    # Files named in the experiment resolve against the experiment; those from model.json against its folder.
    def res(key: str, value: str) -> str:
        return str(resolve(base if key in own else root, value).resolve())

    try:
        dit = fields.get("dit")
        fields["dit"] = [res("dit", d) for d in ([dit] if isinstance(dit, str) else (dit or []))]
        for key in ("text_encoder", "vae", "tokenizer"):
            if key in fields:
                fields[key] = res(key, fields[key])
        return spec_cls(**fields), memory
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(map(str, err["loc"]))
        if loc == "pipeline" and err["type"] == "missing":
            raise InputError(f"{path}: model: {fields.get('name') or root} names no pipeline; kind {kind} needs "
                             f"pipeline: {spec_cls.model_fields['pipeline'].description}") from None
        raise InputError(f"{path}: model.{loc}: {err['msg']}") from None
    except TypeError as e:
        raise InputError(f"{path}: model: {e}") from None


def check_model_files(exp_path: Path, spec: Any) -> None:
    """Every file the workers will load exists (as this host sees the shared paths)."""
    for key, path in [*(("dit", d) for d in spec.dit), ("text_encoder", spec.text_encoder), ("vae", spec.vae)]:
        if not Path(path).is_file():
            raise InputError(f"{exp_path}: model.{key}: file {path} not found (model {spec.name!r})")
    if not Path(spec.tokenizer).is_dir():
        raise InputError(f"{exp_path}: model.tokenizer: folder {spec.tokenizer} not found (model {spec.name!r})")
