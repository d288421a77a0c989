"""The raw-Celery side of bench/noop_overhead.py: a Celery app with fleet's own Celery
configuration (workers.app.configure: JSON, prefetch 1, late acks, task events on) and one
task that does what a no-op sample does (bench.noop_kind.touch), with nothing of fleet's
(no claim, lease, record or manifest). Run with ``celery -A bench.raw_celery_app worker``.

With ``RAW_REUSE_CLIENT=1`` kombu's channel reuses one Redis client as a fleet worker's does
(workers.transport.reused_client): raw Celery with that fix too, so that the comparison
can also be made without it."""

from __future__ import annotations

import os

from celery import Celery
from kombu.transport import redis as kombu_redis

from bench.noop_kind import touch
from fleet.settings import load_settings
from workers.app import configure

if os.environ.get("RAW_REUSE_CLIENT") == "1":
    from workers.transport import reused_client

    kombu_redis.Channel.conn_or_acquire = reused_client
    kombu_redis.Channel._sync_client = None

app = Celery("raw", set_as_current=True)
configure(app, load_settings())


@app.task(name="raw.noop", acks_late=True, ignore_result=True)
def noop(path: str) -> None:
    touch(path)
