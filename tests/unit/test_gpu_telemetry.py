"""GpuTelemetry's utilisation from the driver's stamped samples (a window's own figure)."""

from __future__ import annotations

import time

from fleet.gpu_inventory import GpuSnapshot, Inventory
from workers.gpu_telemetry import GpuTelemetry


class StampedInventory(Inventory):
    """Driver samples of GPU 0 as given: (unix s, percent)."""

    def __init__(self, samples: list[tuple[float, int]]) -> None:
        self.samples = samples

    def snapshot(self) -> list[GpuSnapshot]:
        return []

    def utilization_samples(self, index: int, since_us: int = 0) -> list[tuple[int, int]]:
        return [(int(t * 1e6), u) for t, u in self.samples if index == 0 and t * 1e6 > since_us]


def test_a_window_counts_only_the_driver_samples_whose_period_lies_inside_it() -> None:
    now = time.time()
    start = now - 1.0
    before = [(start - 0.3 + 0.1 * k, 0) for k in range(3)]  # idle before the window
    # the sample stamped 0.05 s into the window covers mostly idle time before it: left out
    inside = [(start + 0.05, 0)] + [(start + 0.05 + 0.1 * k, 90 + k) for k in range(1, 9)]
    tel = GpuTelemetry((0,))
    tel._inv, tel._window_start = StampedInventory(before + inside), start
    w = tel.window()
    assert w["gpu_util_source"] == "driver"
    assert w["gpu_util_pct"] == round(sum(90 + k for k in range(1, 9)) / 8, 1)
    assert w["gpu_util_peak_pct"] == 98
    # the next window holds none of those samples: nothing to say, no polled reading either
    assert tel.window()["gpu_util_pct"] is None


def test_without_driver_samples_the_polled_readings_stand() -> None:
    tel = GpuTelemetry((0,))
    tel._inv = StampedInventory([])
    tel._samples = [(40, 100, 200.0, 50), (60, 120, 210.0, 55)]
    w = tel.window()
    assert (w["gpu_util_pct"], w["gpu_util_source"], w["gpu_mem_mib"]) == (50.0, "polled", 120)
