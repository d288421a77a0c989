"""Flower as `fleet up` runs it: ``celery -A workers.app flower ARGS``, with ``/metrics``
behind the same login as the rest of Flower.

Flower 2.2 checks its login (``--basic-auth`` / FLOWER_BASIC_AUTH, or OAuth) in
``BaseHandler.get_current_user``, which only the handlers decorated with
``tornado.web.authenticated`` call; its Prometheus handler (``/metrics``, which lists every
worker and task name) is not decorated. This module decorates it before Flower starts.
``/healthcheck`` stays open: it answers "OK" and nothing else, and `fleet up` polls it.

Run: ``python -m workers.flower --address=127.0.0.1 --port=5555 ...`` (Flower's options).
"""

from __future__ import annotations

import sys

import tornado.web


def protect_metrics() -> None:
    """Make Flower's /metrics handler require the login its pages require (idempotent)."""
    from flower.views.monitor import Metrics

    if not getattr(Metrics.get, "_fleet_login", False):
        get = tornado.web.authenticated(Metrics.get)
        get._fleet_login = True  # type: ignore[attr-defined]
        Metrics.get = get


def main(argv: list[str] | None = None) -> None:
    from fleet.log_files import start_rotation
    from fleet.settings import load_settings

    protect_metrics()
    settings = load_settings()
    start_rotation(settings, settings.logs / "flower.log")  # `fleet up` points its stdout there
    from celery.__main__ import main as celery_main  # what `python -m celery` runs

    sys.argv = ["celery", "-A", "workers.app", "flower", *(sys.argv[1:] if argv is None else argv)]
    celery_main()


if __name__ == "__main__":
    main()
