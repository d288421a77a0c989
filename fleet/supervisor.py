"""The supervisor `fleet up` leaves running: it keeps the right workers alive.

Every few seconds it decides which workers this host should run (one per usable GPU,
or CPU workers when there is none) and reconciles: starts the missing ones, restarts
crashed ones (with a back-off), and stops with SIGTERM the ones no longer wanted (a
worker finishes its current sample, then exits: a running sample is never killed).
Its decisions are logged with their reasons. ``python -m fleet.supervisor``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from fleet.gpu_inventory import Inventory, inventory_from_env
from fleet.launcher import run_dir, write_json_atomic
from fleet.settings import FleetSettings, load_settings
from fleet.worker_launch import worker_command

log = logging.getLogger("fleet.supervisor")


@dataclass(frozen=True)
class WorkerPlan:
    """One worker this host should run."""

    name: str
    gpu: int | None  # None: a CPU worker
    slot: int = 0
    reason: str = ""


@dataclass
class Running:
    plan: WorkerPlan
    proc: subprocess.Popen
    started: float
    stopping: bool = False


@dataclass
class Supervisor:
    settings: FleetSettings
    inventory: Inventory
    gpus: list[int] | None = None  # restrict to these GPUs (None: all)
    cpu_workers: int | None = None
    interval_s: float = 3.0
    running: dict[str, Running] = field(default_factory=dict)
    backoff: dict[str, float] = field(default_factory=dict)  # name -> not before (monotonic)
    stopping: bool = False

    def desired(self) -> list[WorkerPlan]:
        """The workers this host should run now."""
        if self.cpu_workers:
            return [WorkerPlan(f"cpu{i}", None, i, "CPU workers requested") for i in range(self.cpu_workers)]
        snaps = self.inventory.snapshot()
        if self.gpus is not None:
            snaps = [s for s in snaps if s.index in self.gpus]
        if not snaps:
            return [WorkerPlan("cpu0", None, 0, "no GPU found: one CPU worker")]
        return [WorkerPlan(f"gpu{s.index}", s.index, 0, f"GPU {s.index} ({s.name})") for s in snaps]

    def start(self, plan: WorkerPlan) -> None:
        argv, env = worker_command(
            self.settings, gpu=plan.gpu, cpu=plan.gpu is None, slot=plan.slot,
        )
        logf = self.settings.logs / f"worker-{plan.name}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        with open(logf, "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.running[plan.name] = Running(plan, proc, time.monotonic())
        log.info("start worker %s (pid %d): %s; log %s", plan.name, proc.pid, plan.reason, logf)

    def stop(self, name: str, reason: str) -> None:
        r = self.running.get(name)
        if r and not r.stopping and r.proc.poll() is None:
            r.stopping = True
            r.proc.send_signal(signal.SIGTERM)
            log.info("stop worker %s (pid %d) after its current sample: %s", name, r.proc.pid, reason)

    def reconcile(self) -> None:
        now = time.monotonic()
        for name, r in list(self.running.items()):
            rc = r.proc.poll()
            if rc is not None:
                del self.running[name]
                if not r.stopping:
                    delay = 2.0 if now - r.started > 60 else min(60.0, 2 * max(2.0, now - r.started))
                    self.backoff[name] = now + delay
                    log.warning("worker %s exited with %s; restarting in %.0f s", name, rc, delay)
        if self.stopping:
            return
        try:
            want = {p.name: p for p in self.desired()}
        except Exception as e:  # a flaky driver read must not take the fleet down
            log.warning("cannot read the GPUs (%s); keeping the workers as they are", e)
            return
        for name in list(self.running):
            if name not in want:
                self.stop(name, "no longer wanted by the placement policy")
        for name, plan in want.items():
            if name not in self.running and self.backoff.get(name, 0) <= now:
                self.start(plan)
        write_json_atomic(run_dir(self.settings) / "workers.json", {n: r.proc.pid for n, r in self.running.items()})

    def shutdown(self, grace_s: float = 60.0) -> None:
        self.stopping = True
        for name in list(self.running):
            self.stop(name, "fleet down")
        deadline = time.monotonic() + grace_s
        for r in self.running.values():
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not finish within %.0f s; killing it (its sample will run again)", r.plan.name, grace_s)
                r.proc.kill()
                r.proc.wait()
        (run_dir(self.settings) / "workers.json").unlink(missing_ok=True)

    def loop(self) -> None:
        while not self.stopping:
            self.reconcile()
            time.sleep(self.interval_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet.supervisor")
    p.add_argument("--gpus", help="'all' or a comma-separated list of GPU indices")
    p.add_argument("--cpu-workers", type=int)
    p.add_argument("--grace-s", type=float, default=60.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stdout)
    settings = load_settings()
    gpus = None if not args.gpus or args.gpus == "all" else [int(x) for x in args.gpus.split(",") if x.strip()]
    sup = Supervisor(settings, inventory_from_env(), gpus=gpus, cpu_workers=args.cpu_workers)

    def on_term(signum: int, _frame: object) -> None:
        sup.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        sup.loop()
    finally:
        sup.shutdown(args.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
