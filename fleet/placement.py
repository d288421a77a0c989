"""Placement policy: which GPUs the fleet may use, how many worker slots each gets, and which
queues a GPU's workers consume. Pure functions over GpuSnapshots; no I/O. Memory in MiB.
Section numbers (§) are seed 003's (the lab's scheduler); seed 000 is its GPU config.

Own workers: processes whose pid is in ``own_pids`` are the fleet's, not colleagues'. Their
memory counts as free and, when every process listed on a GPU is ours, the GPU's
utilisation as idle (NVML gives utilisation per GPU, not per process), because the slots
computed for a GPU include the workers already on it. Memory no listed process accounts
for (driver overhead, other containers, hidden usage) is colleagues', unless every listed
process is ours and some hide their usage. A GPU with own processes is "held": usable while
it passes the checks and exempt from the reserve, as the seed's script never gives back a
GPU it occupies (§4.2, §5.2).

Slots per GPU: fixed (``slots_per_gpu``), packed by the memory a sample declares
(``slot_memory_mib``, §14.1), or auto, by the peak the fleet's workers measure there
(fleet.slot_plans).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator, model_validator

from fleet.errors import ConfigError, PlacementError
from fleet.gpu_inventory import GpuSnapshot
from fleet.slot_plans import SlotMeasure, auto_slots


class PlacementPolicy(BaseModel):
    """Where fleet workers may run. Field names carry their units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: Literal["all"] | list[NonNegativeInt] = Field("all", description="GPU pool (seed 003 TARGET_GPUS)")
    exclude_gpus: list[NonNegativeInt] = Field([], description="Never used (seed 000 exclude_gpus)")
    min_free_mib: NonNegativeInt = Field(0, description="Free memory a GPU needs (seed 000 min_memory_gb)")
    reserve: NonNegativeInt = Field(0, description="Free GPUs left for colleagues (seed 003 RESERVED_GPUS, §5.2)")
    mode: Literal["shared", "exclusive"] = Field("shared", description="exclusive: only idle GPUs (§13.2)")
    exclusive_max_used_pct: float = Field(3.0, gt=0, le=100, description="Idle means memory used below this (§13.2)")
    slots: Literal["fixed", "packed", "auto"] = Field(
        "fixed", description="packed: as many as fit the declared memory (EXTREME_MODE, §14.1); auto: as many as "
        "fit the peak the workers measure (fleet.slot_plans)")
    slots_per_gpu: int = Field(1, ge=1, description="Worker slots per GPU in fixed mode")
    max_slots_per_gpu: int = Field(4, ge=1, description="Cap on packed and auto slots")
    slot_margin_pct: float = Field(10.0, ge=0, lt=100, description="Auto: % of a GPU's memory left free for safety")
    auto_samples: int = Field(2, ge=1, description="Auto: samples a GPU's peak is measured over before it packs")
    slot_memory_mib: int | None = Field(None, gt=0, description="Memory one sample declares; required when packed")
    assignment: dict[str, list[NonNegativeInt]] = Field({}, description="category -> pinned GPUs (seed 000)")

    @field_validator("gpus")
    @classmethod
    def _pool(cls, v: Literal["all"] | list[int]) -> Literal["all"] | list[int]:
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("gpus must be 'all' or a non-empty list of distinct GPU indices")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PlacementPolicy:
        if self.slots == "packed" and self.slot_memory_mib is None:
            raise ValueError("slots='packed' needs slot_memory_mib (the memory one sample declares)")
        if self.slots_per_gpu > self.max_slots_per_gpu:
            raise ValueError(f"slots_per_gpu {self.slots_per_gpu} exceeds max_slots_per_gpu {self.max_slots_per_gpu}")
        for cat, pinned in self.assignment.items():
            if not cat or not pinned:
                raise ValueError(f"assignment {cat!r}: a category pinned to at least one GPU")
            for g in pinned:
                if g in self.exclude_gpus or (self.gpus != "all" and g not in self.gpus):
                    raise ValueError(f"assignment pins {cat!r} to GPU {g}, which exclude_gpus or gpus rule out")
        return self

    @classmethod
    def load(cls, data: dict[str, Any], source: str = "placement") -> PlacementPolicy:
        """Validate ``data``; ConfigError with one line naming ``source`` and the field at fault."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "policy"
            raise ConfigError(f"{source}: {where}: {err['msg']}") from e


@dataclass(frozen=True)
class Decision:
    """What the policy makes of one GPU now."""

    index: int
    usable: bool
    slots: int  # worker slots on this GPU, own workers included; 0 when not usable
    reason: str  # one line for logs and `fleet gpus`
    free_mib: int  # free memory as the fleet sees it (own workers' memory counted free)
    total_mib: int
    held: bool  # a fleet worker already runs here
    possible: bool  # could pass under this policy on some day (in pool, not excluded, large enough)
    slots_why: str = ""  # how the slots were counted ("fixed", "packed: ...", "auto: ..."); "" when not usable

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gib(mib: int) -> str:
    """MiB as GiB text for reasons and messages ("35.0 GiB")."""
    return f"{mib / 1024:.1f} GiB"


def required_free_mib(policy: PlacementPolicy) -> int:
    """Free MiB a GPU needs: min_free_mib, and room for one packed sample or for every fixed slot."""
    per_sample = policy.slot_memory_mib or 0
    slots = policy.slots_per_gpu if policy.slots == "fixed" else 1
    return max(policy.min_free_mib, slots * per_sample)


def max_usable(possible: int, reserve: int) -> int:
    """Most GPUs the fleet holds with ``possible`` qualifying GPUs and reserve k (§5.2)."""
    return _reserve_allows(possible, reserve)


def _reserve_allows(qualifying: int, reserve: int) -> int:
    """§5.2 over every qualifying GPU, the fleet's own counted as free: fewer than k -> none,
    exactly k -> one (the special case: work still progresses), more than k -> all but k.

    The seed's serial script applies the rule to the GPUs it does not hold yet and repeats
    it for each new command, so its special case fires again and again: with k = 1 it ends
    up holding every GPU. Counting the fleet's own GPUs makes the rule a steady state that
    long-lived workers can keep: the fleet never holds more than this, and gives back
    (after the running sample) what a colleague's arrival makes too many.
    """
    if qualifying < reserve:
        return 0
    return 1 if qualifying == reserve and reserve else qualifying - reserve


def check_feasible(snapshots: Sequence[GpuSnapshot], policy: PlacementPolicy) -> None:
    """Raise PlacementError (one line) if no state of these GPUs could ever satisfy the policy.

    A host without GPUs and an ``all`` pool is feasible: it runs CPU workers.
    """
    present = {s.index for s in snapshots}
    have = f"GPUs {sorted(present)}" if present else "no GPUs"
    wanted = [("gpus lists", g) for g in ([] if policy.gpus == "all" else policy.gpus)]
    wanted += [(f"assignment pins {cat!r} to", g) for cat, pinned in policy.assignment.items() for g in pinned]
    for what, g in wanted:
        if g not in present:
            raise PlacementError(f"{what} GPU {g}, but this host has {have}")
    if not snapshots:
        return
    pool = [s for s in snapshots if in_pool(s.index, policy)]
    if not pool:
        raise PlacementError(f"every GPU of this host ({sorted(present)}) is excluded or outside gpus")
    need = required_free_mib(policy)
    big = max(pool, key=lambda s: s.memory_total_mib)
    if need > big.memory_total_mib:
        has = gib(big.memory_total_mib)
        raise PlacementError(f"a GPU must have {gib(need)} free, but the largest in the pool (GPU {big.index}) has {has}")
    possible = sum(s.memory_total_mib >= need for s in pool)
    if max_usable(possible, policy.reserve) == 0:
        raise PlacementError(f"reserve {policy.reserve} leaves no GPU: only {possible} GPUs can ever qualify")
    totals = {s.index: s.memory_total_mib for s in snapshots}
    for cat, pinned in policy.assignment.items():
        if all(totals[g] < need for g in pinned):
            raise PlacementError(f"assignment pins {cat!r} to GPUs {pinned}, none with {gib(need)} of memory")


def in_pool(index: int, policy: PlacementPolicy) -> bool:
    """The GPU is in the policy's pool and not excluded."""
    return index not in policy.exclude_gpus and (policy.gpus == "all" or index in policy.gpus)


