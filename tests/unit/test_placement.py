"""Placement policy: the rules of seed 003 (§5.2 reserve, §13 exclusive / most-free-first,
§14 packing) and seed 000 (exclude, min free memory, manual assignment), as tables."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from fleet.errors import ConfigError, PlacementError
from fleet.gpu_inventory import GpuProcess, GpuSnapshot
from fleet.placement import (
    Decision,
    GpuRequest,
    PlacementPolicy,
    check_feasible,
    choose_group,
    eligible_gpus,
    max_usable,
    order_requests,
)
from fleet.routing import memory_class_for, next_memory_class, queue_for_sample, queues_for_gpu

GB = 1024  # the seed's "GB" are GiB: its logs show 12 GB as 12288 MB (§14.1)
TOTAL_80 = 80 * GB  # nvidia-smi's 81920 MiB for an 80 GB A800 / A100
OWN = 4242  # a pid standing for one of the fleet's own workers


def gpu(index: int, *, used: int = 0, free: int | None = None, total: int = TOTAL_80, util: int | None = 0,
        procs: tuple[GpuProcess, ...] = ()) -> GpuSnapshot:
    return GpuSnapshot(index=index, uuid=f"GPU-{index}", name="A800", memory_total_mib=total, memory_used_mib=used,
                       memory_free_mib=total - used if free is None else free, utilization_pct=util, processes=procs)


def own(index: int, *, used: int = 12 * GB, **kw) -> GpuSnapshot:
    """A GPU where one fleet worker holds ``used`` MiB."""
    return gpu(index, used=used, procs=(GpuProcess(pid=OWN, used_mib=used),), **kw)


def by_index(decisions: list[Decision]) -> dict[int, Decision]:
    return {d.index: d for d in decisions}


# ---- §5.2 reserve (RESERVED_GPUS=2) -------------------------------------------------------------
# (GPUs with enough memory, of them held by the fleet, expected GPUs the fleet may newly take)
RESERVE_TABLE = [
    (8, 0, 6),  # 8 free: take 6, leave 2
    (5, 1, 2),  # 4 free: take 2
    (4, 1, 1),  # 3 free: take 1
    # The seed takes 1 here (2 free = reserve, the special case), but its serial script
    # re-applies the special case to every new command: with reserve 1 it ends up on every
    # GPU. fleet counts its own GPUs among the qualifying ones: 3 qualifying, reserve 2 ->
    # 1 for the fleet, which it holds already; the special case still lets a fleet that
    # holds nothing start on exactly k free GPUs (test below).
    (3, 1, 0),
    (2, 1, 0),  # 1 free < reserve: wait
]


@pytest.mark.parametrize(("satisfying", "held", "takes"), RESERVE_TABLE)
def test_reserve_follows_seed_003_table(satisfying: int, held: int, takes: int) -> None:
    # An 8-GPU host; GPUs beyond `satisfying` lack memory, so they count neither way.
    snaps = [own(i) if i < held else gpu(i) for i in range(satisfying)]
    snaps += [gpu(i, used=75 * GB) for i in range(satisfying, 8)]
    ds = eligible_gpus(snaps, PlacementPolicy(min_free_mib=35 * GB, reserve=2), own_pids={OWN})
    newly = [d for d in ds if d.usable and not d.held]
    assert len(newly) == takes
    assert all(d.usable for d in ds if d.held)  # no row asks the fleet to give a GPU back
    left = [d for d in ds if "left for colleagues" in d.reason]
    assert len(left) == satisfying - held - takes


def test_reserve_special_case_lets_an_idle_fleet_start_and_holds_steady() -> None:
    policy = PlacementPolicy(min_free_mib=35 * GB, reserve=2)
    assert sum(d.usable for d in eligible_gpus([gpu(0), gpu(1)], policy)) == 1  # 2 free = k: one
    # Once the fleet holds one, the next evaluation keeps exactly that one.
    ds = eligible_gpus([own(0), gpu(1)], policy, own_pids={OWN})
    assert [d.index for d in ds if d.usable] == [0]


def test_reserve_one_on_two_gpus_keeps_one_free_for_good() -> None:
    policy = PlacementPolicy(reserve=1)
    first = [d.index for d in eligible_gpus([gpu(0), gpu(1, used=GB)], policy) if d.usable]
    assert first == [0]
    again = [d.index for d in eligible_gpus([own(0), gpu(1)], policy, own_pids={OWN}) if d.usable]
    assert again == [0]  # held first: no hop to the other GPU, no second GPU


def test_a_colleague_arriving_makes_the_fleet_give_a_gpu_back() -> None:
    policy = PlacementPolicy(min_free_mib=35 * GB, reserve=1)
    held = [own(0), own(1, used=2 * GB), gpu(2)]  # 3 qualifying, reserve 1: the fleet holds 2
    assert sum(d.usable for d in eligible_gpus(held, policy, own_pids={OWN})) == 2
    colleague = gpu(2, used=70 * GB, procs=(GpuProcess(pid=777, used_mib=70 * GB, user="alice"),))
    ds = by_index(eligible_gpus([own(0), own(1, used=2 * GB), colleague], policy, own_pids={OWN}))
    assert (ds[0].usable, ds[1].usable, ds[2].usable) == (True, False, False)
    assert "given back to colleagues" in ds[1].reason


def test_reserve_leaves_the_least_free_gpus() -> None:
    snaps = [gpu(i, used=i * GB) for i in range(4)]  # GPU 0 most free ... GPU 3 least
    ds = by_index(eligible_gpus(snaps, PlacementPolicy(reserve=2)))
    assert [i for i, d in sorted(ds.items()) if d.usable] == [0, 1]
    assert ds[3].reason == "GPU 3: left for colleagues (reserve 2: 4 qualifying GPUs -> 2 for the fleet)"


def test_reserve_zero_uses_everything_and_one_gpu_host_with_reserve_one_still_runs() -> None:
    assert all(d.usable for d in eligible_gpus([gpu(i) for i in range(3)], PlacementPolicy(reserve=0)))
    assert eligible_gpus([gpu(0)], PlacementPolicy(reserve=1))[0].usable  # free = k = 1: one GPU


@pytest.mark.parametrize(("possible", "reserve", "most"), [(8, 0, 8), (8, 2, 6), (2, 2, 1), (1, 2, 0)])
def test_max_usable_follows_the_reserve_rule_over_all_qualifying_gpus(possible: int, reserve: int, most: int) -> None:
    assert max_usable(possible, reserve) == most


# ---- §13.2 exclusive vs shared; §13.1 most free first; §13.3 log lines ---------------------------
# (state, utilisation %, memory used %, usable shared, usable exclusive); need 35 GB as in §13.3
EXCLUSIVE_TABLE = [
    ("idle", 0, 1, True, True),
    ("light", 5, 10, True, False),
    ("medium", 30, 50, True, False),
    ("memory full", 0, 80, False, False),
]


@pytest.mark.parametrize(("state", "util", "used_pct", "shared", "exclusive"), EXCLUSIVE_TABLE)
def test_exclusive_vs_shared_follows_seed_003_table(state: str, util: int, used_pct: int, shared: bool,
                                                    exclusive: bool) -> None:
    snap = gpu(0, used=TOTAL_80 * used_pct // 100, util=util)
    for mode, expected in (("shared", shared), ("exclusive", exclusive)):
        d = eligible_gpus([snap], PlacementPolicy(min_free_mib=35 * GB, mode=mode))[0]
        assert d.usable is expected, (state, mode, d.reason)


def test_exclusive_threshold_is_strictly_below_three_percent() -> None:
    policy = PlacementPolicy(mode="exclusive")
    at = eligible_gpus([gpu(0, total=100_000, used=3000)], policy)[0]  # exactly 3 %
    below = eligible_gpus([gpu(0, total=100_000, used=2999)], policy)[0]
    assert (at.usable, below.usable) == (False, True)
    assert "not idle for exclusive mode (util 0%, memory used 3.0%" in at.reason


def test_most_free_first_seed_013_1_example() -> None:
    snaps = [gpu(0, free=40 * GB), gpu(1, free=45 * GB), gpu(2, free=35 * GB)]
    ds = eligible_gpus(snaps, PlacementPolicy())
    assert [d.index for d in ds] == [1, 0, 2]
    assert choose_group(ds, 1, PlacementPolicy()) == [1]


def test_reasons_read_like_the_seed_logs() -> None:
    ds = by_index(eligible_gpus([gpu(0, used=35 * GB), gpu(3, used=70 * GB)], PlacementPolicy(min_free_mib=35 * GB)))
    assert ds[0].reason == "GPU 0: 45.0 GiB free >= 35.0 GiB, util 0% -> 1 slot (fixed)"
    assert ds[3].reason == "GPU 3: 10.0 GiB free < 35.0 GiB needed"


# ---- own workers -------------------------------------------------------------------------------
def test_own_workers_memory_and_utilisation_are_not_colleagues() -> None:
    busy_with_us = own(0, used=20 * GB, util=90)
    policy = PlacementPolicy(mode="exclusive", min_free_mib=70 * GB)
    mine = eligible_gpus([busy_with_us], policy, own_pids={OWN})[0]
    assert (mine.usable, mine.held, mine.free_mib) == (True, True, TOTAL_80)
    assert not eligible_gpus([busy_with_us], policy)[0].usable  # the same GPU seen as a colleague's


def test_a_colleague_on_a_held_gpu_breaks_exclusive() -> None:
    procs = (GpuProcess(pid=OWN, used_mib=10 * GB), GpuProcess(pid=7, used_mib=1))
    snap = gpu(0, used=10 * GB + 1, util=40, procs=procs)
    d = eligible_gpus([snap], PlacementPolicy(mode="exclusive"), own_pids={OWN})[0]
    assert not d.usable and "util 40%" in d.reason


def test_own_process_with_hidden_memory_counts_as_ours() -> None:
    snap = gpu(0, used=30 * GB, util=70, procs=(GpuProcess(pid=OWN, used_mib=None),))
    assert eligible_gpus([snap], PlacementPolicy(mode="exclusive"), own_pids={OWN})[0].usable


# ---- §14.1 / §14.6 packing ("extreme mode") ------------------------------------------------------
# 79.15 GiB: the capacity CUDA reports for an 80 GB card (seed 003 §14.4's OOM message).
A800_FREE = 81050
# (case, colleagues' MiB used, free MiB, declared MiB per sample, slots)
PACKING_TABLE = [
    ("§3.2/§14.1 scenario 2: 16 GB used, 12 GB each", 16 * GB, 64 * GB, 12 * GB, 5),
    ("§14.6 case 1: 10 GB each, 7 per GPU", 0, A800_FREE, 10 * GB, 7),
    ("§14.6 case 2: 15 GB each, 5 per GPU", 0, A800_FREE, 15 * GB, 5),
]


@pytest.mark.parametrize(("case", "used", "free", "per", "slots"), PACKING_TABLE)
def test_packed_slots_follow_seed_003_examples(case: str, used: int, free: int, per: int, slots: int) -> None:
    policy = PlacementPolicy(slots="packed", slot_memory_mib=per, max_slots_per_gpu=8)
    d = eligible_gpus([gpu(0, used=used, free=free, util=20)], policy)[0]
    assert (d.usable, d.slots) == (True, slots), case
    assert f"(packed: floor({free}/{per}))" in d.reason


def test_packed_is_capped_and_counts_own_workers_memory_as_free() -> None:
    capped = eligible_gpus([gpu(0, free=A800_FREE)], PlacementPolicy(slots="packed", slot_memory_mib=10 * GB))[0]
    assert capped.slots == 4 and "= 7, capped at 4" in capped.reason
    # A fleet worker holds 12 GB and colleagues 16 GB: the worker's slot is among the 5.
    snap = gpu(0, used=28 * GB, procs=(GpuProcess(pid=OWN, used_mib=12 * GB), GpuProcess(pid=9, used_mib=16 * GB)))
    d = eligible_gpus([snap], PlacementPolicy(slots="packed", slot_memory_mib=12 * GB, max_slots_per_gpu=8), {OWN})[0]
    assert (d.slots, d.held) == (5, True)


def test_packed_takes_precedence_over_exclusive() -> None:
    busy = gpu(0, used=16 * GB, util=20)  # a colleague's GPU: not idle
    d = eligible_gpus([busy], PlacementPolicy(mode="exclusive", slots="packed", slot_memory_mib=12 * GB))[0]
    assert d.usable and "exclusive ignored" in d.reason


def test_fixed_slots_need_room_for_every_slot() -> None:
    policy = PlacementPolicy(slots_per_gpu=2, slot_memory_mib=30 * GB)
    ds = by_index(eligible_gpus([gpu(0, used=10 * GB), gpu(1, used=30 * GB)], policy))
    assert (ds[0].usable, ds[0].slots, ds[1].usable) == (True, 2, False)


# ---- seed 000: exclude, min free memory, pool ------------------------------------------------------
def test_exclude_pool_and_min_free() -> None:
    snaps = [gpu(0), gpu(1, used=70 * GB), gpu(2), gpu(3)]
    ds = by_index(eligible_gpus(snaps, PlacementPolicy(gpus=[0, 1, 3], exclude_gpus=[3], min_free_mib=20 * GB)))
    assert [i for i, d in sorted(ds.items()) if d.usable] == [0]
    assert ds[1].reason == "GPU 1: 10.0 GiB free < 20.0 GiB needed"
    assert "not in the GPU pool" in ds[2].reason and "excluded" in ds[3].reason
    assert not ds[3].possible and ds[1].possible


@pytest.mark.parametrize(("policy", "message"), [
    (PlacementPolicy(gpus=[0, 9]), "gpus lists GPU 9, but this host has GPUs [0, 1]"),
    (PlacementPolicy(min_free_mib=90 * GB), "largest in the pool (GPU 0) has 80.0 GiB"),
    (PlacementPolicy(exclude_gpus=[0, 1]), "every GPU of this host"),
    (PlacementPolicy(reserve=3), "reserve 3 leaves no GPU: only 2 GPUs can ever qualify"),
    (PlacementPolicy(assignment={"camera_motion": [5]}), "pins 'camera_motion' to GPU 5"),
])
def test_impossible_requests_raise_one_line(policy: PlacementPolicy, message: str) -> None:
    with pytest.raises(PlacementError, match=re.escape(message)) as e:
        eligible_gpus([gpu(0), gpu(1)], policy)
    assert "\n" not in str(e.value)


def test_host_without_gpus_is_feasible_for_all_but_not_for_a_list() -> None:
    assert eligible_gpus([], PlacementPolicy()) == []
    with pytest.raises(PlacementError, match="this host has no GPUs"):
        check_feasible([], PlacementPolicy(gpus=[0]))


@pytest.mark.parametrize(("data", "field"), [
    ({"slots": "packed"}, "slot_memory_mib"),
    ({"slots_per_gpu": 5}, "max_slots_per_gpu"),
    ({"assignment": {"a": [1]}, "exclude_gpus": [1]}, "exclude_gpus or gpus"),
    ({"gpus": []}, "non-empty"),
    ({"reserve": -1}, "reserve"),
    ({"reserved": 1}, "reserved"),
])
def test_bad_policies_are_rejected(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as e:
        PlacementPolicy.load(data, source="fleet.yaml")
    assert str(e.value).startswith("fleet.yaml: ") and "\n" not in str(e.value)
    with pytest.raises(ValidationError):
        PlacementPolicy(**data)


# ---- multi-GPU --------------------------------------------------------------------------------
def test_choose_group_most_free_first_waits_or_refuses() -> None:
    snaps = [gpu(0, used=10 * GB), gpu(1), gpu(2, used=5 * GB), gpu(3, used=60 * GB)]
    policy = PlacementPolicy()
    ds = eligible_gpus(snaps, policy)
    assert choose_group(ds, 2, policy) == [1, 2]
    assert choose_group(ds, 3, policy, memory_mib=71 * GB) is None  # only GPUs 1 and 2 have 71 GB free: wait
    assert choose_group(ds, 0, policy) == []
    with pytest.raises(PlacementError, match="needs 5 GPUs"):
        choose_group(ds, 5, policy)
    reserved = PlacementPolicy(reserve=2)
    assert choose_group(eligible_gpus(snaps, reserved), 2, reserved) == [1, 2]
    with pytest.raises(PlacementError, match="at most 2 can ever be usable"):
        choose_group(eligible_gpus(snaps, reserved), 3, reserved)


def test_multi_gpu_requests_go_first_stably() -> None:
    reqs = [GpuRequest(1, label="a"), GpuRequest(2, label="b"), GpuRequest(0, label="cpu"),
            GpuRequest(4, label="c"), GpuRequest(1, label="d"), GpuRequest(2, label="e")]
    assert [r.label for r in order_requests(reqs)] == ["c", "b", "e", "a", "d", "cpu"]


# ---- queues and memory classes -----------------------------------------------------------------------
CLASSES = [24 * GB, 48 * GB, 80 * GB]


def test_queues_for_unpinned_gpu_take_fitting_memory_classes_and_the_shared_queue() -> None:
    policy = PlacementPolicy(assignment={"camera_motion": [0, 1], "镜头仰角旋转": [1]})
    small = queues_for_gpu(2, gpu(2, total=48 * GB), policy, "lab", CLASSES)
    assert small == ["lab.q.mem49152", "lab.q.mem24576", "lab.q.gpu"]
    big = queues_for_gpu(3, gpu(3), policy, "lab", CLASSES)
    assert big == ["lab.q.mem81920", "lab.q.mem49152", "lab.q.mem24576", "lab.q.gpu"]
    # Pinned GPUs serve only their pins, named by the GPU set (no category text in queue names).
    assert queues_for_gpu(0, gpu(0), policy, "lab", CLASSES) == ["lab.q.pin.0-1"]
    assert queues_for_gpu(1, gpu(1), policy, "lab", CLASSES) == ["lab.q.pin.0-1", "lab.q.pin.1"]


def test_queue_for_sample_routes_pins_multi_gpu_and_memory_classes() -> None:
    policy = PlacementPolicy(assignment={"camera motion, wide": [1, 0]})
    assert queue_for_sample("camera motion, wide", 0, policy, "lab", CLASSES) == "lab.q.pin.0-1"
    assert queue_for_sample("other", 30 * GB, policy, "lab", CLASSES) == "lab.q.mem49152"
    assert queue_for_sample("other", 30 * GB, policy, "lab", []) == "lab.q.gpu"
    assert queue_for_sample("other", 0, policy, "lab", CLASSES, n_gpus=2) == "lab.q.gpus2"
    with pytest.raises(PlacementError, match="exceeds the largest memory class"):
        queue_for_sample("other", 90 * GB, policy, "lab", CLASSES)
    with pytest.raises(PlacementError, match="GPU 2 is excluded"):
        queues_for_gpu(2, gpu(2), PlacementPolicy(exclude_gpus=[2]), "lab", CLASSES)


@pytest.mark.parametrize(("need", "cls"), [(0, 24 * GB), (24 * GB, 24 * GB), (24 * GB + 1, 48 * GB), (80 * GB, 80 * GB)])
def test_memory_class_for_picks_the_smallest_that_holds(need: int, cls: int) -> None:
    assert memory_class_for(need, reversed(CLASSES)) == cls


def test_memory_class_errors_and_escalation() -> None:
    with pytest.raises(PlacementError, match="exceeds the largest memory class"):
        memory_class_for(81 * GB, CLASSES)
    with pytest.raises(ConfigError):
        memory_class_for(1, [0, 1024])
    assert next_memory_class(24 * GB, CLASSES) == 48 * GB
    assert next_memory_class(30 * GB, CLASSES) == 48 * GB
    assert next_memory_class(80 * GB, CLASSES) is None


def test_a_gpu_the_fleet_just_started_on_stays_chosen_before_nvml_shows_its_process() -> None:
    policy = PlacementPolicy(reserve=1)
    # GPU 1 is a little freer, but the fleet has just started a worker on GPU 0 that has no
    # CUDA context yet: without fleet_gpus the choice would hop to GPU 1 and back.
    snaps = [gpu(0, used=600), gpu(1, used=480)]
    assert [d.index for d in eligible_gpus(snaps, policy) if d.usable] == [1]
    assert [d.index for d in eligible_gpus(snaps, policy, fleet_gpus={0}) if d.usable] == [0]
