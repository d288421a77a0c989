"""Chaos bench (issue 8): a real `fleet up` whose workers and Redis are SIGKILLed at random moments.

    .venv/bin/python bench/chaos.py [--seed 1] [--samples 200] [--worker-kills 10] [--redis-kills 2]
                                    [--workers 4] [--backlog 1000] [--backlog-kills 3] [--workdir DIR] [--keep]

A private fleet: `fleet up --cpu-workers W` with the embedded Redis, in its own state folder
(FLEET_STATE_DIR), its own Redis and Flower ports, a short lease (FLEET_LEASE_TTL_S, default
10) and heartbeat (FLEET_HEARTBEAT_S, default 1), and the bench's own kind
(bench/chaos_kind.py, registered through FLEET_KINDS with PYTHONPATH = the repo root). Every
sample sleeps 0.2-2 s, logs "start" and "end" lines to an O_APPEND log shared by all
workers, and writes a 48 KiB output atomically.

Phase A (chaos): N samples (default 200) are enqueued; at random moments (seeded RNG:
progress points drawn in [4 %, 85 %] of N, plus a random 0-1.5 s) the bench SIGKILLs a
worker that is running a sample (the supervisor restarts it) or the embedded Redis (brought
back after a random 0.5-3 s: by `fleet up` when it restarts a dead embedded Redis, else by
the bench with fleet.launcher.start_embedded_redis and the same settings). The phase ends
when every sample is done (or at its deadline).

Phase B (backlog): 1,000+ more samples are enqueued behind the rest; the bench waits for a
worker to start a sample X, SIGKILLs that worker at once, and measures the time until X
starts again on another worker, with the queue length at the kill; repeated --backlog-kills
times. The reaper publishes an orphan at the front of its queue, so the backlog must not
delay it. The phase then stops (`fleet down`); its leftover backlog is not counted lost.

Printed: the definitions below, lost / run twice / half-written, the kill-to-restart times,
and one JSON object as the last line. The targets: 0 / 0 / 0, and every restart within 45 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.chaos_kind import KIND, expected_content  # noqa: E402
from fleet.contract import CompletionRecord, Keys  # noqa: E402

DEFINITIONS = """\
definitions:
  run          one execution of a sample's job: a "start" line in the run log, ended by its "end"
               line (completed run) or, without one, by the SIGKILL of its worker (killed run;
               the bench knows the kill time); a run with neither is open until the end of the phase.
  lost         a planned sample that, at the end of the phase, is not in <ns>:done with a
               completion record, or whose output file is missing.
  run twice    a sample with (a) two runs whose [start, end] intervals overlap in time (two
               workers on it at once), or (b) two or more completed runs, unless every completed
               run but the one its completion record names was cut off by a bench SIGKILL of its
               worker after the job's "end" line and before its completion record reached Redis
               (checked right after the kill): at-least-once delivery must repeat such a run, and
               those are counted apart as "re-run after a kill in the commit window". A re-run
               after a run killed mid-sample (no "end" line) is the expected recovery, not a
               double run.
  half-written an output path that exists with content that is not exactly the expected full
               content (checked after every kill, every 3 s, and at the end), or a file with a
               non-hidden name under the output folder that is no planned output (a temporary
               left visible). Hidden temporaries (".<name>.<pid>.<rand>.tmp") left by a worker
               killed mid-write are counted apart (visible to nobody who lists outputs).
  kill-to-restart  from the bench's SIGKILL of a worker to the next "start" line of the sample
               that worker was running (on another worker process): the job running again.
  kill-to-claim    the same, to the moment another worker took the sample (the runner's
               "start <id>" line in its log, before the job; a fresh worker's first sample
               imports torch in between).
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid: int) -> bool:
    """False when ``pid`` has exited (no such process, or a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def reap_children() -> None:
    """Collect exited children of this process (a Redis the bench restarted, then killed)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ---- the run log ---------------------------------------------------------------------------
@dataclass
class Run:
    sid: str
    pid: int
    start: float
    attempt: int
    end: float | None = None