def _colleague_use(snap: GpuSnapshot, own_pids: Set[int], leaving: Set[int] = frozenset()
                   ) -> tuple[int, int | None, list[int], bool]:
    """(memory used by others MiB, utilisation by others % or None, own pids here, any foreign process).
    ``leaving``: fleet workers draining; their memory and utilisation are the fleet's, but they
    do not make the GPU held."""
    mine = sorted(p.pid for p in snap.processes if p.pid in own_pids)
    own_pids = own_pids | leaving
    own = [p for p in snap.processes if p.pid in own_pids]
    foreign = any(p.pid not in own_pids for p in snap.processes)
    if own and not foreign and any(p.used_mib is None for p in own):
        used = 0  # every listed process is ours and the driver hides how much: all of it is ours
    else:
        used = max(0, snap.memory_used_mib - sum(p.used_mib or 0 for p in own))
    util = 0 if own and not foreign else snap.utilization_pct
    return used, util, mine, foreign


def _slots(free_mib: int, total_mib: int, policy: PlacementPolicy, measure: SlotMeasure | None) -> tuple[int, str]:
    if policy.slots == "fixed":
        return policy.slots_per_gpu, "fixed"
    if policy.slots == "auto":
        return auto_slots(free_mib, total_mib, policy, measure)
    # §14.1: floor(free / declared) with no margin subtracted; the seed puts the margin in
    # the declared figure instead (§10.2, §14.8 Q1).
    per = policy.slot_memory_mib or 1
    fit = free_mib // per
    how = f"packed: floor({free_mib}/{per})"
    if fit > policy.max_slots_per_gpu:
        how += f" = {fit}, capped at {policy.max_slots_per_gpu}"
    return min(fit, policy.max_slots_per_gpu), how


