"""Per-GPU time series in Redis: utilisation, memory, power and temperature of each GPU a
worker holds, one point per bucket (5 s by default), kept for a bounded window (24 h by
default), for `fleet gpus --watch`, `fleet watch`, `fleet report` and /metrics.

Each series is a Redis STREAM ``Keys.gpu_series("<hostname>/<index>")``. A point's stream id
is its bucket start in milliseconds, so several workers on one GPU (slots) write each bucket
once: Redis refuses an id that is not above the stream's last one, and the second writer's
XADD fails harmlessly. ``MAXLEN ~`` caps the stream at window / bucket points; the cap is
approximate (Redis trims whole macro nodes), so a series may hold a little more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import redis
from pydantic import BaseModel, ConfigDict, Field

from fleet.contract import Keys

BUCKET_S = 5.0
WINDOW_S = 24 * 3600.0


class GpuPoint(BaseModel):
    """One GPU over one bucket: the mean of the readings the writer took in it (peak memory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t: float = Field(description="Unix time of the bucket's start")
    util_pct: float | None = Field(None, description="Mean kernel-busy share over the bucket, %")
    mem_used_mib: int | None = Field(None, description="Peak memory used in the bucket, MiB")
    mem_total_mib: int | None = None
    power_w: float | None = Field(None, description="Mean board power over the bucket, W")
    temp_c: float | None = None


def series_name(hostname: str, index: int) -> str:
    return f"{hostname}/{index}"


def write(client: redis.Redis, keys: Keys, name: str, point: GpuPoint,
          bucket_s: float = BUCKET_S, window_s: float = WINDOW_S) -> bool:
    """Append ``point`` to its series; False when the bucket was written already (another slot)."""
    bucket_ms = int(math.floor(point.t / bucket_s) * bucket_s * 1000)
    fields = {k: ("" if v is None else str(v)) for k, v in point.model_dump().items() if k != "t"}
    maxlen = max(1, int(window_s / bucket_s))
    pipe = client.pipeline(transaction=False)
    pipe.sadd(keys.gpu_series_names, name)
    pipe.xadd(keys.gpu_series(name), fields, id=f"{bucket_ms}-0", maxlen=maxlen, approximate=True)
    # A GPU that leaves the fleet (a host gone, a GPU excluded) stops being written: its series
    # goes a window after its last point instead of staying forever.
    pipe.expire(keys.gpu_series(name), int(window_s + bucket_s) + 1)
    pipe.expire(keys.gpu_series_names, int(window_s + bucket_s) + 1)
    _, added, _, _ = pipe.execute(raise_on_error=False)
    return not isinstance(added, Exception)


def names(client: redis.Redis, keys: Keys) -> list[str]:
    return sorted(v.decode() if isinstance(v, bytes) else v for v in client.smembers(keys.gpu_series_names))


def _point(entry_id: bytes | str, fields: dict) -> GpuPoint:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in fields.items()}

    def num(key: str, cast: type = float) -> float | int | None:
        v = f.get(key, "")
        return cast(float(v)) if v not in ("", None) else None

    return GpuPoint(t=int(eid.split("-")[0]) / 1000.0, util_pct=num("util_pct"),
                    mem_used_mib=num("mem_used_mib", int), mem_total_mib=num("mem_total_mib", int),
                    power_w=num("power_w"), temp_c=num("temp_c"))


def read(client: redis.Redis, keys: Keys, since: float | None = None, until: float | None = None,
         only: Iterable[str] | None = None) -> dict[str, list[GpuPoint]]:
    """Series name -> its points (oldest first) in [since, until] (unix seconds)."""
    lo = "-" if since is None else str(int(since * 1000))
    hi = "+" if until is None else str(int(until * 1000))
    out: dict[str, list[GpuPoint]] = {}
    for name in (sorted(only) if only is not None else names(client, keys)):
        out[name] = [_point(i, f) for i, f in client.xrange(keys.gpu_series(name), lo, hi)]
    return out


def latest(client: redis.Redis, keys: Keys, max_age_s: float = 30.0) -> dict[str, GpuPoint]:
    """Series name -> its newest point, for series whose newest bucket started within
    ``max_age_s`` (give at least two buckets: a point is written when its bucket ends)."""
    out: dict[str, GpuPoint] = {}
    now = time.time()
    for name in names(client, keys):
        last = client.xrevrange(keys.gpu_series(name), "+", "-", count=1)
        if last:
            p = _point(*last[0])
            if now - p.t <= max_age_s:
                out[name] = p
    return out
