"""The simulated workers of bench/scale_sim.py: one process holds many, each a thread.

A simulated worker is the real worker core without Celery: a real ``SampleRunner`` (payload
check, ``records.is_done``, ``control.gate``, ``records.claim``, the job, the manifest line,
``records.complete``) and a real ``Heartbeat`` whose ``beat()`` (lease renewal, worker entry,
cancel watch) and ``reap()`` (reaper lock; the winner's scans, orphans, lost messages, delayed
retries) run every ``heartbeat_s``. What Celery and kombu add per worker is replayed with
the same Redis commands a real `fleet worker` sends (seen with MONITOR, docs/SCALE.md): a
BRPOP over every priority list of its queues (1 s timeout, as kombu), the delivery's
bookkeeping (MULTI ZADD unacked_index + HSET unacked EXEC), three task events (PUBLISH), the
ack (MULTI ZREM + HDEL EXEC), a worker-heartbeat event every 2 s, and idle connections up to
the real worker's count (7). The job (``run`` below, the ``job`` of ``kind: noop`` here)
sleeps ``SCALE_SIM_SAMPLE_S`` x U(0.5, 1.5) seconds and touches its output.

Every call of the fleet functions named in ``TIMED`` is timed (client side, ms) while the
driver says it measures; so are the replayed kombu commands and each beat's lag behind its
schedule (the simulator's own health: a lagging beat means the client side, not Redis, is
the bottleneck).
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

SAMPLE_S = float(os.environ.get("SCALE_SIM_SAMPLE_S", "0"))  # mean no-op sample time, s
EVENT = json.dumps({"type": "task-succeeded", "uuid": "0" * 36, "result": "None", "runtime": 0.01,
                    "hostname": "cpu0@simhost000", "utcoffset": 0, "pid": 1, "clock": 1, "timestamp": 0.0,
                    "local_received": 0.0})  # about the size of a Celery task event
HEARTBEAT_EVENT_S = 2.0  # Celery's worker-heartbeat event period


def run(task, ctx):  # (TaskPayload, JobContext) -> JobOutcome: the no-op job
    from bench.noop_kind import touch
    from workers.jobs.base import JobOutcome

    if SAMPLE_S > 0:
        time.sleep(SAMPLE_S * random.uniform(0.5, 1.5))
    touch(task.output_path)
    return JobOutcome(output_path=task.output_path)


class Timings:
    """Per operation, client-side durations (ms) of the calls made while ``on`` is set."""

    def __init__(self) -> None:
        self.on = False
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.ms[name].append((time.perf_counter() - t) * 1000.0)
        return timed

    def note(self, name: str, ms: float) -> None:
        if self.on:
            self.ms[name].append(ms)

    def count(self, name: str) -> None:
        if self.on:
            self.counts[name] += 1


TIMED = {  # module -> functions timed by name (the public names; their code is not touched; absent ones skipped)
    "fleet.records": ["is_done", "claim", "renew", "complete", "orphans", "recover_lost", "release_delayed"],
    "fleet.admission": ["admit", "admit_reference"],  # done check, gate and claim in one script (where it exists)
    "fleet.control": ["gate"],
    "workers.manifest": ["append"],
}


def install_timers(t: Timings) -> None:
    import importlib

    from workers.heartbeat import Heartbeat

    for mod_name, names in TIMED.items():
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, t.wrap(f"{mod_name.rsplit('.', 1)[1]}.{name}", getattr(mod, name)))
    Heartbeat.beat = t.wrap("heartbeat.beat", Heartbeat.beat)  # type: ignore[method-assign]
    Heartbeat.reap = t.wrap("heartbeat.reap", Heartbeat.reap)  # type: ignore[method-assign]
    Heartbeat._confirmed_orphans = t.wrap("heartbeat.confirmed_orphans (reaper)",  # type: ignore[method-assign]
                                          Heartbeat._confirmed_orphans)


class SimWorker:
    """One simulated worker: its runner, heartbeat, kombu-like connection and idle connections."""

    def __init__(self, index: int, per_host: int, settings: Any, url: str, conns: int, t: Timings) -> None:
        import redis

        from fleet.priority import STEPS, priority_list
        from fleet.worker_launch import default_queues
        from workers.heartbeat import Heartbeat
        from workers.runner import SampleRunner

        host = f"simhost{index // per_host:03d}"
        self.name = f"cpu{index % per_host}@{host}"
        self.t = t
        self.client = redis.Redis.from_url(url, socket_timeout=60)  # the runner's and the heartbeat's
        self.runner = SampleRunner(settings, self.client, self.name, (), "cpu")
        self.runner.hostname = host
        queues = default_queues(settings, (), None)
        self.lists = [priority_list(q, s) for s in STEPS for q in queues]  # kombu's BRPOP order
        self.beat = Heartbeat(self.runner, queues)
        self.kombu = redis.Redis.from_url(url, socket_timeout=60)  # BRPOP, delivery bookkeeping, ack, events
        self.idle = [redis.Redis.from_url(url) for _ in range(max(0, conns - 2))]
        for c in self.idle:
            c.ping()  # hold the connection open, as a real worker's other connections are
        self.kombu.ping()
        self.client.ping()

    def serve(self, stop: threading.Event) -> None:
        """Take the next message, run it through the real runner, ack it; until ``stop``. A Redis
        error (maxclients reached) is counted and the worker goes on, as Celery's would."""
        while not stop.is_set():
            try:
                self.serve_one()
            except Exception as e:
                self.t.count(f"kombu error {type(e).__name__}")
                stop.wait(1.0)

    def serve_one(self) -> None:
        """One BRPOP (1 s timeout) and, when it brings a message, its whole delivery."""
        t0 = time.perf_counter()
        got = self.kombu.brpop(self.lists, timeout=1)
        if got is None:
            return
        self.t.note("kombu.brpop (a message waiting)", (time.perf_counter() - t0) * 1000.0)
        raw = got[1]
        env = json.loads(raw)
        tag = env["properties"]["delivery_tag"]
        queue = env["properties"]["delivery_info"]["routing_key"]
        t0 = time.perf_counter()
        pipe = self.kombu.pipeline(transaction=True)
        pipe.zadd("unacked_index", {tag: time.time()})
        pipe.hset("unacked", tag, json.dumps([env, "", queue]))
        pipe.execute()
        self.t.note("kombu.deliver", (time.perf_counter() - t0) * 1000.0)
        self.kombu.publish("/0.celeryev/task.multi", EVENT)  # task-received
        self.kombu.publish("/0.celeryev/task.multi", EVENT)  # task-started
        try:
            outcome = self.runner.run(task_argument(env), queue)
        except Exception as e:  # the real task would end as FAILURE and the worker go on
            outcome = f"error {type(e).__name__}: {e}"[:120]
        self.t.count(f"outcome {outcome}")
        self.kombu.publish("/0.celeryev/task.multi", EVENT)  # task-succeeded / failed
        t0 = time.perf_counter()
        pipe = self.kombu.pipeline(transaction=True)
        pipe.zrem("unacked_index", tag)
        pipe.hdel("unacked", tag)
        pipe.execute()
        self.t.note("kombu.ack", (time.perf_counter() - t0) * 1000.0)