def _judge(s: GpuSnapshot, policy: PlacementPolicy, own_pids: Set[int], need: int, ours: bool,
           leaving: Set[int] = frozenset(), measure: SlotMeasure | None = None) -> Decision:
    """One GPU against pool, exclude, free memory and exclusive idleness; the reserve comes later."""
    used, util, mine, foreign = _colleague_use(s, own_pids, leaving)
    free = s.memory_free_mib + (s.memory_used_mib - used)
    possible = in_pool(s.index, policy) and s.memory_total_mib >= need
    common: dict[str, Any] = dict(index=s.index, free_mib=free, total_mib=s.memory_total_mib,
                                  held=bool(mine) or ours, possible=possible)
    head, util_txt = f"GPU {s.index}:", "util n/a" if util is None else f"util {util}%"
    used_pct = 100.0 * used / s.memory_total_mib if s.memory_total_mib else 0.0
    fail = None
    if s.index in policy.exclude_gpus:
        fail = f"{head} excluded (exclude_gpus)"
    elif not in_pool(s.index, policy):
        fail = f"{head} not in the GPU pool {policy.gpus}"
    elif free < need:
        fail = f"{head} {gib(free)} free < {gib(need)} needed"
    elif policy.mode == "exclusive" and policy.slots != "packed":
        # §13.2: utilisation 0 % and memory used < 3 %. Unknown utilisation counts as idle only
        # when no foreign process is listed; else exclusive could never run on such a driver.
        idle_util = util == 0 or (util is None and not foreign)
        if not (idle_util and used_pct < policy.exclusive_max_used_pct):
            fail = (f"{head} not idle for exclusive mode ({util_txt}, memory used {used_pct:.1f}%"
                    f" vs < {policy.exclusive_max_used_pct:g}%)")
    slots, how = _slots(free, s.memory_total_mib, policy, measure) if fail is None else (0, "")
    if fail is None and slots < 1:
        fail = f"{head} room for no sample ({how})"
    if fail is not None:
        return Decision(usable=False, slots=0, reason=fail, **common)
    note = f", memory used {used_pct:.1f}%" if policy.mode == "exclusive" else ""
    if policy.mode == "exclusive" and policy.slots == "packed":
        note += ", exclusive ignored: packed takes precedence"
    if mine:
        note += f"; held by fleet pids {','.join(map(str, mine))}"
    plural = "s" if slots != 1 else ""
    reason = f"{head} {gib(free)} free >= {gib(need)}, {util_txt}{note} -> {slots} slot{plural} ({how})"
    return Decision(usable=True, slots=slots, reason=reason, slots_why=how, **common)


