"""The raw-Celery side of bench/noop_overhead.py: a Celery app with fleet's own Celery
configuration (workers.app.configure: JSON, prefetch 1, late acks, task events on) and one
task that does what a no-op sample does (bench.noop_kind.touch), with nothing of fleet's
(no claim, lease, record or manifest). Run with ``celery -A bench.raw_celery_app worker``."""

from __future__ import annotations

from celery import Celery

from bench.noop_kind import touch
from fleet.settings import load_settings
from workers.app import configure

app = Celery("raw", set_as_current=True)
configure(app, load_settings())


@app.task(name="raw.noop", acks_late=True, ignore_result=True)
def noop(path: str) -> None:
    touch(path)
