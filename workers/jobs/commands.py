"""The commands kind's job: one shell command in a subprocess, as seed 003 runs them.

Job code only: no Celery here. ``run(task, context)``:

1. takes the worker's GPUs for the command (``${available_gpu}``, ``${available_gpu_K}``,
   ``CUDA_VISIBLE_DEVICES``), and waits (WaitForResources: back to the queue after a
   back-off, the same attempt) while they have less free memory than it declares;
2. runs ``bash -c CMD`` under workers/command_guard.py, in its own process group and its
   working folder, output to a numbered log that is never overwritten, with
   ``FLEET_WORK_DIR`` (stable per command: checkpoints), ``FLEET_ATTEMPT`` and
   ``FLEET_SAMPLE_ID`` set and the worker's own FLEET_* settings (the broker password) not;
3. stops the whole group (SIGTERM, SIGKILL after the grace period) when the worker is
   asked to stop or the sample is cancelled (Preempted: not done) or its time limit passes;
   a command that a stop signal ended while its worker is stopping (Slurm or systemd signal
   every process of a job at once) is Preempted too, not a failure;
4. on exit 0 writes the result file (the sample's output) atomically; otherwise raises the
   error class its exit status and output say (workers/command_errors.py).

Only workers started with ``--allow-commands`` get here (workers/jobs/__init__.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleet.contract import TaskPayload
from fleet.errors import InputError, Preempted, WaitForResources
from fleet.kinds.commands.experiment import GPU_VAR
from workers.atomic_output import write_atomically
from workers.command_errors import error_for
from workers.jobs.base import JobContext, JobOutcome, parse_params

log = logging.getLogger("fleet.job")

TAIL_LINES = 20  # the output's last lines kept in the record
# A stop signal for the whole job reaches the command and its worker together; the worker's
# signal thread may set JobContext.stopping a moment after the command is gone (seconds).
STOP_RACE_S = 1.0
# What the worker sets for itself that a user's command should not inherit.
WORKER_ONLY_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TQDM_DISABLE")


class CommandParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cmd: str = Field(min_length=1)
    cwd: str
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0)
    where: str = ""
    name: str | None = None
    enqueued_by: str = "?"


def substitute(cmd: str, gpus: tuple[int, ...]) -> str:
    """``${available_gpu}`` -> the first GPU, ``${available_gpu_K}`` -> the K-th (seed 003's
    variables; a ``\\`` before them, as its bash array needed, is dropped too)."""
    def one(m: Any) -> str:
        k = int(m.group(1) or 0)
        if k >= len(gpus):
            raise InputError(f"{m.group(0)}: the command was given {len(gpus)} GPU(s)")
        return str(gpus[k])

    return GPU_VAR.sub(one, cmd)


def _open_log(stem: str) -> tuple[Path, Any]:
    """The first free ``<stem>.<n>.log`` (n = 1, 2, ...), created exclusively: never overwritten."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = Path(f"{stem}.{n}.log")
        try:
            return path, open(path, "xb")
        except FileExistsError:
            n += 1


def log_stem(task: TaskPayload) -> str:
    """``<output root>/logs/<slug>-<id>``: derived from the output path (``<root>/commands/<slug>-<id>.json``,
    which the runner has confined to the output root), so no message names where a log goes."""
    return str(Path(task.output_root) / "logs" / Path(task.output_path).stem)


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _check_free_memory(ids: tuple[int, ...], need_mib: int) -> None:
    """WaitForResources when a GPU has less free memory than the command declares."""
    if not ids or need_mib <= 0:
        return
    from fleet.gpu_inventory import inventory_from_env

    try:
        with inventory_from_env() as inv:
            snaps = {s.index: s for s in inv.snapshot()}
    except Exception:  # NVML unreadable: run it; an OOM says the rest
        return
    for i in ids:
        s = snaps.get(i)
        if s is not None and s.memory_free_mib < need_mib:
            raise WaitForResources(f"GPU {i} has {s.memory_free_mib} MiB free; the command declares {need_mib} MiB "
                                   "(waiting for memory)")


