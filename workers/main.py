"""Entry of a worker process: ``python -m workers.main`` (started by ``fleet worker``).

``fleet worker`` sets CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES and the thread counts in
the environment before this process starts, so torch (imported lazily on the first
sample) sees only this worker's GPUs.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

from celery import signals

from fleet.broker import connect
from fleet.errors import BrokerUnavailable
from fleet.settings import load_settings

log = logging.getLogger("fleet.worker")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="workers.main")
    p.add_argument("--name", required=True, help="worker name, e.g. gpu0 (the host is appended)")
    p.add_argument("--gpus", required=True, help="this worker's GPUs (NVML indices): '0', '0,1', or '' for a CPU worker")
    p.add_argument("--device", required=True, choices=["cuda", "cpu"])
    p.add_argument("--queues", required=True, help="comma-separated queue names")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s", stream=sys.stdout)
    settings = load_settings()
    while True:  # a worker may start before Redis does (boot order, Slurm): wait for it
        try:
            client = connect(settings)
            break
        except BrokerUnavailable as e:
            log.warning("%s; retrying in 2 s", e)
            time.sleep(2)

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

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        log.info("worker %s ready on %s (%s), queues %s", node, f"GPUs {args.gpus}" if gpus else "CPU", args.device,
                 ",".join(queues))
        beat.start()

    @signals.worker_shutting_down.connect(weak=False)
    def _stopping(**_: object) -> None:
        runner.stopping.set()  # a long job checkpoints and gives its sample back (JobContext.stopping)

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
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
            "-l", "INFO",
        ]
    )
    return 0


def _pin_threads(n: int) -> None:
    # Without this, torch on a small CPU host spreads each call over every core and
    # several workers slow each other down 10-50x (docs/ARCHITECTURE.md, "Workers").
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))


if __name__ == "__main__":
    sys.exit(main())
