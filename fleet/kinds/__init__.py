"""The registry of kinds of work: a kind's name -> its producer module and its job module.

The core (planner driver, enqueue, status, runner, reaper) knows no kind: it looks the
name up here. Both modules are named as strings and imported only when a kind is used,
so the CLI imports nothing of a kind it does not plan, and the producer never imports
the job side (``workers.jobs.*``: torch, diffsynth).

A kind's producer module exposes ``KIND`` (a fleet.kinds.base.Kind); its job module
exposes ``run(task, context) -> JobOutcome`` (see workers/jobs/base.py). Kinds beyond
the built-in ones are named in the settings' ``kinds`` (the worker's and the producer's
own configuration, never a message: a message names a kind, it cannot add one).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import ConfigError, InputError

if TYPE_CHECKING:
    from fleet.kinds.base import Kind


class KindModules(BaseModel):
    """Where a kind's code lives: dotted module names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    planner: str = Field(min_length=1, description="Producer side: a module exposing KIND")
    job: str = Field(min_length=1, description="Worker side: a module exposing run(task, context)")
    runs_commands: bool = Field(
        False, description="Its jobs run shell commands: only workers started with --allow-commands run them")


BUILTIN: dict[str, KindModules] = {
    "video": KindModules(planner="fleet.kinds.video", job="workers.jobs.video"),
    "image": KindModules(planner="fleet.kinds.image", job="workers.jobs.image"),
    "commands": KindModules(planner="fleet.kinds.commands", job="workers.jobs.commands", runs_commands=True),
    "train": KindModules(planner="fleet.kinds.train", job="workers.jobs.train"),
}


def registry(extra: Mapping[str, KindModules] | None = None) -> dict[str, KindModules]:
    """The built-in kinds plus ``extra`` (the settings' ``kinds``); extra may not redefine a built-in."""
    out = dict(BUILTIN)
    for name, mods in (extra or {}).items():
        if name in BUILTIN and mods != BUILTIN[name]:
            raise ConfigError(f"kinds: {name!r} is a built-in kind and cannot be redefined")
        out[name] = mods
    return out


def producer_kind(name: object, extra: Mapping[str, KindModules] | None = None, where: str = "experiment") -> Kind:
    """The producer side of kind ``name``; InputError naming the known kinds when there is none."""
    reg = registry(extra)
    if not isinstance(name, str) or name not in reg:
        raise InputError(f"{where}: kind: must be one of {', '.join(sorted(reg))}, got {name!r}")
    module = importlib.import_module(reg[name].planner)
    kind = getattr(module, "KIND", None)
    if kind is None:
        raise ConfigError(f"kinds: {reg[name].planner} has no KIND (kind {name!r})")
    return kind
