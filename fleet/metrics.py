"""What /metrics tells Prometheus (`fleet metrics`, fleet.metrics_server): samples per
experiment, group and state, live and busy workers, and each GPU's newest series point.

The sample counts read every record of the namespace (what `fleet status --json` counts,
split by experiment too), so they are kept ``cache_s`` seconds and computed at most once per
that period however often, and by however many, it is scraped. Workers and GPUs are a few
entries each and are read on every scrape.

Metrics (all gauges):

- ``fleet_samples{experiment, group, state}``: state is done, failed, queued or running, with
  `fleet status`'s rules (a failure being retried counts as queued or running).
- ``fleet_workers_live``, ``fleet_workers_busy``: workers whose heartbeat is recent, and those
  of them running a sample.
- ``fleet_gpu_utilization_percent``, ``fleet_gpu_memory_used_bytes``,
  ``fleet_gpu_memory_total_bytes``, ``fleet_gpu_power_watts``, ``fleet_gpu_temperature_celsius``
  ``{host, gpu}``: the newest point of each GPU's series (fleet.gpu_series) written lately.
- ``fleet_redis_up``: 1 when Redis answered this scrape; 0 and nothing else when it did not.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet import gpu_series, kept_payloads
from fleet.contract import Keys
from fleet.gpu_view import live_workers

STATES = ("done", "failed", "queued", "running")
_MIB = 1024 * 1024
_SCAN = 2000  # entries per HSCAN reply: no single huge reply blocking Redis for other clients


def _hash(client: redis.Redis, key: str) -> dict[bytes, bytes]:
    """A whole hash, read in HSCAN pages; a field HSCAN yields twice (during a rehash) counts once."""
    return dict(client.hscan_iter(key, count=_SCAN))


def _where(raw: bytes) -> tuple[str, str]:
    """(experiment, group) of a completion or failure record of any schema, parsed once (the
    group as fleet.contract.record_group reads it: version 1 said ``category``)."""
    try:
        d = json.loads(raw)
        return str(d.get("experiment", "?")), str(d.get("group", d.get("category", "?")))
    except (ValueError, AttributeError):
        return "?", "?"


def sample_counts(client: redis.Redis, keys: Keys) -> Counter[tuple[str, str, str]]:
    """(experiment, group, state) -> samples, over every record of the namespace (the rules of
    fleet.status.global_status)."""
    counts: Counter[tuple[str, str, str]] = Counter()
    records = _hash(client, keys.records)
    for raw in records.values():
        counts[(*_where(raw), "done")] += 1
    queued = _hash(client, keys.queued)
    heads = kept_payloads.Heads(client, keys)
    for raw in queued.values():
        counts[(*kept_payloads.owner(raw.decode("utf-8", "replace"), heads), "queued")] += 1
    running = _hash(client, keys.running)
    for raw in running.values():
        task = json.loads(raw)["task"]
        counts[(str(task.get("experiment", "?")), str(task.get("group", task.get("category", "?"))), "running")] += 1
    settled = records.keys() | queued.keys() | running.keys()
    for sid, raw in _hash(client, keys.failed).items():
        if sid not in settled:  # being retried: counted as queued or running above
            counts[(*_where(raw), "failed")] += 1
    return counts


class FleetCollector(Collector):
    """A prometheus_client collector over one namespace. ``heartbeat_s`` (s) decides which
    workers are live; ``cache_s`` (s) how long the sample counts are reused."""

    def __init__(self, client: redis.Redis, namespace: str, heartbeat_s: float, cache_s: float = 5.0,
                 series_max_age_s: float = 30.0) -> None:
        self.client = client
        self.keys = Keys(namespace)
        self.namespace = namespace
        self.heartbeat_s = heartbeat_s
        self.cache_s = cache_s
        self.series_max_age_s = series_max_age_s
        self._lock = threading.Lock()  # concurrent scrapes wait for one count instead of each making one
        self._counts: Counter[tuple[str, str, str]] | None = None
        self._counted_at = 0.0  # time.monotonic() of the counts
        self.count_runs = 0  # how often the counts were computed (for tests and the log)

    def counts(self) -> Counter[tuple[str, str, str]]:
        with self._lock:
            if self._counts is None or time.monotonic() - self._counted_at >= self.cache_s:
                self._counts = sample_counts(self.client, self.keys)
                self._counted_at = time.monotonic()
                self.count_runs += 1
            return self._counts

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fleet_redis_up", "1 when the fleet's Redis answered this scrape")
        try:
            families = self._families()
        except (redis.RedisError, OSError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> list[Metric]:
        counts = self.counts()
        samples = GaugeMetricFamily("fleet_samples", "Samples by experiment, group and state "
                                    "(done, failed, queued, running), as `fleet status` counts them",
                                    labels=["experiment", "group", "state"])
        pairs = sorted({(e, g) for e, g, _ in counts})
        for e, g in pairs:
            for state in STATES:  # every state of a pair, zeros included: a series that vanishes reads as stale
                samples.add_metric([e, g, state], counts.get((e, g, state), 0))
        workers = live_workers(self.client, self.namespace, self.heartbeat_s, every_host=True)
        live = GaugeMetricFamily("fleet_workers_live", "Workers whose heartbeat is recent")
        live.add_metric([], len(workers))
        busy = GaugeMetricFamily("fleet_workers_busy", "Live workers running a sample")
        busy.add_metric([], sum(1 for w in workers if w.sample_id))
        gpu = {name: GaugeMetricFamily(name, doc, labels=["host", "gpu"]) for name, doc in (
            ("fleet_gpu_utilization_percent", "Mean GPU utilisation over the newest series bucket, %"),
            ("fleet_gpu_memory_used_bytes", "Peak GPU memory used in the newest series bucket, bytes"),
            ("fleet_gpu_memory_total_bytes", "GPU memory, bytes"),
            ("fleet_gpu_power_watts", "Mean board power over the newest series bucket, W"),
            ("fleet_gpu_temperature_celsius", "GPU temperature in the newest series bucket, C"),
        )}
        for name, p in gpu_series.latest(self.client, self.keys, self.series_max_age_s).items():
            host, _, index = name.rpartition("/")
            for metric, value in (
                ("fleet_gpu_utilization_percent", p.util_pct),
                ("fleet_gpu_memory_used_bytes", None if p.mem_used_mib is None else p.mem_used_mib * _MIB),
                ("fleet_gpu_memory_total_bytes", None if p.mem_total_mib is None else p.mem_total_mib * _MIB),
                ("fleet_gpu_power_watts", p.power_w),
                ("fleet_gpu_temperature_celsius", p.temp_c),
            ):
                if value is not None:
                    gpu[metric].add_metric([host, index], value)
        return [samples, live, busy, *gpu.values()]
