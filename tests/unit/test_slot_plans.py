"""Auto slots (`fleet up --slots auto`): the arithmetic over a measured peak (margin, cap,
colleagues' memory, no measurement yet, the shrink band), which peaks count, and the
worker's measurement (fake inventory for NVML; torch's figures stubbed, as this host has no CUDA)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fleet.contract import WorkerEntry
from fleet.gpu_inventory import FakeInventory, GpuProcess, GpuSnapshot
from fleet.placement import PlacementPolicy, eligible_gpus
from fleet.slot_plans import SlotMeasure, measures, read_plans, slots_text

GB = 1024
TOTAL = 80 * GB  # margin 10 % = 8 GiB
OWN, OTHER = 4242, 777
AUTO = PlacementPolicy(slots="auto")


def gpu(*, colleague: int = 0, own: int = 0, util: int = 0, leaving: int = 0) -> GpuSnapshot:
    """GPU 0 with a colleague's and the fleet's worker's memory (MiB), each as a listed process."""
    procs = [GpuProcess(pid=p, used_mib=m) for p, m in ((OTHER, colleague), (OWN, own), (OWN + 1, leaving)) if m]
    used = colleague + own + leaving
    return GpuSnapshot(index=0, uuid="GPU-0", name="A800", memory_total_mib=TOTAL, memory_used_mib=used,
                       memory_free_mib=TOTAL - used, utilization_pct=util, processes=tuple(procs))


def decide(snap: GpuSnapshot, m: SlotMeasure | None, policy: PlacementPolicy = AUTO, **kw):
    return eligible_gpus([snap], policy, own_pids={OWN}, measures={0: m} if m else None, **kw)[0]


# (case, colleagues' MiB, measured peak MiB, samples, expected slots, text in the reason)
TABLE = [
    ("nothing measured yet", 0, None, 0, 1, "auto: measuring, 0 of 2 samples"),
    ("one sample is not enough", 0, 20 * GB, 1, 1, "auto: measuring, 1 of 2 samples"),
    ("80 GiB - 8 margin = 72, 20 each", 0, 20 * GB, 2,  3,
     "auto: peak 20.0 GiB/sample measured over 2 samples, 72.0 GiB usable after 8.0 GiB margin"),
    ("margin decides: 4 x 18 = 72 fits, 4 x 18.5 does not", 0, 18 * GB + 512, 2, 3, "72.0 GiB usable"),
    ("colleagues' 30 GiB are not free", 30 * GB, 20 * GB, 3, 2, "42.0 GiB usable"),
    ("capped at max_slots_per_gpu", 0, 5 * GB, 2, 4, "14 fit, capped at 4"),
    ("room for none keeps the one slot", 55 * GB, 20 * GB, 2, 1, "room for none: keeps 1"),
]


@pytest.mark.parametrize(("case", "colleague", "peak", "samples", "slots", "text"), TABLE)
def test_auto_slots_arithmetic(case: str, colleague: int, peak: int | None, samples: int, slots: int, text: str) -> None:
    own = 0 if peak is None else peak  # the measuring worker holds its peak; it counts as free
    d = decide(gpu(colleague=colleague, own=own), SlotMeasure(peak, samples, running=1))
    assert (d.usable, d.slots) == (True, slots), case
    assert text in d.reason and text in d.slots_why, (case, d.reason)
    assert slots_text(d.to_dict()).startswith(f"{slots} slot{'s' if slots != 1 else ''} (auto: ")


def test_own_memory_counts_free_only_for_own_pids() -> None:
    snap = gpu(colleague=10 * GB, own=20 * GB)
    m = SlotMeasure(20 * GB, 2, running=1)
    assert decide(snap, m).slots == 3  # 80 - 10 - 8 = 62 usable
    seen_as_colleague = eligible_gpus([snap], AUTO, measures={0: m})[0]
    assert seen_as_colleague.slots == 2  # 80 - 30 - 8 = 42


def test_shrinking_keeps_running_slots_within_half_the_margin() -> None:
    m = SlotMeasure(20 * GB, 4, running=3)
    # Colleagues take 13 GiB: 67 - 8 = 59 GiB usable fits 2 x 20, but the 3 running (60 GiB) fit
    # within half the margin (67 - 4 = 63): kept, no drain for a wobble.
    d = decide(gpu(colleague=13 * GB, own=60 * GB), m)
    assert d.slots == 3 and "keeps 3: they fit within half the margin" in d.reason
    # 17 GiB taken: 60 > 63 - 4 -> down to floor((63 - 8) / 20) = 2; from 1 slot, 13 GiB taken grows only to 2.
    assert decide(gpu(colleague=17 * GB, own=60 * GB), m).slots == 2
    assert decide(gpu(colleague=13 * GB, own=20 * GB), SlotMeasure(20 * GB, 4, running=1)).slots == 2