class RunLog:
    """Reads the O_APPEND start/end log incrementally (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.runs: list[Run] = []
        self.open: dict[tuple[str, int], Run] = {}  # (sid, pid) -> its run without an end line yet
        self.ended: set[str] = set()
        self.bad_lines: list[str] = []

    def poll(self) -> list[Run]:
        """Read what was appended; returns the runs that started in it."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        started = []
        for line in data[:cut].decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) != 6 or parts[0] not in ("start", "end"):
                self.bad_lines.append(line)
                continue
            what, sid, pid, mono, _wall, attempt = parts
            key = (sid, int(pid))
            if what == "start":
                if key in self.open:  # the same process started it again without ending it: keep both
                    self.bad_lines.append(f"(start again without end) {line}")
                run = Run(sid, int(pid), float(mono), int(attempt))
                self.runs.append(run)
                self.open[key] = run
                started.append(run)
            else:
                run = self.open.pop(key, None)
                if run is None:
                    self.bad_lines.append(f"(end without start) {line}")
                    continue
                run.end = float(mono)
                self.ended.add(sid)
        return started

    def open_run_of(self, pid: int) -> Run | None:
        found = [r for (_, p), r in self.open.items() if p == pid]
        return max(found, key=lambda r: r.start) if found else None


# ---- the fleet -------------------------------------------------------------------------------
@dataclass
class Fleet:
    root: Path
    workers: int
    lease_ttl_s: float
    heartbeat_s: float
    max_deliveries: int
    state: Path = field(init=False)
    redis_port: int = field(init=False)
    flower_port: int = field(init=False)
    metrics_port: int = field(init=False)
    seen_pids: set[int] = field(default_factory=set)
    _client: redis.Redis | None = None

    def __post_init__(self) -> None:
        self.state = self.root / "state"
        self.redis_port, self.flower_port, self.metrics_port = free_ports(3)
        self.keys = Keys("fleet")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(
            FLEET_STATE_DIR=str(self.state), FLEET_EMBEDDED_REDIS_PORT=str(self.redis_port),
            FLEET_FLOWER_PORT=str(self.flower_port), FLEET_METRICS_PORT=str(self.metrics_port),
            FLEET_OUTPUT_ROOTS=json.dumps([str(self.root)]),
            FLEET_LEASE_TTL_S=str(self.lease_ttl_s), FLEET_HEARTBEAT_S=str(self.heartbeat_s),
            FLEET_MAX_DELIVERIES=str(self.max_deliveries),
            FLEET_KINDS=json.dumps({"chaos": {"planner": "bench.chaos_kind", "job": "bench.chaos_kind"}}),
            PYTHONPATH=str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
            OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
        )
        return env

    def cli(self, *args: str, timeout_s: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "fleet.cli", *args], env=self.env(), capture_output=True, text=True,
                           timeout=timeout_s, cwd=str(self.root))
        self.remember()
        if check and r.returncode:
            raise SystemExit(f"fleet {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def settings(self):
        from fleet.settings import load_settings

        return load_settings(state_dir=self.state, embedded_redis_port=self.redis_port, flower_port=self.flower_port)

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            password = (self.state / "redis.password").read_text().strip()
            self._client = redis.Redis(host="127.0.0.1", port=self.redis_port, password=password,
                                       socket_connect_timeout=1, socket_timeout=5)
        return self._client

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    def state_file(self) -> dict:
        try:
            return json.loads((self.state / "run" / "fleet.json").read_text())
        except (OSError, ValueError):
            return {}

    def worker_pids(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads((self.state / "run" / "workers.json").read_text()).items()}
        except (OSError, ValueError):
            return {}

    def remember(self) -> None:
        self.seen_pids.update(int(p) for p in self.state_file().get("pids", {}).values())
        self.seen_pids.update(self.worker_pids().values())

    def done_count(self) -> int | None:
        try:
            return int(self.client.scard(self.keys.done))
        except (redis.RedisError, OSError):
            return None

    def queue_depth(self) -> int:
        """Messages waiting in every list of the fleet's queues (kombu's priority lists included)."""
        keys = list(self.client.scan_iter(match="fleet.q.*", count=1000))
        return sum(self.client.llen(k) for k in keys if self.client.type(k) == b"list")

    def processes(self) -> dict[int, str]:
        """Live processes of this fleet: their environment names its state folder, or they hold
        a file in it open (redis-server overwrites its environment with its title)."""
        mark = f"FLEET_STATE_DIR={self.state}".encode()
        root = str(self.state) + os.sep
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                ours = mark in (d / "environ").read_bytes().split(b"\0")
                if not ours:
                    for fd in (d / "fd").iterdir():
                        try:
                            if os.readlink(fd).startswith(root):
                                ours = True
                                break
                        except OSError:
                            continue
                if ours and pid_alive(int(d.name)):
                    found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
        return found

    def kill_leftovers(self) -> list[int]:
        self.remember()
        left = sorted({p for p in self.seen_pids if pid_alive(p)} | set(self.processes()))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap_children()
        return left


# ---- chaos events ----------------------------------------------------------------------------
@dataclass
class Chaos:
    fleet: Fleet
    rng: random.Random
    runlog: RunLog
    kills: list[dict] = field(default_factory=list)  # worker kills
    redis_kills: list[dict] = field(default_factory=list)
    commit_window: set[tuple[str, int]] = field(default_factory=set)  # (sid, pid): completed, killed before its record

    def kill_worker(self, phase: str, only_running: bool = True, wait_s: float = 15.0) -> dict | None:
        """SIGKILL a random fleet worker that is running a sample (any live worker after wait_s)."""
        f = self.fleet
        deadline = time.monotonic() + wait_s
        while True:
            self.runlog.poll()
            pids = sorted(p for p in f.worker_pids().values() if pid_alive(p))
            running = [p for p in pids if self.runlog.open_run_of(p) is not None]
            if running or (not only_running and pids) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        choice = running or pids
        if not choice:
            log("no live worker to kill")
            return None
        pid = self.rng.choice(choice)
        return self._kill(pid, phase)

    def _kill(self, pid: int, phase: str) -> dict:
        os.kill(pid, signal.SIGKILL)
        t, t_wall = time.monotonic(), time.time()
        name = next((n for n, p in self.fleet.worker_pids().items() if p == pid), "?")
        self.runlog.poll()  # the process is gone: what its log says now is final
        run = self.runlog.open_run_of(pid)
        ev = {"phase": phase, "t": t, "t_wall": t_wall, "pid": pid, "worker": name, "sample": run.sid if run else None,
              "into_sample_s": round(t - run.start, 3) if run else None}
        if run is None:
            # Idle, or between its job's end and its record: does the record of its last run name it?
            mine = [r for r in self.runlog.runs if r.pid == pid and r.end is not None]
            if mine:
                last = max(mine, key=lambda r: r.end)
                ev["after_end_s"] = round(t - last.end, 3)
                rec = self._record_pid(last.sid)
                ev["last_sample"], ev["record_names_it"] = last.sid, rec == pid
                if rec != pid:
                    self.commit_window.add((last.sid, pid))
        self.kills.append(ev)
        log(f"SIGKILL worker {name} pid {pid}" + (f" {ev['into_sample_s']:.2f} s into {run.sid[:8]}" if run else
                                                    " (not in a sample)"))
        return ev

    def _record_pid(self, sid: str, wait_s: float = 15.0) -> int | None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                raw = self.fleet.client.hget(self.fleet.keys.records, sid)
                return None if raw is None else int(CompletionRecord.model_validate_json(raw).metrics.get("pid", -1))
            except (redis.RedisError, OSError):
                time.sleep(0.2)
        return None

    def kill_redis(self, phase: str, workers: int) -> dict:
        f = self.fleet
        pid = int(f.state_file().get("pids", {}).get("redis", 0))
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmdline = "?"
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        while pid_alive(pid):
            reap_children()
            time.sleep(0.01)
        down = self.rng.uniform(0.5, 3.0)
        log(f"SIGKILL redis pid {pid}; bringing it back in {down:.1f} s")
        time.sleep(down)
        t_up = time.monotonic()
        r = f.cli("up", "--cpu-workers", str(workers), check=False, timeout_s=60)
        how = "fleet up"
        if not f.ping():
            # `fleet up` found the rest of the fleet alive and left the dead Redis alone: start it
            # the way `fleet up` does, with the same settings, and record its pid for `fleet down`.
            from fleet.launcher import start_embedded_redis, write_json_atomic

            new = start_embedded_redis(f.settings())
            st = f.state_file()
            st.setdefault("pids", {})["redis"] = new
            write_json_atomic(f.state / "run" / "fleet.json", st)
            f.seen_pids.add(new)
            how = "bench (start_embedded_redis)"
        while not f.ping():
            time.sleep(0.05)
        t_back = time.monotonic()
        new_pid = int(f.state_file().get("pids", {}).get("redis", 0))
        ev = {"phase": phase, "t": t, "pid": pid, "down_s": round(t_back - t, 3), "restart_s": round(t_back - t_up, 3),
              "restarted_by": how, "new_pid": new_pid, "fleet_up_rc": r.returncode,
              "fleet_up_said": (r.stdout.strip().splitlines() or [""])[0], "cmdline": cmdline}
        self.redis_kills.append(ev)
        log(f"redis back (pid {new_pid}, by {how}) {ev['down_s']:.1f} s after the kill")
        return ev


# ---- checks ----------------------------------------------------------------------------------
def check_outputs(samples: dict, bad: dict[str, str]) -> None:
    """Every existing planned output must hold exactly its content; adds offenders to ``bad``."""
    for sid, s in samples.items():
        try:
            data = Path(s["path"]).read_bytes()
        except FileNotFoundError:
            continue
        if data != s["content"]:
            bad.setdefault(s["path"], f"{len(data)} bytes, expected {len(s['content'])}")


def stray_files(out_root: Path, planned: set[str]) -> tuple[list[str], list[str]]:
    """(visible files that are no planned output, hidden temporaries) under ``out_root``."""
    visible, hidden = [], []
    for dirpath, dirnames, filenames in os.walk(out_root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .fleet-work: the fleet's own
        for n in filenames:
            p = os.path.join(dirpath, n)
            if n.startswith("."):
                hidden.append(p)
            elif p not in planned:
                visible.append(p)
    return visible, hidden


def analyse(runlog: RunLog, samples: dict, kills: list[dict], commit_window: set, phase_end: float,
            records: dict[str, int | None]) -> dict:
    killed_at = {k["pid"]: k["t"] for k in kills}
    by_sid: dict[str, list[Run]] = {}
    for r in runlog.runs:
        by_sid.setdefault(r.sid, []).append(r)
    overlap, twice, window, open_runs = [], [], [], []
    for sid, runs in by_sid.items():
        spans = []
        for r in runs:
            end = r.end if r.end is not None else killed_at.get(r.pid)
            if end is None:
                open_runs.append((sid, r.pid))
                end = phase_end
            spans.append((r.start, end, r))
        spans.sort(key=lambda x: x[0])
        if any(spans[j][0] < spans[i][1] for i in range(len(spans)) for j in range(i + 1, len(spans))):
            overlap.append(sid)
        done_runs = [r for r in runs if r.end is not None]
        if len(done_runs) > 1:
            rec_pid = records.get(sid)
            extra = [r for r in done_runs if r.pid != rec_pid] if rec_pid in {r.pid for r in done_runs} else done_runs
            if all((sid, r.pid) in commit_window for r in extra):
                window.append(sid)
            else:
                twice.append(sid)
    restarts = []
    for k in kills:
        sid = k.get("sample")
        if sid is None or sid not in samples:
            continue  # not in a sample, or another phase's
        again = [r.start for r in by_sid.get(sid, []) if r.start > k["t"] and r.pid != k["pid"]]
        k["restart_s"] = round(min(again) - k["t"], 3) if again else None
        restarts.append(k["restart_s"])
    return {"run_twice": sorted(set(overlap) | set(twice)), "overlapping": sorted(overlap),
            "completed_twice": sorted(twice), "rerun_commit_window": sorted(window), "open_runs": open_runs,
            "restarts": restarts, "runs": len(runlog.runs), "samples_started": len(by_sid),
            "runs_per_sample_max": max((len(v) for v in by_sid.values()), default=0)}


CLAIM_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO fleet\.worker \[(\d+)\] start ([0-9a-f]{32}):")


def claims(state: Path) -> dict[str, list[tuple[float, int]]]:
    """sid -> [(wall time, pid)] of the runner's "start <sid>" lines in the workers' logs: the
    moment a worker took the sample (its lease), before the job runs (and, on a worker's first
    sample, before it imports torch)."""
    from datetime import datetime

    out: dict[str, list[tuple[float, int]]] = {}
    for p in (state / "logs").glob("worker-*.log"):
        for line in p.read_text(errors="replace").splitlines():
            m = CLAIM_LINE.match(line)
            if m:
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
                out.setdefault(m.group(4), []).append((t, int(m.group(3))))
    return out


def add_claimed(kills: list[dict], found: dict[str, list[tuple[float, int]]]) -> None:
    """Each kill's ``claimed_s``: from the kill to the first claim of its sample by another worker
    (the log's milliseconds: +-1 ms)."""
    for k in kills:
        sid = k.get("sample")
        if sid is None:
            continue
        later = [t for t, pid in found.get(sid, []) if pid != k["pid"] and t > k["t_wall"] - 0.001]
        k["claimed_s"] = round(min(later) - k["t_wall"], 3) if later else None


def final_records(f: Fleet, sids: list[str]) -> tuple[dict[str, int | None], set[str], dict[str, int], list[str]]:
    """(sid -> pid its record names, the done ones, deliveries histogram, failed ids)."""
    recs, done, hist = {}, set(), {}
    raw = f.client.hmget(f.keys.records, sids)
    members = f.client.smismember(f.keys.done, sids)
    for sid, v, m in zip(sids, raw, members):
        if v is not None:
            rec = CompletionRecord.model_validate_json(v)
            recs[sid] = int(rec.metrics.get("pid", -1))
            hist[str(rec.deliveries)] = hist.get(str(rec.deliveries), 0) + 1
        if m and v is not None:
            done.add(sid)
    failed = [sid for sid, v in zip(sids, f.client.hmget(f.keys.failed, sids)) if v is not None]
    return recs, done, hist, failed


def plan(exp_path: Path) -> dict:
    exp = KIND.load(exp_path, yaml.safe_load(exp_path.read_text()), None)
    from fleet.kinds.base import PlanContext

    return {s.sample_id: {"path": s.output_path, "name": s.body["name"], "sleep_s": s.body["sleep_s"],
                          "content": expected_content(s.sample_id, s.body["name"])}
            for s in KIND.plan(exp, None, PlanContext()).samples}


def write_experiment(root: Path, name: str, count: int, seed: int, prefix: str) -> Path:
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"kind": "chaos", "name": name, "count": count, "seed": seed, "prefix": prefix,
                                 "output": f"out-{name}", "log": f"runs-{name}.log"}))
    return p