def _environment(task: TaskPayload, p: CommandParams, ids: tuple[int, ...], ctx: JobContext) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_") and k not in WORKER_ONLY_ENV}
    env.update(p.env)
    env.update(CUDA_VISIBLE_DEVICES=",".join(map(str, ids)), CUDA_DEVICE_ORDER="PCI_BUS_ID",
               FLEET_WORK_DIR=str(ctx.ensure_work_dir()), FLEET_ATTEMPT=str(ctx.attempt),
               FLEET_SAMPLE_ID=task.sample_id, FLEET_GUARD_PARENT=str(os.getpid()))
    return env


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """Ask the guard to end the group; kill the group outright if it does not within the grace."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace_s + 5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
    except OSError:
        pass


def params_of(task: TaskPayload) -> CommandParams:
    return parse_params(task, CommandParams, "command")


def _ended_by_signal(rc: int | None) -> bool:
    """The guard's status says a stop signal ended the command (killed, or 128 + N from the guard)."""
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL)
    return rc is not None and (-rc in stops or rc - 128 in stops)


def run(task: TaskPayload, ctx: JobContext) -> JobOutcome:
    """Run the task's command; raises Preempted when stopped, a command error when it fails."""
    p = params_of(task)
    if task.gpus > len(ctx.gpus):
        raise WaitForResources(f"the command needs {task.gpus} GPU(s); this worker holds {len(ctx.gpus)}")
    ids = tuple(ctx.gpus[: task.gpus])
    cmd = substitute(p.cmd, ids)
    if not Path(p.cwd).is_dir():
        raise InputError(f"{p.where}: working folder {p.cwd} not found on {os.uname().nodename}")
    _check_free_memory(ids, task.memory_mib)
    log_path, log_file = _open_log(log_stem(task))
    ctx.report(0.0, log=str(log_path), enqueued_by=p.enqueued_by, gpus_given=",".join(map(str, ids)))
    started = time.time()
    with log_file:
        header = (f"# fleet: {p.where} attempt {ctx.attempt} on GPUs [{','.join(map(str, ids))}] in {p.cwd}\n"
                  f"# $ {cmd}\n")
        log_file.write(header.encode())
        log_file.flush()
        argv = [sys.executable, "-m", "workers.command_guard", repr(ctx.stop_grace_s), "--", "/bin/bash", "-c", cmd]
        proc = subprocess.Popen(argv, cwd=p.cwd, env=_environment(task, p, ids, ctx), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("command %s (%s) started as process group %d, log %s", task.sample_id, p.where, proc.pid, log_path)
        deadline = started + p.timeout_s if p.timeout_s else None
        stopped = timed_out = False
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if ctx.stopping.is_set():
                stopped = True
            elif deadline is not None and time.time() > deadline:
                timed_out = True
            if stopped or timed_out:
                _stop(proc, ctx.stop_grace_s)
                rc = proc.returncode
                break
    if not stopped and _ended_by_signal(rc) and ctx.stopping.wait(STOP_RACE_S):
        # A signal ended the command while its worker is being stopped: the stop's own signal
        # (Slurm at a job's end and systemd's control-group kill send it to every process at
        # once), not the command's fault. It goes back to its queue, as if the worker had stopped it.
        stopped = True
    duration = time.time() - started
    tail = _tail(log_path)
    if stopped:
        raise Preempted(f"{p.where}: stopped after {duration:.1f} s (process group ended); log {log_path}")
    if rc != 0 or timed_out:
        raise error_for(rc, tail, p.where, str(log_path), timed_out, p.timeout_s)
    result = {"schema": "fleet.command-result/1", "sample_id": task.sample_id, "where": p.where, "cmd": cmd,
              "cwd": p.cwd, "exit_code": 0, "duration_s": round(duration, 3), "log": str(log_path),
              "gpus": list(ids), "attempt": ctx.attempt, "enqueued_by": p.enqueued_by, "tail": tail}
    final = Path(task.output_path)
    write_atomically(final, lambda tmp: tmp.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n",
                                                        encoding="utf-8"))
    return JobOutcome(output_path=str(final), metrics={
        "exit_code": 0, "command_s": round(duration, 3), "log": str(log_path), "output_tail": tail[-2000:],
        "enqueued_by": p.enqueued_by, "gpus_given": ",".join(map(str, ids))})