def task_argument(env: dict) -> object:
    """The fleet task's one argument, as Celery hands it over: the body is base64 (kombu's
    default) or the JSON text itself (``body_encoding`` absent)."""
    body = env["body"]
    if (env.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body).decode("utf-8")
    return json.loads(body)[0][0]


def beat_loop(workers: list[SimWorker], heartbeat_s: float, stop: threading.Event, t: Timings) -> None:
    """The heartbeats (fleet's and Celery's) of ``workers``, each on its own schedule, spread over the period."""
    now = time.monotonic()
    due = [(now + heartbeat_s * random.random(), now + HEARTBEAT_EVENT_S * random.random(), w) for w in workers]
    while not stop.is_set():
        i = min(range(len(due)), key=lambda k: min(due[k][0], due[k][1]))
        beat_at, event_at, w = due[i]
        wait = min(beat_at, event_at) - time.monotonic()
        if wait > 0 and stop.wait(wait):
            return
        late = (time.monotonic() - min(beat_at, event_at)) * 1000.0
        beating = beat_at <= event_at
        try:
            if beating:
                t.note("beat lag (simulator health)", late)
                w.beat.beat()
                w.beat.reap()
            else:
                w.kombu.publish("/0.celeryev/worker.heartbeat", EVENT)
        except Exception as e:  # a refused connection at the breaking point: counted, and on
            t.count(f"{'beat' if beating else 'event'} error {type(e).__name__}")
        if beating:
            beat_at += heartbeat_s
        else:
            event_at += HEARTBEAT_EVENT_S
        due[i] = (beat_at, event_at, w)


def serve(cfg: dict, ready: Any, measuring: Any, stop_ev: Any, results: Any) -> None:
    """A child process: ``cfg["count"]`` workers from ``cfg["first"]``; reports to ``results`` when stopped."""
    os.environ.update(cfg["env"])
    global SAMPLE_S
    SAMPLE_S = float(cfg["env"]["SCALE_SIM_SAMPLE_S"])
    from fleet.settings import load_settings

    t = Timings()
    install_timers(t)
    if not cfg["manifest"]:  # a file, not Redis: off takes the simulator's own lock convoy out (docs/SCALE.md)
        import workers.manifest

        workers.manifest.append = lambda *args, **kwargs: None
    settings = load_settings()
    workers = []
    for i in range(cfg["first"], cfg["first"] + cfg["count"]):
        try:
            workers.append(SimWorker(i, cfg["per_host"], settings, cfg["url"], cfg["conns"], t))
        except Exception as e:  # maxclients reached: the wall is a figure, not a crash
            t.on = True
            t.count(f"worker refused: {type(e).__name__}: {e}"[:160])
            t.on = False
    stop = threading.Event()
    threads = [threading.Thread(target=w.serve, args=(stop,), daemon=True) for w in workers]
    n_beat = max(1, len(workers) // 50) if workers else 0
    threads += [threading.Thread(target=beat_loop, args=(workers[k::n_beat], settings.heartbeat_s, stop, t),
                                 daemon=True) for k in range(n_beat)]
    for th in threads:
        th.start()
    ready.put((cfg["count"], len(workers), dict(t.counts)))
    t.counts.clear()
    while not stop_ev.wait(0.1):
        t.on = measuring.is_set()
    t.on = False
    stop.set()
    results.put({"ms": dict(t.ms), "counts": dict(t.counts)})
    results.close()
    results.join_thread()  # the queue's feeder thread has written it all
    os._exit(0)  # threads in a job's sleep are not waited for: the driver flushes Redis next
