"""Bulk publishing of tasks as Celery protocol-2 messages, pushed straight into kombu's
Redis lists in pipelines.

Why not ``apply_async``: one round trip per task caps enqueueing at ~2,000/s, and
kombu's batch producer at ~3,300/s (DESIGN §4); a pipelined LPUSH of the same message
bytes reaches ~19,000/s. The message is byte-compatible with what
``app.send_task(name, args=[payload], queue=q)`` writes (checked by a test that runs a
real worker on it), with JSON as the only serializer.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from fleet.contract import Keys

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
CHUNK = 5000  # commands per pipeline flush: big enough to amortise round trips, small enough to stream


@dataclass(frozen=True)
class Outgoing:
    """One task to publish: its queue, task name, the JSON payload (already serialised), a
    short human description (shown in Flower) and the bookkeeping value for the queued hash."""

    queue: str
    task: str
    payload_json: str
    sample_id: str
    label: str
    queued_value: str


def encode_message(task: str, payload_json: str, queue: str, label: str, task_id: str | None = None) -> bytes:
    """The kombu/Redis envelope of a Celery protocol-2 message with args ``[payload]``."""
    tid = task_id or str(uuid.uuid4())
    body = "[[" + payload_json + '], {}, ' + json.dumps(_EMBED) + "]"
    headers = {
        "lang": "py",
        "task": task,
        "id": tid,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": tid,
        "parent_id": None,
        "argsrepr": label,
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    envelope = {
        "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": tid,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope, ensure_ascii=False).encode("utf-8")


def publish(client: redis.Redis, keys: Keys, items: Iterable[Outgoing]) -> int:
    """Push every item onto its queue and mark it queued; returns the count.

    Pipelined without MULTI: a crash mid-way leaves a prefix published and marked,
    which the next enqueue completes (planning is a set difference).
    """
    n = 0
    pipe = client.pipeline(transaction=False)
    for it in items:
        pipe.hset(keys.queued, it.sample_id, it.queued_value)
        pipe.lpush(it.queue, encode_message(it.task, it.payload_json, it.queue, it.label))
        n += 1
        if n % CHUNK == 0:
            pipe.execute()
    pipe.execute()
    return n