def log_excerpts(state: Path, patterns: tuple[str, ...], n: int = 12) -> dict:
    """Lines of the fleet's logs matching any pattern (the first ``n`` per pattern), how many
    lines match each, and the exception types that end the logs' tracebacks, counted."""
    out: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    exc_line = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Refused\w*))\b")
    for p in sorted((state / "logs").glob("*.log")):
        for line in p.read_text(errors="replace").splitlines():
            for pat in patterns:
                if pat in line:
                    counts[pat] = counts.get(pat, 0) + 1
                    if len(out.setdefault(pat, [])) < n:
                        out[pat].append(f"{p.name}: {line[:300]}")
            m = exc_line.match(line)
            if m:
                key = f"{p.name.split('-')[0]}: {m.group(1)}"
                exceptions[key] = exceptions.get(key, 0) + 1
    return {"counts": counts, "traceback_exceptions": exceptions, **out}


# ---- phases ----------------------------------------------------------------------------------
def phase_chaos(f: Fleet, args: argparse.Namespace, rng: random.Random) -> dict:
    exp = write_experiment(f.root, "chaos", args.samples, args.seed, "s")
    samples = plan(exp)
    out_root = f.root / "out-chaos"
    runlog = RunLog(f.root / "runs-chaos.log")
    chaos = Chaos(f, rng, runlog)
    t0 = time.monotonic()
    res = json.loads(f.cli("enqueue", str(exp), "--json").stdout)
    log(f"phase A: enqueued {res['enqueued']} samples ({time.monotonic() - t0:.1f} s)")
    events = ["worker"] * args.worker_kills + ["redis"] * args.redis_kills
    rng.shuffle(events)
    triggers = sorted(rng.uniform(0.04, 0.85) * args.samples for _ in events)
    plan_ev = [(trig, kind, rng.uniform(0.0, 1.5)) for trig, kind in zip(triggers, events)]
    log("phase A: events at progress " + ", ".join(f"{k}@{int(t)}" for t, k, _ in plan_ev))
    bad: dict[str, str] = {}
    t_start = time.monotonic()
    deadline = t_start + args.phase_timeout_s
    last_scan = 0.0
    done = 0
    i = 0
    armed_at: float | None = None
    while time.monotonic() < deadline:
        runlog.poll()
        progress = len(runlog.ended)
        now = time.monotonic()
        if i < len(plan_ev) and progress >= plan_ev[i][0]:
            armed_at = armed_at or now
            if now - armed_at >= plan_ev[i][2]:
                if plan_ev[i][1] == "worker":
                    chaos.kill_worker("A")
                else:
                    chaos.kill_redis("A", args.workers)
                check_outputs(samples, bad)
                last_scan = time.monotonic()
                i += 1
                armed_at = None
                continue
        if now - last_scan > 3.0:
            check_outputs(samples, bad)
            last_scan = now
            d = f.done_count()
            done = d if d is not None else done
            if i >= len(plan_ev) and done >= args.samples:
                break
        time.sleep(0.05)
    t_done = time.monotonic()
    log(f"phase A: {done}/{args.samples} done in {t_done - t_start:.1f} s; {i}/{len(plan_ev)} events")
    return {"exp": exp, "samples": samples, "runlog": runlog, "chaos": chaos, "bad": bad, "out_root": out_root,
            "wall_s": round(t_done - t_start, 1), "events_done": i, "t_end": t_done}


