"""The supervisor `fleet up` leaves running: it keeps the right workers alive.

Every few seconds it decides which workers this host should run (one per usable GPU,
or CPU workers when there is none) and reconciles: starts the missing ones, restarts
crashed ones (with a back-off), and drains with SIGUSR2 the ones no longer wanted (a
worker finishes its current sample untouched, then exits: a running sample, a shell
command or a training included, is never stopped for a placement change). `fleet down`
stops them with SIGTERM: their jobs are asked to stop (commands end, trainings checkpoint)
and the samples go back to their queues.
Its decisions are logged with their reasons. ``python -m fleet.supervisor``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

import redis

from fleet.broker import connect
from fleet.contract import WORKER_EXIT_BROKEN, Keys, WorkerEntry
from fleet.errors import BrokerUnavailable, PlacementError
from fleet.gpu_inventory import GpuSnapshot, Inventory, inventory_from_env
from fleet.gpu_view import live_workers
from fleet.launcher import run_dir, write_json_atomic
from fleet.log_files import start_rotation, worker_log
from fleet.placement import PlacementPolicy, choose_group, eligible_gpus
from fleet.priority import queue_length
from fleet.routing import commands_twin, group_queue
from fleet.settings import FleetSettings, load_settings
from fleet.slot_plans import PLAN_FILE, SlotMeasure, measures, plan_record
from fleet.worker_launch import worker_command, worker_name

log = logging.getLogger("fleet.supervisor")

BACKOFF_FIRST_S = 2.0  # the wait before restarting a worker that exited on its own the first time
BACKOFF_MAX_S = 60.0  # doubling stops here: a fixed GPU or install is back in use within a minute
HEALTHY_RUN_S = 600.0  # a worker that ran this long starts its back-off over, as one that made a sample does


@dataclass(frozen=True)
class WorkerPlan:
    """One worker this host should run."""

    name: str
    gpus: tuple[int, ...]  # NVML indices; () for a CPU worker, several for multi-GPU work
    slot: int = 0
    reason: str = ""

    @property
    def is_group(self) -> bool:
        return len(self.gpus) > 1


@dataclass
class Running:
    plan: WorkerPlan
    proc: subprocess.Popen
    started: float
    stopping: bool = False  # asked to stop (drain or stop)
    stopped_hard: bool = False  # asked with SIGTERM: its job stops too


@dataclass
class Supervisor:
    settings: FleetSettings
    inventory: Inventory
    cpu_workers: int | None = None
    client: redis.Redis | None = None  # to see queued multi-GPU work; None: no groups
    interval_s: float = 3.0
    running: dict[str, Running] = field(default_factory=dict)
    backoff: dict[str, float] = field(default_factory=dict)  # name -> not before (monotonic)
    exits: dict[str, int] = field(default_factory=dict)  # name -> quick exits in a row
    stopping: bool = False
    _last_decisions: tuple = ()
    _snaps: dict[int, GpuSnapshot] = field(default_factory=dict)
    _measures: dict[int, SlotMeasure] = field(default_factory=dict)  # auto slots' last reading
    _host_workers: int = 1  # workers of the last plan (auto torch threads)

    @property
    def policy(self) -> PlacementPolicy:
        return self.settings.placement

    def desired(self) -> list[WorkerPlan]:
        """The workers this host should run now, by the placement policy."""
        if self.cpu_workers:
            return [WorkerPlan(worker_name((), i), (), i, reason="CPU workers requested") for i in range(self.cpu_workers)]
        snaps = self.inventory.snapshot()
        self._snaps = {s.index: s for s in snaps}
        if not snaps:
            return [WorkerPlan(worker_name(()), (), 0, reason="no GPU found: one CPU worker")]
        alive = [r for r in self.running.values() if r.proc.poll() is None]
        live = [r for r in alive if not r.stopping]
        own = {r.proc.pid for r in live}
        held = {g for r in live for g in r.plan.gpus}
        leaving = {r.proc.pid for r in alive if r.stopping}
        decisions = eligible_gpus(snaps, self.policy, own, held, leaving, self._slot_measures(alive, live))
        self._log_decisions(decisions)
        write_json_atomic(run_dir(self.settings) / PLAN_FILE, plan_record(decisions, self.interval_s))
        plans: list[WorkerPlan] = []
        grouped: set[int] = set()
        for n in self._multi_gpu_demand():  # multi-GPU work goes first (seed 003 §5.3)
            try:
                group = choose_group([d for d in decisions if d.index not in grouped], n, self.policy)
            except PlacementError:
                # Not enough GPUs left beside the larger groups formed above (4 GPUs, 3- and
                # 2-GPU work queued): this one waits for them. A need no host can ever meet
                # is refused at enqueue (fleet.enqueue.check_gpu_counts).
                continue
            if group:
                grouped.update(group)
                ids = tuple(sorted(group))
                plans.append(WorkerPlan(worker_name(ids), ids, 0, f"{n}-GPU work queued: group of GPUs {list(ids)}"))
        for d in decisions:
            if d.usable and d.index not in grouped:
                for slot in range(d.slots):
                    plans.append(WorkerPlan(worker_name((d.index,), slot), (d.index,), slot, reason=d.reason))
        self._host_workers = len(plans)
        return plans

    def _slot_measures(self, alive: list[Running], live: list[Running]) -> dict[int, SlotMeasure]:
        """Auto slots: per GPU, the peak its workers measured and the slots running there. Kept
        from the last reading while Redis does not answer: forgetting it would drain slots."""
        if self.policy.slots != "auto":
            return {}
        running: dict[int, int] = {}
        for r in live:
            if len(r.plan.gpus) == 1:
                running[r.plan.gpus[0]] = running.get(r.plan.gpus[0], 0) + 1
        try:
            entries = live_workers(self.client, self.settings.namespace, self.settings.heartbeat_s)
        except redis.RedisError:
            return {g: replace(m, running=running.get(g, 0)) for g, m in self._measures.items()}
        self._measures = measures(entries, socket.gethostname(), {r.proc.pid for r in alive}, running)
        return self._measures

    def _multi_gpu_demand(self) -> list[int]:
        """GPU counts of multi-GPU work that is queued or still running here, most GPUs first."""
        if self.client is None:
            return []
        busy = {len(r.plan.gpus) for r in self.running.values() if r.plan.is_group and not r.stopping}
        want = set()
        for n in range(16, 1, -1):
            if n in busy and self._group_busy(n):
                want.add(n)
            elif self._group_queued(n):
                want.add(n)
        return sorted(want, reverse=True)

    def _group_queued(self, n: int) -> bool:
        """Samples needing n GPUs are queued (every priority list; commands too when allowed)."""
        ns = self.settings.namespace
        qs = [group_queue(ns, n)] + ([commands_twin(ns, group_queue(ns, n))] if self.settings.allow_commands else [])
        return any(queue_length(self.client, q) for q in qs)

    def _group_busy(self, n: int) -> bool:
        """A group worker of n GPUs still has queued work or a sample running."""
        ns = self.settings.namespace
        if self._group_queued(n):
            return True
        fresh = time.time() - max(15.0, 3 * self.settings.heartbeat_s)
        for raw in self.client.hvals(Keys(ns).workers):
            try:
                w = WorkerEntry.model_validate_json(raw)
            except ValueError:
                continue  # an entry of an older fleet version
            if len(w.gpus) == n and w.sample_id is not None and w.seen_at > fresh:
                return True
        return False

    def _log_decisions(self, decisions: list) -> None:
        key = tuple((d.index, d.usable, d.slots) for d in decisions)
        if key != self._last_decisions:
            self._last_decisions = key
            for d in decisions:
                log.info("placement: %s", d.reason)

    def start(self, plan: WorkerPlan) -> None:
        snapshot = self._snaps.get(plan.gpus[0]) if len(plan.gpus) == 1 else None
        # auto torch threads: the host's CPUs shared among the workers of the last plan
        argv, env = worker_command(self.settings, plan.gpus, slot=plan.slot, snapshot=snapshot,
                                   host_workers=max(1, len(self._snaps), self._host_workers))
        logf = worker_log(self.settings.logs, plan.name)
        logf.parent.mkdir(parents=True, exist_ok=True)
        argv = [*argv, "--log-file", str(logf)]  # the worker rotates it (fleet.log_files)
        with open(logf, "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.running[plan.name] = Running(plan, proc, time.monotonic())
        log.info("start worker %s (pid %d): %s; log %s", plan.name, proc.pid, plan.reason, logf)

    def stop(self, name: str, reason: str, drain: bool = True) -> None:
        """Stop a worker. ``drain`` (placement changes): SIGUSR2, its running sample finishes
        untouched; otherwise (fleet down) SIGTERM, its job is asked to stop (a command ends,
        a training checkpoints) and the sample goes back to its queue."""
        r = self.running.get(name)
        if r is None or r.proc.poll() is not None:
            return
        if drain and r.stopping:
            return
        if not drain and r.stopped_hard:
            return
        r.stopping = True
        if drain:
            r.proc.send_signal(signal.SIGUSR2)
            log.info("stop worker %s (pid %d) after its current sample: %s", name, r.proc.pid, reason)
        else:
            r.stopped_hard = True
            r.proc.send_signal(signal.SIGTERM)
            log.info("stop worker %s (pid %d): %s (its running job is asked to stop)", name, r.proc.pid, reason)

    def reconcile(self) -> None:
        now = time.monotonic()
        self._note_healthy()
        for name, r in list(self.running.items()):
            rc = r.proc.poll()
            if rc is not None:
                del self.running[name]
                if not r.stopping:
                    # Doubling back-off for a worker that keeps exiting (a broken GPU, a bad
                    # install), capped at BACKOFF_MAX_S; it starts over once the worker has
                    # made a sample (_note_healthy) or ran HEALTHY_RUN_S.
                    n = 1 if now - r.started > HEALTHY_RUN_S else self.exits.get(name, 0) + 1
                    self.exits[name] = n
                    delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (n - 1))
                    self.backoff[name] = now + delay
                    log.warning("worker %s %s; restarting in %.0f s", name, _exit_reason(rc), delay)
        if self.stopping:
            return
        try:
            want = {p.name: p for p in self.desired()}
        except Exception as e:  # a flaky driver read must not take the fleet down
            log.warning("cannot read the GPUs (%s); keeping the workers as they are", e)
            self._write_pids()
            return
        for name in list(self.running):
            if name not in want:
                self.stop(name, "no longer wanted by the placement policy")
        for name, plan in want.items():
            if name in self.running or self.backoff.get(name, 0) > now:
                continue
            if self._gpus_busy(plan, name):
                continue  # a worker leaving these GPUs is finishing its sample; start after it
            self.start(plan)
        self._write_pids()

    def _note_healthy(self) -> None:
        """Start the back-off of a worker over once it has made a sample: its heartbeat entry
        (this process's: same pid) counts done > 0. Read only for workers that have exited
        before, so a healthy fleet costs Redis nothing here."""
        owed = [name for name in self.running if self.exits.get(name)]
        if self.client is None or not owed:
            return
        host = socket.gethostname()
        try:
            raws = self.client.hmget(Keys(self.settings.namespace).workers, [f"{name}@{host}" for name in owed])
        except redis.RedisError:
            return  # Redis away: keep the count until it answers
        for name, raw in zip(owed, raws):
            try:
                w = WorkerEntry.model_validate_json(raw) if raw else None
            except ValueError:
                continue  # an entry of another fleet version
            if w is not None and w.pid == self.running[name].proc.pid and w.done > 0:
                log.info("worker %s made a sample: its restart back-off starts over", name)
                self.exits[name] = 0

    def _write_pids(self) -> None:
        """<state>/run/workers.json: what `fleet up` shows and `fleet down` stops if we die."""
        write_json_atomic(run_dir(self.settings) / "workers.json", {n: r.proc.pid for n, r in self.running.items()})

    def _gpus_busy(self, plan: WorkerPlan, name: str) -> bool:
        mine = set(plan.gpus)
        for other, r in self.running.items():
            if other != name and mine & set(r.plan.gpus) and (r.stopping or plan.is_group != r.plan.is_group):
                return True
        return False

    def shutdown(self, grace_s: float = 60.0) -> None:
        self.stopping = True
        for name in list(self.running):
            self.stop(name, "the fleet is stopping (fleet down, or SIGTERM to `fleet up --foreground`)", drain=False)
        deadline = time.monotonic() + grace_s
        for r in self.running.values():
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A second signal makes the worker give its sample back to the front of the
                # queue at once (workers/main.py); SIGKILL only if even that does not end it.
                log.warning("worker %s did not finish within %.0f s; interrupting it (its sample goes back "
                            "to its queue)", r.plan.name, grace_s)
                r.proc.send_signal(signal.SIGINT)
                try:
                    r.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log.warning("worker %s did not stop; killing it (its sample runs again after its lease)",
                                r.plan.name)
                    r.proc.kill()
                    r.proc.wait()
        (run_dir(self.settings) / "workers.json").unlink(missing_ok=True)
        (run_dir(self.settings) / PLAN_FILE).unlink(missing_ok=True)

    def loop(self) -> None:
        while not self.stopping:
            self.reconcile()
            time.sleep(self.interval_s)


def _exit_reason(rc: int) -> str:
    if rc == WORKER_EXIT_BROKEN:
        return "stopped itself: its samples kept failing with unexpected errors (exit status 3)"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with {rc}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet.supervisor")
    p.add_argument("--cpu-workers", type=int)
    p.add_argument("--grace-s", type=float, default=60.0)
    args = p.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stdout)
    start_rotation(settings, settings.logs / "supervisor.log")  # `fleet up` points its stdout there
    try:  # queued multi-GPU work; the workers' heartbeat entries (back-off)
        client = connect(settings, timeout_s=2.0)
    except BrokerUnavailable:
        if not args.cpu_workers:
            raise
        client = None  # CPU workers need no Redis here: only the back-off's reset is lost
    sup = Supervisor(settings, inventory_from_env(), cpu_workers=args.cpu_workers, client=client,
                     interval_s=settings.placement_interval_s)

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
