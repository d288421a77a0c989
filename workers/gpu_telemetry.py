"""GPU telemetry while a job runs: the worker's GPUs sampled through the NVML module
(fleet.gpu_inventory, the only NVML caller) once a second in a thread; ``window()`` gives
the figures since the previous call (mean utilisation, peak memory used, mean power, peak
temperature) and starts a new window. Nothing on a CPU worker."""

from __future__ import annotations

import threading
from typing import Any

from fleet.gpu_inventory import inventory_from_env


class GpuTelemetry:
    def __init__(self, gpus: tuple[int, ...], interval_s: float = 1.0) -> None:
        self.gpus = set(gpus)
        self.interval_s = interval_s
        self._samples: list[tuple[float | None, int, float | None, float | None]] = []
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
                for s in snaps:
                    with self._lock:
                        self._samples.append((s.utilization_pct, s.memory_used_mib, s.power_w, s.temperature_c))
                self._stop.wait(self.interval_s)

    def window(self) -> dict[str, Any]:
        """Figures since the last call: gpu_util_pct (mean), gpu_mem_mib (peak), gpu_power_w (mean),
        gpu_temp_c (peak); None where nothing was sampled."""
        with self._lock:
            samples, self._samples = self._samples, []
        util = [u for u, _, _, _ in samples if u is not None]
        power = [p for _, _, p, _ in samples if p is not None]
        temp = [t for _, _, _, t in samples if t is not None]
        return {
            "gpu_util_pct": round(sum(util) / len(util), 1) if util else None,
            "gpu_mem_mib": max((m for _, m, _, _ in samples), default=None),
            "gpu_power_w": round(sum(power) / len(power), 1) if power else None,
            "gpu_temp_c": max(temp) if temp else None,
        }
