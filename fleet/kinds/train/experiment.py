"""Kind ``train`` (seed 004): training runs on sharded tabular data, one sample per run of a
grid. Every error names the file and the field::

    kind: train
    name: kuairand-ctr
    data: data                  # a folder of CSVs; name_part1.csv, name_part2.csv, ... read as one table
    table: interactions         # which table of the folder (default: the only one)
    label: is_click             # the binary label column
    categorical: [user_id, video_id, tab]
    numeric: [duration_s, hour]
    trainer: tabular            # embeddings per categorical column + numeric -> MLP -> click logit
    epochs: 5
    batch_size: 512
    lr: 0.001
    num_workers: 8              # DataLoader processes
    pin_memory: true
    persistent_workers: true
    data_on_gpu: false          # true: the table in GPU memory, batches indexed there (no DataLoader)
    cuda_graph: true            # with data_on_gpu: the whole step captured once and replayed (bf16 or no AMP)
    use_amp: true
    amp_dtype: bf16             # bf16, or fp16 (with a gradient scaler)
    checkpoint_every_s: 300     # also at every epoch's end
    memory_mib: 4000
    grid: {lr: [0.001, 0.01], batch_size: [512, 2048]}   # one run per combination
    output: runs                # <output>/<run name>/: checkpoint.pt, metrics.jsonl, result.json
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from fleet.errors import InputError
from fleet.kinds.model_files import resolve
from fleet.kinds.train.tables import Table, find_table


class RunSettings(BaseModel):
    """What one training run is given (the grid varies these)."""

    model_config = ConfigDict(extra="forbid")

    trainer: Literal["tabular"] = "tabular"
    epochs: StrictInt = Field(5, ge=1, le=10000)
    batch_size: StrictInt = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    num_workers: StrictInt = Field(4, ge=0, le=64)
    pin_memory: bool = True
    persistent_workers: bool = True
    use_amp: bool = True
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    data_on_gpu: bool = Field(
        False, description="Keep the whole table in GPU memory and index batches there (no DataLoader): "
        "for tables that fit, the data path stops being the bottleneck")
    cuda_graph: bool = Field(
        True, description="With data_on_gpu on a GPU, capture the whole training step once as a CUDA graph and "
        "replay it per batch (one launch instead of ~60); not with amp_dtype fp16, whose gradient scaler steps "
        "on the host")
    embedding_dim: StrictInt = Field(16, ge=1, le=1024)
    hidden: list[StrictInt] = Field(default_factory=lambda: [256, 128], min_length=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: StrictInt = Field(0, ge=0)
    checkpoint_every_s: float = Field(300.0, gt=0)


class TrainSpec(RunSettings):
    kind: Literal["train"]
    name: str | None = Field(None, min_length=1)
    data: str = Field(min_length=1)
    table: str | None = None
    label: str = "label"
    categorical: list[str] = Field(default_factory=list)
    numeric: list[str] = Field(default_factory=list)
    memory_mib: int = Field(0, ge=0)
    gpus: StrictInt = Field(1, ge=0, le=1, description="GPUs a run holds (0: CPU)")
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    output: str | None = None


@dataclass(frozen=True)
class Run:
    name: str  # readable, unique within the experiment: "lr=0.01_batch_size=512", or "run"
    settings: RunSettings


@dataclass(frozen=True)
class TrainExperiment:
    path: Path
    name: str
    output: Path
    table: Table
    label: str
    categorical: list[str]
    numeric: list[str]
    runs: list[Run]
    memory_mib: int
    gpus: int
    priority: str = "normal"
    kind: str = "train"


def _fail(path: Path, e: ValidationError, prefix: str = "") -> InputError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "experiment"
    return InputError(f"{path}: {prefix}{loc}: {err['msg'].removeprefix('Value error, ')}")


def _value_name(v: Any) -> str:
    if isinstance(v, list):
        return "x".join(map(str, v))
    return str(v).lower() if isinstance(v, bool) else str(v)


def expand_grid(path: Path, base: dict[str, Any], grid: dict[str, list[Any]]) -> list[Run]:
    """One run per combination of the grid's values (keys in the file's order), named by them."""
    settings_keys = set(RunSettings.model_fields)
    for key, values in grid.items():
        if key not in settings_keys:
            raise InputError(f"{path}: grid.{key}: not a run setting (one of {', '.join(sorted(settings_keys))})")
        if not values:
            raise InputError(f"{path}: grid.{key}: give at least one value")
    runs: list[Run] = []
    for combo in itertools.product(*grid.values()) if grid else [()]:
        change = dict(zip(grid, combo))
        name = "_".join(f"{k}={_value_name(v)}" for k, v in change.items()) or "run"
        try:
            runs.append(Run(name, RunSettings.model_validate({**base, **change})))
        except ValidationError as e:
            raise _fail(path, e, f"grid run {name}: ") from None
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: grid: two runs would have the same name; give distinct values")
    return runs


def load_train_experiment(path: Path, data: dict[str, Any], default_output: Path | None) -> TrainExperiment:
    try:
        spec = TrainSpec.model_validate(data)
    except ValidationError as e:
        raise _fail(path, e) from None
    base = path.resolve().parent
    table = find_table(resolve(base, spec.data).resolve(), spec.table, path)
    columns = set(table.columns)
    for field in ("label",):
        if spec.label not in columns:
            raise InputError(f"{path}: {field}: no column {spec.label!r} in {table.describe()}")
    for field in ("categorical", "numeric"):
        for col in getattr(spec, field):
            if col not in columns:
                raise InputError(f"{path}: {field}: no column {col!r} in {table.describe()}")
    both = set(spec.categorical) & set(spec.numeric) | ({spec.label} & (set(spec.categorical) | set(spec.numeric)))
    if both:
        raise InputError(f"{path}: column {sorted(both)[0]!r} is given twice (label, categorical, numeric)")
    if not spec.categorical and not spec.numeric:
        raise InputError(f"{path}: give the feature columns: categorical and/or numeric")
    name = spec.name or path.stem
    output = resolve(base, spec.output) if spec.output else (
        default_output.expanduser() / name if default_output is not None else base / "runs")
    run_fields = spec.model_dump(include=set(RunSettings.model_fields))
    return TrainExperiment(path.resolve(), name, output.resolve(), table, spec.label, list(spec.categorical),
                           list(spec.numeric), expand_grid(path, run_fields, spec.grid), spec.memory_mib, spec.gpus,
                           spec.priority)
