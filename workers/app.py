"""The Celery app of the fleet, configured in one place.

Every setting that matters for long GPU tasks is set here explicitly (docs/ARCHITECTURE.md, "Celery settings"):
Celery's defaults (prefetch 4, early acks, no events, pickle-capable) are wrong for them.
This module imports no torch: Flower runs on this app too, so its broker connection
uses the same visibility timeout (the shortest across connected apps wins).
"""

from __future__ import annotations

from celery import Celery

from fleet.settings import FleetSettings, load_settings


def configure(app: Celery, settings: FleetSettings) -> None:
    """Apply the fleet's Celery configuration to ``app``."""
    vt = settings.visibility_timeout_s
    app.conf.update(
        broker_url=settings.effective_broker_url,
        # JSON only: pickle on a shared Redis is remote code execution.
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # Outcomes live in fleet's own records (never expire); Celery results would
        # expire after a day and then read as PENDING.
        task_ignore_result=True,
        result_backend=None,
        # One sample at a time, acknowledged only when it is finished; a worker that
        # dies mid-sample gives its message back.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # Set in every place a kombu connection reads it.
        broker_transport_options={"visibility_timeout": vt},
        result_backend_transport_options={"visibility_timeout": vt},
        visibility_timeout=vt,
        # Flower and `fleet status` need task events.
        worker_send_task_events=True,
        task_send_sent_event=False,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_disable_rate_limits=True,
        task_create_missing_queues=True,
    )


def make_app(settings: FleetSettings) -> Celery:
    app = Celery("fleet", set_as_current=True)
    configure(app, settings)
    return app


# For `celery -A workers.app flower`: settings from FLEET_* / FLEET_CONFIG like every process.
app = make_app(load_settings())
