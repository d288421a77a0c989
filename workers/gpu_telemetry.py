"""GPU telemetry while work runs: the worker's GPUs sampled through the NVML module
(fleet.gpu_inventory, the only NVML caller) once a second in a thread; ``window()`` gives
the figures since the previous call and starts a new window. The runner keeps one for the
worker's life and puts each sample's window in its record; the train job keeps one per run
for its per-epoch lines. Nothing on a CPU worker. ``on_reading`` also hands each reading
to the worker's GPU time series (workers.gpu_series_feed).

Utilisation comes, where the driver keeps them, from its own stamped samples
(``Inventory.utilization_samples``): the mean of those whose whole period lies inside the
window. A polled reading averages over the driver's last period (up to 1 s), which for a
window of a few tenths of a second (a fast training epoch, a small sample) mostly covers
what ran before it: an H200 training run read 32 % busy per epoch that way while the
driver's samples inside its epochs read near 100 % (docs/BENCHMARKS.md, "Training"). The
polled mean stands in when the driver has no samples or the window is shorter than one
period."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fleet.gpu_inventory import GpuSnapshot, Inventory, inventory_from_env, samples_within

log = logging.getLogger(__name__)


class GpuTelemetry:
    def __init__(self, gpus: tuple[int, ...], interval_s: float = 1.0,
                 on_reading: Callable[[float, list[GpuSnapshot]], None] | None = None) -> None:
        """``interval_s``: seconds between readings; ``on_reading(unix time, snapshots of the
        worker's GPUs)`` is called in the sampling thread after each reading."""
        self.gpus = set(gpus)
        self.interval_s = interval_s
        self.on_reading = on_reading
        self._samples: list[tuple[float | None, int, float | None, float | None]] = []
        self._last: list[tuple[float | None, int, float | None, float | None]] = []  # the latest reading
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inv: Inventory | None = None  # the sampling thread's, once open (NVML calls under _nvml_lock)
        self._nvml_lock = threading.Lock()
        self._driver: dict[int, list[tuple[float, int]]] = {}  # gpu -> (unix s, percent), oldest first
        self._window_start = time.time()

    def __enter__(self) -> GpuTelemetry:
        if self.gpus:
            self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        try:
            inv = inventory_from_env()
        except Exception:  # no NVML: no telemetry, the job runs on
            return
        with inv:
            self._inv = inv
            while not self._stop.is_set():
                try:
                    with self._nvml_lock:
                        snaps = [s for s in inv.snapshot() if s.index in self.gpus]
                except Exception:
                    snaps = []
                self._read_driver()
                reading = [(s.utilization_pct, s.memory_used_mib, s.power_w, s.temperature_c) for s in snaps]
                with self._lock:
                    self._samples.extend(reading)
                    self._last = reading
                if self.on_reading is not None and snaps:
                    try:
                        self.on_reading(time.time(), snaps)
                    except Exception:  # the series are a view: a fault there must not end the readings
                        log.debug("GPU reading listener failed", exc_info=True)
                self._stop.wait(self.interval_s)
            self._inv = None

    def start(self) -> GpuTelemetry:
        return self.__enter__()

    def _read_driver(self) -> None:
        """Append the driver's samples taken since the last read (its ring holds only so many)."""
        inv = self._inv
        if inv is None:
            return
        for gpu in sorted(self.gpus):
            with self._lock:
                seen = self._driver.setdefault(gpu, [])
                since = int(seen[-1][0] * 1e6) if seen else int((self._window_start - 2.0) * 1e6)
            try:
                with self._nvml_lock:
                    new = inv.utilization_samples(gpu, since)
            except Exception:  # a flaky read: the polled figures stand
                continue
            with self._lock:  # window() may have trimmed the list meanwhile: take it again
                seen = self._driver.setdefault(gpu, [])
                last = seen[-1][0] if seen else 0.0
                seen.extend(x for x in ((ts / 1e6, pct) for ts, pct in new) if x[0] > last)

    def _driver_util(self, t0: float, t1: float) -> tuple[float, int | None] | None:
        """(mean, peak) percent of the driver's samples whose period lies in [t0, t1], over the
        GPUs; None when there are none. Drops the samples older than the window."""
        vals: list[int] = []
        with self._lock:
            for gpu, seen in self._driver.items():
                vals += samples_within(seen, t0, t1)
                self._driver[gpu] = seen[-8:]  # the period of the next window's first samples
        return (round(sum(vals) / len(vals), 1), max(vals)) if vals else None

    def window(self) -> dict[str, Any]:
        """Figures since the last call, over the worker's GPUs: gpu_util_pct (mean) and
        gpu_util_peak_pct (from the driver's samples or the polled readings: gpu_util_source),
        gpu_mem_mib (peak used) and gpu_mem_mean_mib, gpu_power_w (mean) and gpu_power_peak_w,
        gpu_temp_c (peak), gpu_samples (readings: a window shorter than the interval gets the
        latest reading); None where nothing was read yet."""
        now = time.time()
        self._read_driver()
        driver = self._driver_util(self._window_start, now)
        self._window_start = now
        with self._lock:
            # A window shorter than the interval holds no reading: it gets the latest one.
            samples, self._samples = (self._samples or list(self._last)), []
        util = [u for u, _, _, _ in samples if u is not None]
        mem = [m for _, m, _, _ in samples]
        power = [p for _, _, p, _ in samples if p is not None]
        temp = [t for _, _, _, t in samples if t is not None]

        def mean(xs: list) -> float | None:
            return round(sum(xs) / len(xs), 1) if xs else None

        util_mean, util_peak = driver if driver is not None else (mean(util), max(util) if util else None)
        return {
            "gpu_util_pct": util_mean, "gpu_util_peak_pct": util_peak,
            "gpu_util_source": "driver" if driver is not None else ("polled" if util else None),
            "gpu_mem_mib": max(mem) if mem else None, "gpu_mem_mean_mib": mean(mem),
            "gpu_power_w": mean(power), "gpu_power_peak_w": round(max(power), 1) if power else None,
            "gpu_temp_c": max(temp) if temp else None, "gpu_samples": len(samples),
        }