def test_a_draining_workers_memory_is_the_fleets_but_does_not_hold_the_gpu() -> None:
    snap = gpu(own=20 * GB, leaving=20 * GB)
    m = SlotMeasure(20 * GB, 4, running=1)
    assert decide(snap, m, leaving_pids={OWN + 1}).slots == 3
    assert decide(snap, m).slots == 2  # without: the leaving worker's 20 GiB look like a colleague's
    alone = eligible_gpus([gpu(leaving=20 * GB)], AUTO, leaving_pids={OWN + 1})[0]
    assert not alone.held


def test_exclusive_still_applies_to_auto() -> None:
    policy = PlacementPolicy(slots="auto", mode="exclusive")
    assert not decide(gpu(colleague=4 * GB, util=30), None, policy).usable
    mine = decide(gpu(own=20 * GB, util=90), SlotMeasure(20 * GB, 2, running=1), policy)
    assert (mine.usable, mine.slots) == (True, 3)


def entry(name: str, pid: int, gpus: tuple[int, ...], peak: int | None, samples: int, host: str = "h") -> WorkerEntry:
    return WorkerEntry(name=f"{name}@{host}", hostname=host, pid=pid, gpus=gpus, queues=[], peak_mib=peak,
                       peak_samples=samples, seen_at=time.time())


def test_measures_take_the_largest_peak_of_this_supervisors_workers() -> None:
    ws = [entry("gpu0", 1, (0,), 10 * GB, 2), entry("gpu0s1", 2, (0,), 12 * GB, 1),
          entry("gpu0s2", 99, (0,), 60 * GB, 9),  # an earlier fleet's entry: not our pid
          entry("gpu0", 3, (0,), 70 * GB, 9, host="other"),  # another host's GPU 0
          entry("gpus0-1", 4, (0, 1), 70 * GB, 9), entry("gpu1", 5, (1,), None, 0)]
    got = measures(ws, "h", {1, 2, 3, 4, 5}, {0: 2, 1: 1})
    assert got == {0: SlotMeasure(12 * GB, 3, 2), 1: SlotMeasure(None, 0, 1)}


def test_plans_are_shown_only_while_fresh(tmp_path: Path) -> None:
    d = decide(gpu(own=20 * GB), SlotMeasure(20 * GB, 2, running=1))
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"at": time.time(), "interval_s": 3.0, "gpus": [d.to_dict()]}))
    assert read_plans(path)[0]["slots"] == 3
    assert read_plans(path, now=time.time() + 16) == {}
    assert read_plans(tmp_path / "missing.json") == {}
    gone = eligible_gpus([gpu(colleague=4 * GB)], PlacementPolicy(slots="auto", min_free_mib=78 * GB))[0]
    assert slots_text(gone.to_dict()) == "no slot: 76.0 GiB free < 78.0 GiB needed"


def test_the_worker_measures_its_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import peak_memory
    from workers.peak_memory import PeakMemory

    fake = tmp_path / "gpus.json"

    def declare(own_mib: int | None) -> None:
        procs = [] if own_mib is None else [{"pid": os.getpid(), "used_mib": own_mib}]
        fake.write_text(json.dumps([{"index": 0, "uuid": "G0", "name": "fake", "memory_total_mib": TOTAL,
                                     "memory_used_mib": own_mib or 0, "memory_free_mib": TOTAL - (own_mib or 0),
                                     "processes": procs}]))

    declare(None)  # NVML does not list this process: nothing measured
    meter = PeakMemory(0, first_samples=2, inventory=FakeInventory(fake))
    meter.after_sample()
    assert (meter.peak_mib, meter.samples) == (None, 0)
    declare(3000)  # no torch CUDA here: NVML's figure is the peak, the largest seen
    meter.after_sample()
    declare(2500)
    meter.after_sample()
    assert (meter.peak_mib, meter.samples) == (3000, 2)

    # With torch: its peak plus the context's share (NVML less torch's reserved memory, first samples only).
    figures = iter([(2000, 1500), (2600, 1500), (5000, 1500)])
    monkeypatch.setattr(peak_memory, "_torch_mib", lambda: next(figures))
    meter = PeakMemory(0, first_samples=2, inventory=FakeInventory(fake))
    for _ in range(2):
        meter.after_sample()  # NVML lists 2500 MiB against 1500 reserved: 1000 of context
    assert meter.peak_mib == 3600
    fake.unlink()  # after the first samples NVML is not read at all
    meter.after_sample()
    assert (meter.peak_mib, meter.samples) == (6000, 3)
