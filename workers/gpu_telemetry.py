"""GPU telemetry while work runs: the worker's GPUs sampled through the NVML module
(fleet.gpu_inventory, the only NVML caller) once a second in a thread; ``window()`` gives
the figures since the previous call and starts a new window. The runner keeps one for the
worker's life and puts each sample's window in its record; the train job keeps one per run
for its per-epoch lines. Nothing on a CPU worker. ``on_reading`` also hands each reading
to the worker's GPU time series (workers.gpu_series_feed)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fleet.gpu_inventory import GpuSnapshot, inventory_from_env

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
            while not self._stop.is_set():
                try:
                    snaps = [s for s in inv.snapshot() if s.index in self.gpus]
                except Exception:
                    snaps = []
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

    def start(self) -> GpuTelemetry:
        return self.__enter__()

    def window(self) -> dict[str, Any]:
        """Figures since the last call, over the worker's GPUs: gpu_util_pct (mean) and
        gpu_util_peak_pct, gpu_mem_mib (peak used) and gpu_mem_mean_mib, gpu_power_w (mean) and
        gpu_power_peak_w, gpu_temp_c (peak), gpu_samples (readings: a window shorter than the
        interval gets the latest reading); None where nothing was read yet."""
        with self._lock:
            # A window shorter than the interval holds no reading: it gets the latest one.
            samples, self._samples = (self._samples or list(self._last)), []
        util = [u for u, _, _, _ in samples if u is not None]
        mem = [m for _, m, _, _ in samples]
        power = [p for _, _, p, _ in samples if p is not None]
        temp = [t for _, _, _, t in samples if t is not None]

        def mean(xs: list) -> float | None:
            return round(sum(xs) / len(xs), 1) if xs else None

        return {
            "gpu_util_pct": mean(util), "gpu_util_peak_pct": max(util) if util else None,
            "gpu_mem_mib": max(mem) if mem else None, "gpu_mem_mean_mib": mean(mem),
            "gpu_power_w": mean(power), "gpu_power_peak_w": round(max(power), 1) if power else None,
            "gpu_temp_c": max(temp) if temp else None, "gpu_samples": len(samples),
        }
