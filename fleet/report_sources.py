"""Where ``fleet report`` reads an experiment from: its plan (which samples, in which group),
the completion records in Redis merged with ``<output>/fleet-manifest.jsonl`` (so a report
works after Redis lost them, or without Redis), its final failures, and the per-GPU time
series of the GPUs its samples ran on over the experiment's time span.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from fleet import gpu_series, manifest
from fleet.contract import CompletionRecord, FailureRecord, Keys
from fleet.gpu_series import GpuPoint
from fleet.kinds import KindModules
from fleet.kinds.base import Experiment, PlanContext
from fleet.planner import plan_experiment
from fleet.report import span
from fleet.status import failures

CHUNK = 10_000


@dataclass
class ReportInput:
    """Everything a report is made of, read once."""

    experiment: Experiment
    planned: Counter  # group -> planned samples
    records: dict[str, CompletionRecord]  # sample id -> its latest completion record
    failures: list[FailureRecord]  # final failures of planned samples that are not done, oldest first
    series: dict[str, list[GpuPoint]] | None  # GPU series name -> points in the span; None: Redis not read
    sources: dict[str, Any] = field(default_factory=dict)  # what came from where, for the page and report.json


def redis_records(client: redis.Redis, keys: Keys, ids: list[str]) -> dict[str, CompletionRecord]:
    """The completion records of ``ids`` that Redis holds (records of another schema left out)."""
    out: dict[str, CompletionRecord] = {}
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(ids), CHUNK):
        pipe.hmget(keys.records, ids[i:i + CHUNK])
    for sid, raw in zip(ids, (v for part in pipe.execute() for v in part)):
        if raw is None:
            continue
        try:
            out[sid] = CompletionRecord.model_validate_json(raw)
        except ValueError:
            continue
    return out


def merge(from_redis: Mapping[str, CompletionRecord], from_manifest: Mapping[str, CompletionRecord]
          ) -> dict[str, CompletionRecord]:
    """Per sample the later record (a sample made again appends a newer manifest line); Redis
    wins a tie, since the manifest line is written first."""
    out = dict(from_manifest)
    for sid, r in from_redis.items():
        m = out.get(sid)
        if m is None or r.finished_at >= m.finished_at:
            out[sid] = r
    return out


def gpu_series_of(client: redis.Redis, keys: Keys, records: Mapping[str, CompletionRecord],
                  pad_s: float = gpu_series.BUCKET_S) -> dict[str, list[GpuPoint]]:
    """The time series of the GPUs the samples ran on ("<hostname>/<index>"), over their span
    (``pad_s`` either side, so the bucket holding the first start is in)."""
    sp = span(records.values())
    wanted = {gpu_series.series_name(r.hostname, g) for r in records.values() for g in r.gpus}
    have = wanted & set(gpu_series.names(client, keys))
    if sp is None or not have:
        return {}
    return gpu_series.read(client, keys, since=sp[0] - pad_s, until=sp[1] + pad_s, only=have)


def collect(client: redis.Redis | None, namespace: str, exp: Experiment,
            kinds: Mapping[str, KindModules] | None = None) -> ReportInput:
    """Read the experiment's report input; ``client`` None: from its plan and manifest only."""
    keys = Keys(namespace)
    plan = plan_experiment(exp, None, PlanContext(client, keys if client is not None else None), kinds)
    group_of = dict(zip(plan.ids, plan.groups))
    ids = list(group_of)
    in_manifest = {sid: r for sid, r in manifest.records(exp.output).items() if sid in group_of}
    in_redis = redis_records(client, keys, ids) if client is not None else {}
    recs = merge(in_redis, in_manifest)
    failed = [f for f in failures(client, namespace, set(ids)) if f.sample_id not in recs] if client is not None else []
    series = gpu_series_of(client, keys, recs) if client is not None else None
    sources = {"redis": client is not None, "redis_records": len(in_redis), "manifest_records": len(in_manifest),
               "manifest_only": len(set(in_manifest) - set(in_redis)), "manifest": str(exp.output / manifest.MANIFEST_NAME)}
    return ReportInput(exp, Counter(group_of.values()), recs, failed, series, sources)
