"""A GPU worker's side of the per-GPU time series (fleet.gpu_series): the readings its
GpuTelemetry takes (once a second) are gathered per GPU and per bucket, and when a bucket
ends each GPU's point goes to Redis: mean utilisation (%), peak memory used and the total
(MiB), mean power (W), mean temperature (C).

Writing happens in a thread of its own: a slow or absent Redis must neither delay the
readings (each sample's record keeps its window of them) nor the sample. While Redis does not
answer, points are dropped (a view, not a record), with one warning per outage. Several
workers on one GPU (slots) each write every bucket; the stream id is the bucket's start, so
Redis keeps the first and refuses the others (fleet.gpu_series).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass, field

import redis

from fleet import gpu_series
from fleet.contract import Keys
from fleet.gpu_inventory import GpuSnapshot
from fleet.gpu_series import GpuPoint

log = logging.getLogger(__name__)

PENDING_MAX = 64  # buckets waiting for Redis; past that the oldest news is the least worth keeping


@dataclass
class _Bucket:
    """One GPU's readings within one bucket."""

    util: list[float] = field(default_factory=list)
    power: list[float] = field(default_factory=list)
    temp: list[float] = field(default_factory=list)
    mem_peak_mib: int | None = None
    mem_total_mib: int | None = None

    def add(self, s: GpuSnapshot) -> None:
        if s.utilization_pct is not None:
            self.util.append(s.utilization_pct)
        if s.power_w is not None:
            self.power.append(s.power_w)
        if s.temperature_c is not None:
            self.temp.append(s.temperature_c)
        self.mem_peak_mib = max(self.mem_peak_mib or 0, s.memory_used_mib)
        self.mem_total_mib = s.memory_total_mib

    def point(self, t: float) -> GpuPoint:
        def mean(xs: list[float]) -> float | None:
            return round(sum(xs) / len(xs), 1) if xs else None

        return GpuPoint(t=t, util_pct=mean(self.util), mem_used_mib=self.mem_peak_mib,
                        mem_total_mib=self.mem_total_mib, power_w=mean(self.power), temp_c=mean(self.temp))


class SeriesFeed:
    """Turns a worker's GPU readings into one point per GPU and bucket, written to Redis.

    ``add`` is called from the telemetry thread; the writes run in this feed's own thread.
    ``bucket_s`` and ``window_s`` (seconds) are the settings' gpu_series_bucket_s and
    gpu_series_window_s.
    """

    def __init__(self, client: redis.Redis, keys: Keys, hostname: str, bucket_s: float, window_s: float) -> None:
        self.client = client
        self.keys = keys
        self.hostname = hostname
        self.bucket_s = bucket_s
        self.window_s = window_s
        self._bucket: int | None = None  # the bucket being filled: floor(unix time / bucket_s)
        self._readings: dict[int, _Bucket] = {}  # GPU index -> its readings in that bucket
        self._pending: queue.Queue[list[tuple[str, GpuPoint]] | None] = queue.Queue(maxsize=PENDING_MAX)
        self._failing = False  # a warning was logged for the current outage
        self.written = 0  # points Redis took (a slot sharing the GPU may have written the rest)
        self._thread = threading.Thread(target=self._drain, name="gpu-series", daemon=True)
        self._thread.start()

    def add(self, t: float, snaps: list[GpuSnapshot]) -> None:
        """One reading (unix time ``t``) of the worker's GPUs; a reading in a later bucket
        ends the one being filled, whose points are handed to the writer."""
        b = math.floor(t / self.bucket_s)
        if b != self._bucket:
            if self._bucket is not None and self._readings:
                # write() keys a point by floor(t / bucket_s): the bucket's middle is safe from
                # float rounding at its edges (the stored id is the bucket's start all the same).
                mid = (self._bucket + 0.5) * self.bucket_s
                points = [(gpu_series.series_name(self.hostname, i), r.point(mid))
                          for i, r in sorted(self._readings.items())]
                try:
                    self._pending.put_nowait(points)
                except queue.Full:
                    pass  # Redis has not answered for PENDING_MAX buckets: this one is lost
            self._bucket, self._readings = b, {}
        for s in snaps:
            self._readings.setdefault(s.index, _Bucket()).add(s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what ended already and stop the thread (the bucket being filled is dropped)."""
        try:
            self._pending.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _drain(self) -> None:
        while True:
            points = self._pending.get()
            if points is None:
                return
            for name, point in points:
                self._write(name, point)

    def _write(self, name: str, point: GpuPoint) -> None:
        try:
            added = gpu_series.write(self.client, self.keys, name, point, self.bucket_s, self.window_s)
        except (redis.RedisError, OSError) as e:
            if not self._failing:
                log.warning("cannot write GPU series %s (%s); dropping points until Redis answers", name, e)
                self._failing = True
            return
        except Exception:  # never the worker's concern: the series are a view
            log.debug("GPU series %s: point not written", name, exc_info=True)
            return
        if self._failing:
            log.info("writing GPU series again")
            self._failing = False
        if added:
            self.written += 1
        else:
            log.debug("GPU series %s: bucket %.0f written already (another slot)", name, point.t)
