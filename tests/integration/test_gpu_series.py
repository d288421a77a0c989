"""The operator's view of the GPUs, through real workers on a fake GPU inventory: each GPU
worker feeds its GPUs' time series in Redis (one point per bucket, whatever the number of
slots on the GPU), `fleet gpus --watch` shows them, and the /metrics endpoint `fleet up`
starts gives Prometheus the sample counts of `fleet status` and the GPU gauges, behind
Flower's login."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleet import gpu_series
from fleet.gpu_inventory import GpuSnapshot
from fleet.metrics import FleetCollector
from tests.integration.conftest import Fleet, LocalFleet, free_ports, pid_gone, wait_for
from workers.gpu_series_feed import SeriesFeed

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
HOST = socket.gethostname()
TOUCH = json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}})
BUCKET_S = 0.5  # small buckets: points within a second


def write_gpus(path: Path, util0: int = 73) -> str:
    """Two fake GPUs with telemetry; replaced atomically (a worker reads it every second)."""
    gpus = [
        {"index": 0, "uuid": "GPU-fake-0", "name": "FAKE-0", "memory_total_mib": 81559, "memory_used_mib": 20480,
         "memory_free_mib": 61079, "utilization_pct": util0, "power_w": 250.5, "temperature_c": 61},
        {"index": 1, "uuid": "GPU-fake-1", "name": "FAKE-1", "memory_total_mib": 81559, "memory_used_mib": 1024,
         "memory_free_mib": 80535, "utilization_pct": 5, "power_w": 60.0, "temperature_c": 40},
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(gpus))
    os.replace(tmp, path)
    return str(path)


def touch_experiment(root: Path, items: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump({"kind": "touch", "name": "ops", "output": "out", "items": items}))
    return path


def test_gpu_slots_feed_one_series_point_per_bucket_and_watch_shows_them(fleet_ns: Fleet, tmp_path: Path) -> None:
    f = fleet_ns
    env = {"FLEET_FAKE_GPUS": write_gpus(tmp_path / "gpus.json"), "FLEET_GPU_SERIES_BUCKET_S": str(BUCKET_S),
           "FLEET_KINDS": TOUCH, "PYTHONPATH": REPO}
    # Two slots on GPU 0, none on GPU 1.
    f.start_named_worker("gpu0", "--gpu", "0", **env)
    f.start_named_worker("gpu0s1", "--gpu", "0", "--slot", "1", **env)
    exp = touch_experiment(tmp_path / "exp", [{"name": f"s{i}", "text": str(i), "sleep_s": 0.3} for i in range(4)])
    assert json.loads(f.fleet("enqueue", str(exp), "--json", check=True, **env).stdout)["enqueued"] == 4
    wait_for(lambda: f.done_count() == 4, 60, "the four samples")

    name = gpu_series.series_name(HOST, 0)
    points = wait_for(lambda: (p := gpu_series.read(f.client, f.keys, only=[name])[name]) and len(p) >= 4 and p,
                      30, "four points of GPU 0")
    # The fake file's figures: a constant reading's mean and peak are itself.
    for p in points:
        assert (p.util_pct, p.mem_used_mib, p.mem_total_mib, p.power_w, p.temp_c) == (73.0, 20480, 81559, 250.5, 61.0)
    # One series per GPU (not per slot), one point per bucket: each id is a distinct bucket start.
    assert gpu_series.names(f.client, f.keys) == [name]  # GPU 1 has no worker: no series
    starts = [round(p.t / BUCKET_S, 6) for p in points]
    assert all(s == int(s) for s in starts) and len(set(starts)) == len(starts) and starts == sorted(starts)

    # The points follow the readings.
    write_gpus(tmp_path / "gpus.json", util0=20)
    wait_for(lambda: gpu_series.latest(f.client, f.keys)[name].util_pct == 20.0, 30, "a point of the new reading")

    r = f.fleet("gpus", "--watch", "--json", "--count", "2", "--interval-s", "0.2", check=True, **env)
    frames = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(frames) == 2
    for frame in frames:
        gpu0, gpu1 = frame["gpus"]
        assert (gpu0["host"], gpu0["index"], gpu0["source"], gpu0["mem_used_mib"]) == (HOST, 0, "nvml", 20480)
        assert {w["name"] for w in gpu0["fleet_workers"]} == {f"gpu0@{HOST}", f"gpu0s1@{HOST}"}
        assert gpu1["fleet_workers"] == [] and frame["redis"] is True
        history = [u for _, u in gpu0["util_history"]]  # from the Redis series: several points
        assert len(history) >= 5 and {73.0, 20.0} <= set(history)
    table = f.fleet("gpus", "--watch", "--count", "1", check=True, COLUMNS="250", **env).stdout
    row0 = next(line for line in table.splitlines() if f"{HOST}/0" in line)
    assert f"gpu0s1@{HOST}" in table and f"{HOST}/1" in table and set("▁▂▃▄▅▆▇█") & set(row0)  # the sparkline


def _snap(util: int, mem: int, power: float, temp: int) -> GpuSnapshot:
    return GpuSnapshot(index=0, uuid="GPU-x", name="X", memory_total_mib=1000, memory_used_mib=mem,
                       memory_free_mib=1000 - mem, utilization_pct=util, power_w=power, temperature_c=temp)


def _unreachable() -> redis.Redis:
    """A client of a port nobody listens on, failing at once (no retries with back-off)."""
    return redis.Redis(port=free_ports(1)[0], socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def test_a_feed_writes_each_bucket_once_and_outlives_redis(fleet_ns: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    f = fleet_ns
    b0 = (int(time.time()) // 5 - 10) * 5  # a bucket start (5 s buckets) a minute ago
    feed = SeriesFeed(f.client, f.keys, "h", bucket_s=5, window_s=3600)
    feed.add(b0 + 0.5, [_snap(10, 100, 50.0, 40)])
    feed.add(b0 + 2.0, [_snap(30, 300, 70.0, 50)])
    feed.add(b0 + 5.1, [_snap(90, 200, 90.0, 60)])  # the next bucket: the first one is written
    feed.add(b0 + 10.2, [_snap(90, 200, 90.0, 60)])
    feed.close()  # what ended is written
    # Another slot on the same GPU, other readings of the same buckets: Redis keeps the first writer's.
    slot = SeriesFeed(f.client, f.keys, "h", bucket_s=5, window_s=3600)
    for t in (b0 + 1.0, b0 + 6.0, b0 + 10.5):
        slot.add(t, [_snap(1, 1, 1.0, 1)])
    slot.close()
    points = gpu_series.read(f.client, f.keys)["h/0"]
    assert [(p.t, p.util_pct, p.mem_used_mib, p.mem_total_mib, p.power_w, p.temp_c) for p in points] == [
        (b0, 20.0, 300, 1000, 60.0, 45.0), (b0 + 5, 90.0, 200, 1000, 90.0, 60.0)]  # means; peak memory
    assert (feed.written, slot.written) == (2, 0)

    # No Redis: readings go on, nothing raises, one warning for the outage.
    dead = SeriesFeed(_unreachable(), f.keys, "h", 5, 3600)
    with caplog.at_level(logging.WARNING, logger="workers.gpu_series_feed"):
        for i in range(4):
            dead.add(b0 + 5 * i, [_snap(50, 10, 10.0, 10)])
        dead.close()
    assert [r.message.split(" (")[0] for r in caplog.records] == ["cannot write GPU series h/0"]


def test_metric_counts_are_cached_and_a_dead_redis_reads_as_down(fleet_ns: Fleet) -> None:
    f = fleet_ns
    f.client.hset(f.keys.queued, "s1", json.dumps(["e", "g"]))
    cached = FleetCollector(f.client, f.namespace, heartbeat_s=0.5, cache_s=60)
    for _ in range(3):
        names = {m.name: m for m in cached.collect()}
    assert cached.count_runs == 1  # three scrapes, one pass over the records
    assert [(s.labels["state"], s.value) for s in names["fleet_samples"].samples if s.value] == [("queued", 1)]
    down = FleetCollector(_unreachable(), f.namespace, 0.5)
    assert [(m.name, m.samples[0].value) for m in down.collect()] == [("fleet_redis_up", 0)]


def _get(url: str, login: tuple[str, str] | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url)
    if login:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def _gauges(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_behind_the_login_give_the_status_counts_and_gpu_gauges(local_fleet: LocalFleet,
                                                                         tmp_path: Path) -> None:
    f = local_fleet
    env = {"FLEET_FAKE_GPUS": write_gpus(tmp_path / "gpus.json"), "FLEET_GPU_SERIES_BUCKET_S": str(BUCKET_S),
           "FLEET_KINDS": TOUCH, "PYTHONPATH": REPO, "FLEET_METRICS_CACHE_S": "0.5", "FLEET_MAX_ATTEMPTS": "1"}
    up = f.fleet("up", "--gpus", "0", check=True, **env)
    assert f.metrics_url in up.stdout
    pid = f.state_file()["pids"]["metrics"]

    # Without the login, or with a wrong one: 401 and nothing else.
    user, password = f.flower_login()
    for login in (None, (user, "wrong"), ("nobody", password)):
        status, body, headers = _get(f.metrics_url, login)
        assert (status, body, headers.get("WWW-Authenticate")) == (401, "", 'Basic realm="fleet"')

    exp = touch_experiment(tmp_path / "exp", [
        {"name": "a", "text": "a"}, {"name": "b", "text": "b", "group": "other"},
        {"name": "bad", "text": "x", "fail": "boom"}, {"name": "waits", "text": "w", "sleep_s": 60},
    ])
    wait_for(lambda: f.client.hexists(f.keys.workers, f"gpu0@{HOST}"), 60, f"worker gpu0\n{f.log_tails()}")
    assert json.loads(f.fleet("enqueue", str(exp), "--json", check=True, **env).stdout)["enqueued"] == 4
    labels = f'{{gpu="0",host="{HOST}"}}'

    def settled() -> dict | None:
        s = json.loads(f.fleet("status", "--json", check=True).stdout)
        return s if (s["done"], s["failed"], s["running"]) == (2, 1, 1) else None

    def scrape() -> dict[str, float] | None:
        code, text, _ = _get(f.metrics_url, (user, password))
        assert code == 200
        g = _gauges(text)  # counts as fresh as the status (the cache is short here) and a GPU point
        done = g.get('fleet_samples{experiment="ops",group="items",state="done"}')
        # Busy as the worker's heartbeat entry says it, which names the sample at its next beat.
        busy = g.get("fleet_workers_busy") == 1
        return g if done == 1 and busy and f"fleet_gpu_utilization_percent{labels}" in g else None

    st = wait_for(settled, 60, f"2 done, 1 failed, the slow one running\n{f.log_tails()}")
    g = wait_for(scrape, 30, "counts and GPU gauges in /metrics")
    for group, row in st["by_group"].items():
        for state in ("done", "failed", "queued", "running"):
            assert g[f'fleet_samples{{experiment="ops",group="{group}",state="{state}"}}'] == row[state], (group, state)
    assert (g["fleet_workers_live"], g["fleet_workers_busy"], g["fleet_redis_up"]) == (1, 1, 1)
    assert g[f"fleet_gpu_utilization_percent{labels}"] == 73.0 and g[f"fleet_gpu_power_watts{labels}"] == 250.5
    assert g[f"fleet_gpu_memory_used_bytes{labels}"] == 20480 * 2**20
    assert g[f"fleet_gpu_memory_total_bytes{labels}"] == 81559 * 2**20
    assert g[f"fleet_gpu_temperature_celsius{labels}"] == 61.0
    assert not [k for k in g if 'gpu="1"' in k]  # no worker on GPU 1

    down = f.fleet("down", "--grace-s", "5", check=True)
    assert "metrics" in down.stdout and pid_gone(pid)