def phase_backlog(f: Fleet, args: argparse.Namespace, rng: random.Random, chaos_a: Chaos) -> dict:
    exp = write_experiment(f.root, "backlog", args.backlog + args.backlog_margin, args.seed, "b")
    samples = plan(exp)
    runlog = RunLog(f.root / "runs-backlog.log")
    chaos = Chaos(f, rng, runlog, commit_window=chaos_a.commit_window)
    t0 = time.monotonic()
    res = json.loads(f.cli("enqueue", str(exp), "--json").stdout)
    log(f"phase B: enqueued {res['enqueued']} samples ({time.monotonic() - t0:.1f} s); queue {f.queue_depth()}")
    bad: dict[str, str] = {}
    rounds = []
    for k in range(args.backlog_kills):
        time.sleep(rng.uniform(0.5, 2.0))
        runlog.poll()
        seen = len(runlog.runs)
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            runlog.poll()
            live = set(f.worker_pids().values())
            for r in runlog.runs[seen:]:
                # A sample that just started and sleeps long enough for the kill to land inside it.
                if r.end is None and r.pid in live and samples[r.sid]["sleep_s"] >= 0.8 and pid_alive(r.pid):
                    victim = r
                    break
            seen = len(runlog.runs)
            if victim is None:
                time.sleep(0.01)
        if victim is None:
            log("phase B: no sample started within 60 s")
            break
        ev = chaos._kill(victim.pid, "B")
        depth = f.queue_depth()
        ev["queue_at_kill"] = depth
        sid = ev["sample"]
        t_again = None
        wait_until = time.monotonic() + 120
        while time.monotonic() < wait_until:
            runlog.poll()
            again = [r for r in runlog.runs if r.sid == sid and r.start > ev["t"]]
            if again:
                t_again = again[0].start
                break
            time.sleep(0.02)
        ev["restart_s"] = round(t_again - ev["t"], 3) if t_again else None
        ev["queue_at_restart"] = f.queue_depth()
        rounds.append(ev)
        log(f"phase B: kill {k + 1}: {sid[:8] if sid else None} started again "
            + (f"{ev['restart_s']:.2f} s after the kill" if t_again else "NOT within 120 s")
            + f" (queued at the kill {depth}, at the restart {ev['queue_at_restart']})")
        check_outputs(samples, bad)
    return {"exp": exp, "samples": samples, "runlog": runlog, "chaos": chaos, "bad": bad, "rounds": rounds,
            "out_root": f.root / "out-backlog"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--worker-kills", type=int, default=10)
    ap.add_argument("--redis-kills", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4, help="CPU workers (`fleet up --cpu-workers`)")
    ap.add_argument("--lease-ttl-s", type=float, default=10.0)
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--max-deliveries", type=int, default=10,
                    help="FLEET_MAX_DELIVERIES: raised so that random kills landing on one sample three times do "
                         "not fail it by design (the policy for samples that keep killing their worker)")
    ap.add_argument("--backlog", type=int, default=1000, help="samples queued behind the killed one in phase B")
    ap.add_argument("--backlog-margin", type=int, default=300, help="phase B enqueues backlog + this many")
    ap.add_argument("--backlog-kills", type=int, default=3)
    ap.add_argument("--phase-timeout-s", type=float, default=240.0)
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="chaos-", dir=args.workdir)).resolve()
    else:
        root = Path(tempfile.mkdtemp(prefix="fleet-chaos-")).resolve()
    f = Fleet(root, args.workers, args.lease_ttl_s, args.heartbeat_s, args.max_deliveries)
    print(DEFINITIONS)
    log(f"workdir {root}; redis port {f.redis_port}, flower port {f.flower_port}; FLEET_LEASE_TTL_S={args.lease_ttl_s} "
        f"FLEET_HEARTBEAT_S={args.heartbeat_s} FLEET_MAX_DELIVERIES={args.max_deliveries}, {args.workers} CPU workers, "
        f"seed {args.seed}")
    t_all = time.monotonic()
    result: dict = {}
    failed_run = True
    try:
        t0 = time.monotonic()
        f.cli("up", "--cpu-workers", str(args.workers))
        deadline = time.monotonic() + 90
        while len([p for p in f.worker_pids().values() if pid_alive(p)]) < args.workers or not f.ping():
            if time.monotonic() > deadline:
                raise SystemExit("the workers did not start within 90 s")
            time.sleep(0.2)
        up_s = time.monotonic() - t0
        log(f"fleet up: {up_s:.1f} s, workers {f.worker_pids()}")

        a = phase_chaos(f, args, rng)
        b = phase_backlog(f, args, rng, a["chaos"]) if args.backlog_kills > 0 else None

        # Late duplicates would show as runs after this point: give the reaper a lease to act on
        # anything stale before the books are closed.
        time.sleep(args.lease_ttl_s + 3 * args.heartbeat_s)
        a["runlog"].poll()
        if b:
            b["runlog"].poll()
        t_end = time.monotonic()

        add_claimed(a["chaos"].kills + (b["rounds"] if b else []), claims(f.state))
        sids_a = list(a["samples"])
        recs_a, done_a, hist_a, failed_a = final_records(f, sids_a)
        check_outputs(a["samples"], a["bad"])
        missing = [sid for sid in sids_a if not Path(a["samples"][sid]["path"]).exists()]
        lost = sorted(set(sids_a) - done_a | set(missing))
        vis_a, hid_a = stray_files(a["out_root"], {s["path"] for s in a["samples"].values()})
        kills_all = a["chaos"].kills + (b["chaos"].kills if b else [])
        an_a = analyse(a["runlog"], a["samples"], kills_all, a["chaos"].commit_window, t_end, recs_a)
        res_a = {
            "samples": len(sids_a), "lost": len(lost), "lost_ids": lost[:20], "failed": failed_a,
            "run_twice": len(an_a["run_twice"]), "run_twice_ids": an_a["run_twice"][:20],
            "overlapping": an_a["overlapping"], "completed_twice": an_a["completed_twice"],
            "rerun_commit_window": an_a["rerun_commit_window"],
            "half_written": len(a["bad"]) + len(vis_a), "half_written_paths": dict(list(a["bad"].items())[:20]),
            "visible_strays": vis_a[:20], "hidden_temporaries_left": len(hid_a),
            "worker_kills": len(a["chaos"].kills), "redis_kills": len(a["chaos"].redis_kills),
            "kills_in_a_sample": sum(1 for k in a["chaos"].kills if k["sample"]),
            "restart_s": [k.get("restart_s") for k in a["chaos"].kills if k["sample"]],
            "worst_restart_s": max((k["restart_s"] for k in a["chaos"].kills if k.get("restart_s") is not None),
                                   default=None),
            "claimed_s": [k.get("claimed_s") for k in a["chaos"].kills if k["sample"]],
            "never_restarted": [k["sample"] for k in a["chaos"].kills if k["sample"] and k.get("restart_s") is None],
            "runs": an_a["runs"], "runs_per_sample_max": an_a["runs_per_sample_max"], "open_runs": an_a["open_runs"],
            "deliveries_histogram": hist_a, "wall_s": a["wall_s"], "events_done": a["events_done"],
            "redis_events": a["chaos"].redis_kills, "worker_events": a["chaos"].kills,
            "bad_log_lines": a["runlog"].bad_lines[:10],
        }
        result = {"phase_a": res_a}
        if b:
            sids_b = list(b["samples"])
            recs_b, done_b, _, failed_b = final_records(f, sids_b)
            check_outputs(b["samples"], b["bad"])
            vis_b, hid_b = stray_files(b["out_root"], {s["path"] for s in b["samples"].values()})
            an_b = analyse(b["runlog"], b["samples"], kills_all, b["chaos"].commit_window, t_end, recs_b)
            rs = [r["restart_s"] for r in b["rounds"]]
            result["phase_b"] = {
                "enqueued": len(sids_b), "kills": len(b["rounds"]), "restart_s": rs,
                "worst_restart_s": None if not rs or None in rs else max(rs),
                "claimed_s": [r.get("claimed_s") for r in b["rounds"]],
                "queue_at_kill": [r["queue_at_kill"] for r in b["rounds"]],
                "queue_at_restart": [r["queue_at_restart"] for r in b["rounds"]],
                "done_at_end": len(done_b), "failed": failed_b,
                "run_twice": len(an_b["run_twice"]), "run_twice_ids": an_b["run_twice"][:20],
                "rerun_commit_window": an_b["rerun_commit_window"],
                "half_written": len(b["bad"]) + len(vis_b), "half_written_paths": dict(list(b["bad"].items())[:20]),
                "hidden_temporaries_left": len(hid_b), "events": b["rounds"],
            }
        result["log_excerpts"] = log_excerpts(f.state, ("published it again", "lost the lease", "ERROR", "CRITICAL",
                                                        "restarting in", "replayed", "kept in", "skipping duplicate",
                                                        "message was lost", "failed "))
        failed_run = False
    finally:
        t0 = time.monotonic()
        try:
            r = f.cli("down", "--grace-s", "5", check=False, timeout_s=120)
            down = (r.stdout.strip() or r.stderr.strip()).splitlines()[-1:] if (r.stdout or r.stderr) else []
        except subprocess.TimeoutExpired:
            down = ["fleet down timed out"]
        left = f.kill_leftovers()
        log(f"fleet down: {down} ({time.monotonic() - t0:.1f} s); leftovers killed: {left}")
        if not failed_run:
            result["leftovers_killed"] = left
        if not (args.workdir or args.keep):
            shutil.rmtree(root, ignore_errors=True)
        elif failed_run:
            log(f"kept {root}")

    a = result["phase_a"]
    b = result.get("phase_b")
    settings = {"lease_ttl_s": args.lease_ttl_s, "heartbeat_s": args.heartbeat_s, "max_deliveries": args.max_deliveries,
                "workers": args.workers, "seed": args.seed, "cores": os.cpu_count()}
    print()
    print(f"phase A (chaos): {a['samples']} samples, {a['worker_kills']} worker SIGKILLs "
          f"({a['kills_in_a_sample']} mid-sample), {a['redis_kills']} Redis SIGKILLs, {a['wall_s']} s")
    print(f"  lost          {a['lost']}" + (f"  {a['lost_ids']}" if a["lost"] else ""))
    print(f"  run twice     {a['run_twice']}  (overlapping {len(a['overlapping'])}, completed twice "
          f"{len(a['completed_twice'])}; re-runs after a kill in the commit window, not counted: "
          f"{len(a['rerun_commit_window'])})")
    print(f"  half-written  {a['half_written']}  (hidden temporaries left by kills mid-write: "
          f"{a['hidden_temporaries_left']})")
    rs = [x for x in a["restart_s"] if x is not None]
    if rs:
        print(f"  kill-to-restart: worst {max(rs):.2f} s, median {statistics.median(rs):.2f} s over {len(rs)} kills "
              f"({', '.join(f'{x:.1f}' for x in a['restart_s'] if x is not None)})")
    cs = [x for x in a["claimed_s"] if x is not None]
    if cs:
        print(f"  kill-to-claim (a worker took it again, before its job started): worst {max(cs):.2f} s, "
              f"median {statistics.median(cs):.2f} s")
    for e in a["redis_events"]:
        print(f"  redis kill: down {e['down_s']:.2f} s, restarted by {e['restarted_by']}")
    print(f"  deliveries per record: {a['deliveries_histogram']}; failed {len(a['failed'])}")
    if b:
        print(f"phase B (backlog): {b['enqueued']} samples enqueued, {b['kills']} kills")
        print(f"  kill-to-restart {b['restart_s']} s with {b['queue_at_kill']} messages queued at the kill "
              f"(worst {b['worst_restart_s']} s; target 45 s)")
        print(f"  kill-to-claim {b['claimed_s']} s")
        print(f"  run twice {b['run_twice']}, half-written {b['half_written']}")
    ok = (a["lost"] == 0 and a["run_twice"] == 0 and a["half_written"] == 0 and b is not None
          and b["worst_restart_s"] is not None and b["worst_restart_s"] <= 45 and min(b["queue_at_kill"]) >= args.backlog
          and b["run_twice"] == 0 and b["half_written"] == 0)
    print(f"targets 0 / 0 / 0 and restart <= 45 s behind {args.backlog} queued: {'met' if ok else 'NOT met'}; "
          f"total {time.monotonic() - t_all:.0f} s")
    result.update(settings=settings, targets_met=ok, total_s=round(time.monotonic() - t_all, 1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1, default=str))
    summary = {"lost": a["lost"], "run_twice": a["run_twice"], "half_written": a["half_written"],
               "worst_restart_s": a["worst_restart_s"],
               "worst_claim_s": max((x for x in a["claimed_s"] if x is not None), default=None),
               "worker_kills": a["worker_kills"],
               "redis_kills": a["redis_kills"], "samples": a["samples"],
               "backlog_worst_restart_s": b["worst_restart_s"] if b else None,
               "backlog_queue_at_kill": b["queue_at_kill"] if b else None,
               "backlog_claimed_s": b["claimed_s"] if b else None, "targets_met": ok, **settings}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
