"""What every kind's producer side provides, and the generic plan the core works on.

A kind turns its experiment section into samples. The core never looks inside a
sample's ``body``: it hashes nothing, routes by ``gpus`` and ``memory_mib``, counts by
``group``, shows ``label`` and checks ``output_path`` for completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import redis

from fleet.contract import Keys


class Sample:
    """One planned sample. ``body`` is the kind's per-sample parameters (JSON-able).

    A kind may build a sample ``deferred``: its label and body are then made by
    ``describe(detail)`` the first time they are read. The core reads them only for the
    samples it publishes, so a re-plan of 100,000 done samples does not build 100,000 dicts.
    """

    __slots__ = ("sample_id", "group", "output_path", "memory_mib", "gpus", "aliases", "retries", "_label", "_body",
                 "_describe", "_detail")

    def __init__(self, sample_id: str, group: str, label: str, output_path: str, body: dict[str, Any],
                 memory_mib: int = 0, gpus: int = 1, aliases: tuple[str, ...] = (), retries: int | None = None) -> None:
        self.sample_id = sample_id  # deterministic over everything that decides the output
        self.group = group  # what status counts it under (category, CSV, grid)
        self.output_path = output_path  # absolute; done = record + this file
        self.memory_mib = memory_mib  # declared GPU memory need
        self.gpus = gpus  # GPUs one sample holds; 0 = CPU only
        # Ids the same sample had under an earlier id scheme (only when PlanContext.legacy_ids):
        # a record under one of them, with the file in place, counts as done.
        self.aliases = aliases
        self.retries = retries  # its own retry limit (-1 forever, 0 none, N); None: the settings' max_attempts
        self._label: str | None = label  # short human description
        self._body: dict[str, Any] | None = body
        self._describe: Callable[[Any], tuple[str, dict[str, Any]]] | None = None
        self._detail: Any = None

    @classmethod
    def deferred(cls, sample_id: str, group: str, output_path: str, memory_mib: int, gpus: int,
                 aliases: tuple[str, ...], describe: Callable[[Any], tuple[str, dict[str, Any]]],
                 detail: Any) -> Sample:
        """A sample whose (label, body) is ``describe(detail)``, made when first read."""
        smp = cls.__new__(cls)
        smp.sample_id, smp.group, smp.output_path = sample_id, group, output_path
        smp.memory_mib, smp.gpus, smp.aliases, smp.retries = memory_mib, gpus, aliases, None
        smp._label = smp._body = None
        smp._describe, smp._detail = describe, detail
        return smp

    def _made(self) -> None:
        if self._body is None and self._describe is not None:
            self._label, self._body = self._describe(self._detail)

    @property
    def label(self) -> str:
        self._made()
        return self._label or ""

    @property
    def body(self) -> dict[str, Any]:
        self._made()
        return self._body if self._body is not None else {}

    def __repr__(self) -> str:
        return f"Sample({self.sample_id!r}, group={self.group!r}, output_path={self.output_path!r})"


class Experiment(Protocol):
    """What the core reads of a loaded experiment of any kind.

    ``priority`` is optional: low | normal | high | urgent (fleet.priority). The core reads
    it as ``getattr(exp, "priority", "normal")``, so a kind without it runs at normal.
    """

    priority: str = "normal"

    @property
    def path(self) -> Path: ...  # the experiment file, absolute

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def output(self) -> Path: ...  # output root, absolute


@dataclass(frozen=True)
class Columns:
    """A plan's samples as columns, for a kind of very many uniform samples: what the done
    check and ``fleet status`` read of every sample (ids, groups, output paths), and
    ``make(indexes)`` for the ``Sample`` objects of the few the core publishes or shows.
    A status or a re-run of a million samples then builds no object per sample."""

    ids: list[str]
    groups: list[str]
    outputs: list[str]
    make: Callable[[Sequence[int]], list[Sample]]  # the samples at these indexes, in their order


class Plan:
    """Every sample of an experiment, in a stable order, and what they all share.

    ``samples`` (a list) or ``columns`` (fleet.kinds.base.Columns) gives the samples; the core
    reads ``ids``, ``groups`` and ``outputs`` (lists, in plan order) and ``at(indexes)``, which
    need no ``Sample`` per sample when the kind gave columns; ``samples`` makes them all."""

    __slots__ = ("experiment", "shared", "extra", "_samples", "_columns", "_derived")

    def __init__(self, experiment: Experiment, samples: list[Sample] | None = None,
                 shared: dict[str, Any] | None = None, extra: Any = None, columns: Columns | None = None) -> None:
        self.experiment = experiment
        self.shared: dict[str, Any] = shared if shared is not None else {}  # the kind's parameters common to every sample
        self.extra = extra  # the kind's own planning by-products (e.g. video content ids, for its input checks)
        if (samples is None) == (columns is None):
            raise ValueError("a plan has either samples or columns")
        self._samples = samples
        self._columns = columns
        self._derived: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self._samples) if self._samples is not None else len(self.ids)

    @property
    def samples(self) -> list[Sample]:
        """Every sample, made now when the kind gave columns (and kept)."""
        if self._samples is None:
            assert self._columns is not None
            self._samples = self._columns.make(range(len(self._columns.ids)))
        return self._samples

    def at(self, indexes: Sequence[int]) -> list[Sample]:
        """The samples at ``indexes`` (plan order positions), in that order."""
        if self._samples is None and self._columns is not None:
            return self._columns.make(indexes)
        return list(map(self.samples.__getitem__, indexes))

    def _column(self, name: str, attr: str) -> list[str]:
        if self._columns is not None:
            return getattr(self._columns, name)
        found = self._derived.get(name)
        if found is None:
            found = self._derived[name] = list(map(attrgetter(attr), self.samples))
        return found

    @property
    def ids(self) -> list[str]:
        return self._column("ids", "sample_id")

    @property
    def groups(self) -> list[str]:
        return self._column("groups", "group")

    @property
    def outputs(self) -> list[str]:
        return self._column("outputs", "output_path")


class KindCache:
    """A Redis hash a kind keeps across plans (e.g. file identity -> content id)."""

    def __init__(self, client: redis.Redis | None, keys: Keys | None, kind: str, name: str) -> None:
        self.client = client
        self.key = keys.kind_cache(kind, name) if keys is not None else ""

    def get_many(self, fields: list[str]) -> list[str | None]:
        if self.client is None or not fields:
            return [None] * len(fields)
        return [None if v is None else v.decode() for v in self.client.hmget(self.key, fields)]

    def put_many(self, found: dict[str, str]) -> None:
        if self.client is not None and found:
            self.client.hset(self.key, mapping=found)


@dataclass(frozen=True)
class PlanContext:
    """What planning may use beyond the experiment: caches in Redis (None: plan without)."""

    client: redis.Redis | None = None
    keys: Keys | None = None
    legacy_ids: bool = False  # the namespace holds records from before ids included the output root

    def cache(self, kind: str, name: str) -> KindCache:
        return KindCache(self.client, self.keys, kind, name)


class Kind(Protocol):
    """A kind's producer side (module attribute ``KIND`` of its planner module)."""

    name: str

    def load(self, path: Path, data: dict[str, Any], default_output: Path | None) -> Experiment:
        """Validate the experiment document (already read); InputError naming file and field."""
        ...

    def plan(self, exp: Any, groups: list[str] | None, ctx: PlanContext) -> Plan:
        """Every sample (of ``groups`` when given); InputError on bad input.

        A sample's id is deterministic over everything that decides its output, the
        output root (or path) included: two experiments writing to different folders
        must not share an id (docs/ARCHITECTURE.md, "Sample identity")."""
        ...

    def check(self, plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
        """Input checks that only the samples about to be published need (e.g. decode videos)."""
        ...