def eligible_gpus(
    snapshots: Sequence[GpuSnapshot],
    policy: PlacementPolicy,
    own_pids: Set[int] = frozenset(),
    fleet_gpus: Set[int] = frozenset(),
    leaving_pids: Set[int] = frozenset(),
    measures: Mapping[int, SlotMeasure] | None = None,
) -> list[Decision]:
    """One Decision per GPU: usable ones first, most free memory first (§13.1), then the rest by index.

    Checks in the seed's order (§5.1): pool and exclude, free memory, exclusive idleness
    (§13.2; skipped when packed, which takes precedence as EXTREME_MODE does), then the
    reserve over every GPU that passes (§5.2), keeping the fleet's own GPUs first, then
    the most-free ones. ``fleet_gpus`` are the GPUs the caller runs workers on: held even
    before their process shows in NVML (a worker loading its model has no CUDA context
    yet), so the choice does not hop between GPUs of nearly equal free memory. ``leaving_pids``:
    fleet workers draining, whose memory is the fleet's (else draining one slot of a packed GPU
    would make room look short and drain the next). ``measures``: per GPU, what auto slots
    counts from (fleet.slot_plans).
    Raises PlacementError when the policy can never be met here (check_feasible).
    """
    check_feasible(snapshots, policy)
    need = required_free_mib(policy)
    judged = [_judge(s, policy, own_pids, need, s.index in fleet_gpus, leaving_pids, (measures or {}).get(s.index))
              for s in snapshots]
    out = {d.index: d for d in judged if not d.usable}
    # Held GPUs first (a worker keeps its GPU rather than hop to a slightly freer one),
    # then most free memory first (§13.1).
    qualifying = sorted((d for d in judged if d.usable), key=lambda d: (not d.held, -d.free_mib, d.index))
    take = _reserve_allows(len(qualifying), policy.reserve)
    rule = f"reserve {policy.reserve}: {len(qualifying)} qualifying GPUs -> {take} for the fleet"
    for i, d in enumerate(qualifying):
        if policy.reserve == 0:
            out[d.index] = d
        elif i < take:
            out[d.index] = replace(d, reason=f"{d.reason}; {rule}")
        else:
            verb = "given back to" if d.held else "left for"
            out[d.index] = replace(d, usable=False, slots=0, reason=f"GPU {d.index}: {verb} colleagues ({rule})")
    usable = sorted((out[d.index] for d in qualifying if out[d.index].usable), key=lambda d: (-d.free_mib, d.index))
    return usable + [out[i] for i in sorted(out) if not out[i].usable]


def choose_group(
    decisions: Sequence[Decision], n: int, policy: PlacementPolicy, memory_mib: int = 0
) -> list[int] | None:
    """n usable GPUs with ``memory_mib`` free each, most free first (§13.1), in that order
    (``${available_gpu_0}`` is the first); None to wait; [] for n = 0 (a CPU task).

    Raises PlacementError when n GPUs can never be had here: more than max_usable of the
    GPUs that could ever qualify for ``memory_mib``.
    """
    if n < 0:
        raise PlacementError(f"a task cannot need {n} GPUs")
    if n == 0:
        return []
    possible = sum(d.possible and d.total_mib >= memory_mib for d in decisions)
    most = max_usable(possible, policy.reserve)
    if n > most:
        raise PlacementError(
            f"a task needs {n} GPUs with {gib(memory_mib)} each, but at most {most} can ever be usable here "
            f"({possible} qualify, reserve {policy.reserve})"
        )
    fits = [d for d in decisions if d.usable and d.free_mib >= memory_mib]
    fits.sort(key=lambda d: (-d.free_mib, d.index))
    return [d.index for d in fits[:n]] if len(fits) >= n else None


class _NeedsGpus(Protocol):
    @property
    def n_gpus(self) -> int: ...


R = TypeVar("R", bound=_NeedsGpus)


@dataclass(frozen=True)
class GpuRequest:
    """What a task asks of the GPUs: how many, and free memory on each (MiB)."""

    n_gpus: int = 1
    memory_mib: int = 0
    label: str = ""


def order_requests(requests: Iterable[R]) -> list[R]:
    """Multi-GPU work first (§5.3: more GPUs before fewer, CPU-only last); stable otherwise,
    so requests needing as many GPUs keep their given order."""
    return sorted(requests, key=lambda r: -r.n_gpus)
