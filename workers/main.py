"""Entry of a worker process: ``python -m workers.main`` (started by ``fleet worker``).

``fleet worker`` sets CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES and the thread counts in
the environment before this process starts, so torch (imported lazily on the first
sample) sees only this worker's GPUs.

Stopping (docs/ARCHITECTURE.md, "Workers"):

- SIGTERM or a first Ctrl-C: Celery's warm shutdown. The worker takes no more work, its
  sample finishes (or its job, which sees ``JobContext.stopping``, gives it back), then it
  exits.
- SIGUSR2 (the supervisor's placement changes): drain. It takes no more work and exits
  when the running sample has finished; the job is not told to stop. A SIGTERM while
  draining tells it to stop after all.
- A second Ctrl-C (after either), or SIGQUIT: it stops at once. Its running sample goes
  back to the front of its queue, the same attempt, in one Redis script
  (``fleet.records.give_back``), and the process exits with EXIT_INTERRUPTED. Celery's own
  cold shutdown cannot stop a thread (NotImplementedError with the threads pool) and a
  killed worker's sample waits for its lease to expire.

Exit status: Celery's (0 after SIGTERM, 1 after a Ctrl-C or an unrecoverable error),
EXIT_BROKEN when the worker stopped itself because its samples kept failing with
unexpected errors (the runner's ``on_broken``: a supervisor or systemd's
``Restart=on-failure`` starts it again), EXIT_INTERRUPTED after a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from celery import signals

from fleet.broker import connect
from fleet.contract import WORKER_EXIT_BROKEN as EXIT_BROKEN
from fleet.contract import WORKER_EXIT_INTERRUPTED as EXIT_INTERRUPTED
from fleet.contract import task_label
from fleet.errors import BrokerUnavailable
from fleet.log_files import start_rotation
from fleet.routing import all_queues_prefix
from fleet.settings import load_settings
from workers import log_tags

log = logging.getLogger("fleet.worker")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="workers.main")
    p.add_argument("--name", required=True, help="worker name, e.g. gpu0 (the host is appended)")
    p.add_argument("--gpus", required=True, help="this worker's GPUs (NVML indices): '0', '0,1', or '' for a CPU worker")
    p.add_argument("--device", required=True, choices=["cuda", "cpu"])
    p.add_argument("--queues", required=True, help="comma-separated queue names")
    p.add_argument("--log-file", help="the log file stdout and stderr go to (`fleet up`'s supervisor): rotated "
                   "by the settings' log_max_mib and log_backups (fleet.log_files)")
    args = p.parse_args(argv)

    settings = load_settings()
    if not settings.torch_threads:  # auto is resolved by whoever starts the worker (fleet.worker_launch)
        settings = settings.model_copy(update={"torch_threads": 1})
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
                        stream=sys.stdout)
    log_tags.install()  # a record logged while a sample runs starts with [<sample id>] (`fleet logs SAMPLE_ID`)
    if args.log_file:
        start_rotation(settings, Path(args.log_file))
    while True:  # a worker may start before Redis does (boot order, Slurm): wait for it
        try:
            client = connect(settings)
            break
        except BrokerUnavailable as e:
            log.warning("%s; retrying in 2 s", e)
            time.sleep(2)

    from workers import transport
    from workers.app import app
    from workers.heartbeat import Heartbeat
    from workers.runner import SampleRunner
    from workers.tasks import bind_runner

    node = f"{args.name}@{socket.gethostname()}"
    gpus = tuple(int(x) for x in args.gpus.split(",") if x)
    runner = SampleRunner(settings, client, node, gpus, args.device)
    _pin_threads(settings.torch_threads)
    bind_runner(runner)
    queues = [q for q in args.queues.split(",") if q]
    beat = Heartbeat(runner, queues)
    # What is not a fleet task (not JSON, pickle, another task) is set aside, not run (workers/transport.py).
    transport.install(all_queues_prefix(settings.namespace), runner.keys.dead_letters, node)
    stopper = Stopper(runner, beat, node)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        log.info("worker %s ready on %s (%s), queues %s", node, f"GPUs {args.gpus}" if gpus else "CPU", args.device,
                 ",".join(queues))
        beat.start()
        stopper.install()  # over Celery's handlers, which it installs before it is ready

    @signals.worker_shutting_down.connect(weak=False)
    def _stopping(**_: object) -> None:
        runner.stopping.set()  # a long job checkpoints and gives its sample back (JobContext.stopping)

    exitcode: list[int | None] = [None]  # Celery's, for this process's exit status

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(sender: object = None, **_: object) -> None:
        exitcode[0] = getattr(sender, "exitcode", None)
        # The pool has stopped; a sample still being finished (its file, then its record) is
        # waited for while the heartbeat still renews its lease (docs/ARCHITECTURE.md,
        # "Overlapped finish"). A second Ctrl-C gives it back instead (Stopper.give_back).
        runner.close()
        beat.shutdown()

    app.worker_main(
        [
            "worker",
            "-P", settings.worker_pool,
            "-c", "1",
            "-Q", ",".join(queues),
            "-n", node,
            "--prefetch-multiplier=1",
            "-E",
            "--without-gossip",
            "--without-mingle",
            "-l", settings.log_level,
        ]
    )
    runner.close()  # (when Celery stopped without its shutdown signal)
    if runner.broken:
        log.error("worker %s stopped because it looks broken; exit status %d", node, EXIT_BROKEN)
        return EXIT_BROKEN
    return exitcode[0] or 0


class Stopper:
    """SIGINT, SIGTERM and SIGQUIT, acted on by a thread of their own (see the module docstring).

    Python runs a signal handler in the main thread, and only when that thread runs Python
    code. During a warm shutdown the main thread waits in a join for the pool's thread, and
    a signal the kernel hands to another thread (the job's) would not wake it: its handler
    would run when the sample ends. So once the worker is ready (Celery has installed its
    own handlers by then), ``install`` puts in handlers that do nothing and a wakeup fd
    (``signal.set_wakeup_fd``): Python's C-level handler, in whichever thread the signal
    lands, writes the signal's number there, and this thread reads it and acts. The warm
    shutdown is started as Celery's own handler starts it (``worker_shutting_down``, then
    the ``should_stop`` flag its loop polls). No signal is blocked anywhere, so processes
    a job starts get the usual signals."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR2)

    def __init__(self, runner, beat, node: str) -> None:  # (SampleRunner, Heartbeat, worker name)
        self.runner = runner
        self.beat = beat
        self.node = node
        self.asked = False  # a warm shutdown is under way
        self.draining = False  # ... asked by SIGUSR2: the running job is not told to stop
        self.leaving = False

    def install(self) -> None:
        """Call in the main thread, after Celery has installed its handlers."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, _ignore)
        threading.Thread(target=self._run, args=(r,), name="fleet-signals", daemon=True).start()

    def _run(self, fd: int) -> None:
        while True:
            for signum in os.read(fd, 64):
                if signum not in self.SIGNALS:
                    continue  # SIGUSR1 (Celery's stack dump) and the like: theirs
                try:
                    self.on_signal(signum)
                except Exception:
                    log.exception("handling %s", signal.Signals(signum).name)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGQUIT or (signum == signal.SIGINT and self.asked):
            self.now(signum)
            return
        if self.asked and self.draining and signum == signal.SIGTERM:
            # Draining, and now asked to stop (fleet down): the running job is told to stop too.
            self.draining = False
            self.runner.stopping.set()
            log.info("SIGTERM while draining: the running job is asked to stop (JobContext.stopping)")
            return
        if self.asked:
            log.info("%s: already stopping after the current sample (Ctrl-C: at once)", signal.Signals(signum).name)
            return
        self.asked = True
        if signum == signal.SIGUSR2:
            self.drain()
            return
        from celery.platforms import EX_FAILURE, EX_OK
        from celery.worker import state

        code = EX_FAILURE if signum == signal.SIGINT else EX_OK  # Celery's exit status for each
        again = "Ctrl-C again" if signum == signal.SIGINT else "Ctrl-C (SIGINT) or SIGQUIT"
        print(f"worker: warm shutdown: the current sample finishes first; {again} stops the worker at once "
              "and puts its sample back in its queue", file=sys.__stdout__, flush=True)
        try:
            signals.worker_shutting_down.send(sender=self.node, sig=signal.Signals(signum).name, how="Warm",
                                              exitcode=code)
        finally:
            state.should_stop = code  # what Celery's loop polls; as Celery's own handler sets it

    def drain(self) -> None:
        """SIGUSR2 (the supervisor's placement changes): take no more work and exit once the
        running sample has finished, the job left alone (a shell command or a training runs
        to its end rather than being stopped and run again)."""
        from celery.platforms import EX_OK
        from celery.worker import state

        self.draining = True
        log.info("SIGUSR2: draining: the running sample finishes, then the worker exits (SIGTERM: stop it too)")
        state.should_stop = EX_OK

    def now(self, signum: int) -> None:
        """Give the running sample back and exit, without waiting for the job (a thread
        cannot be stopped; the process ends under it)."""
        if self.leaving:  # a third Ctrl-C while the sample goes back: go now
            os._exit(EXIT_INTERRUPTED)
        self.leaving = True
        log.warning("%s: stopping now; the running sample goes back to its queue", signal.Signals(signum).name)
        try:
            self.beat.stop_event.set()  # no renewal may recreate the lease once it is given up
            if self.beat.is_alive():
                self.beat.join(timeout=2.0)
            self.give_back()
        except Exception:
            log.exception("could not give the running sample back; it runs again once its lease expires")
        try:
            self.beat.shutdown()  # off the workers list
        except Exception:
            pass
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)

    def give_back(self) -> None:
        """The running sample, and the one being finished, back to the front of their queues."""
        from celery.worker import state

        delivered = [req.message for req in list(state.active_requests) if getattr(req, "message", None) is not None]
        cur, finishing = self.runner.current, self.runner.finishing
        if cur is not None:
            self._give_back_sample(cur, delivered[0].delivery_tag if len(delivered) == 1 else None)
        else:
            for message in delivered:  # delivered, not claimed yet (or finished, not acked): kombu puts it back
                message.channel.qos.restore_by_tag(message.delivery_tag)
                log.warning("message %s is back at the front of its queue", message.delivery_tag)
        if finishing is not None:
            # Its message was acked when its GPU part ended; its file is not in place (or is,
            # without a record): it is made again, and the atomic writer clears a half-written file.
            self._give_back_sample(finishing, None)

    def _give_back_sample(self, cur, tag: str | None) -> None:  # (workers.runner.Current, kombu delivery tag)
        from fleet import records
        from fleet.contract import RunningEntry
        from fleet.kept_payloads import kept_payload, reference
        from fleet.publisher import encode_message
        from workers import control_hooks

        r, keys = self.runner.client, self.runner.keys
        raw = r.hget(keys.running, cur.sample_id)
        entry = RunningEntry.model_validate_json(raw) if raw else None
        if entry is not None and entry.token == cur.token:
            task = entry.task
            lst, step = control_hooks.republish_list(self.runner, entry.queue, str(task.get("experiment", "")))
            msg = encode_message(reference(cur.sample_id), entry.queue,
                                 task_label(str(task.get("experiment", "")), str(task.get("label", "")),
                                            cur.sample_id, f"given back by {self.runner.worker}"),
                                 priority=step)
            queued = kept_payload(entry.queue, json.dumps(task, ensure_ascii=False))  # its mark keeps it whole
            if records.give_back(r, keys, cur.sample_id, cur.token, queued, lst, msg, tag):
                log.warning("sample %s is back at the front of %s (attempt %s)", cur.sample_id, entry.queue,
                            task.get("attempt", "?"))
                return
        log.warning("sample %s is no longer this worker's; nothing to give back", cur.sample_id)


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler of the signals Stopper takes: its thread acts on them."""


def _pin_threads(n: int) -> None:
    # Without this, torch on a small CPU host spreads each call over every core and
    # several workers slow each other down 10-50x (docs/ARCHITECTURE.md, "Workers").
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))


if __name__ == "__main__":
    sys.exit(main())
