"""Bulk publishing of tasks as Celery protocol-2 messages, pushed straight into kombu's
Redis lists in pipelines. ``encode_message`` is the one writer of the message: the
planner, retries and the reaper all use it.

Why not ``apply_async``: one round trip per task caps enqueueing at ~2,000/s, and
kombu's batch producer at ~3,300/s (docs/ARCHITECTURE.md, "Publishing"); a pipelined LPUSH of the same message
bytes reaches ~19,000/s. The message is byte-compatible with what
``app.send_task(TASK_SAMPLE, args=[payload], queue=q)`` writes (checked by a test that runs a
real worker on it), with JSON as the only serializer.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from json.encoder import encode_basestring  # what json.dumps(str, ensure_ascii=False) returns, without its set-up
from operator import itemgetter

import redis

from fleet.contract import TASK_SAMPLE, Keys
from fleet.priority import NORMAL_STEP, priority_list

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_BODY_TAIL = "], {}, " + json.dumps(_EMBED) + "]"
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
CHUNK = 5000  # tasks per pipeline flush: big enough to amortise round trips, small enough to stream


@dataclass(frozen=True)
class Outgoing:
    """One task to publish: its queue, the JSON payload (already serialised), a short human
    description (shown in Flower) and the bookkeeping value for the queued hash."""

    queue: str
    payload_json: str
    sample_id: str
    label: str
    queued_value: str
    kept: str | None = None  # see kept_payload; None: kept whole
    output_path: str | None = None  # recorded in the outputs index (who writes each path), when given
    owner: str = ""  # the outputs index's value for output_path
    priority: int | None = None  # kombu priority step (fleet.priority); None: normal
    experiment: str | None = None  # noted in the experiment's samples hash (Keys.experiment_samples), when given
    member: str = ""  # that hash's value: JSON [group, output path]


def _uuid4() -> str:
    """``str(uuid.uuid4())`` (random, version 4, RFC 4122 variant) at a fraction of its cost."""
    h = os.urandom(16).hex()
    # version nibble "4"; variant: the top two bits of byte 8 are 10, so its first hex digit is 8, 9, a or b
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def _envelope(task: str, queue: str, body_b64: str, tid: str, label: str, delivery_tag: str, priority: int = 0) -> dict:
    """The kombu/Redis envelope as a dict (the one definition of its fields and their order)."""
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
    return {
        "body": body_b64,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": tid,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,  # kombu's step: which of the queue's lists holds it (fleet.priority)
            "body_encoding": "base64",
            "delivery_tag": delivery_tag,
        },
    }


_SLOTS = ("body", "tid", "label", "tag")  # the per-message values, in this order in encode_message


@lru_cache(maxsize=256)
def _template(task: str, queue: str, priority: int = 0) -> tuple[bytes, itemgetter]:
    """The envelope of (task, queue) as a bytes %-format with a ``%s`` per per-message value.

    Returns (format, pick): the message is ``format % pick((body, tid, label, tag))``, each
    value already JSON-encoded as UTF-8 bytes. Built by ``json.dumps`` of the same dict
    with markers in the slots, so the bytes are exactly those of
    ``json.dumps(_envelope(...), ensure_ascii=False).encode("utf-8")``. The markers hold a
    NUL, which only a task or queue name with a NUL could repeat: those (never seen in
    practice) take the slow path in ``encode_message``.
    """
    marks = {k: f"fleet\x00slot:{k}" for k in _SLOTS}
    text = json.dumps(_envelope(task, queue, marks["body"], marks["tid"], marks["label"], marks["tag"], priority),
                      ensure_ascii=False)
    quoted = {json.dumps(m, ensure_ascii=False): _SLOTS.index(k) for k, m in marks.items()}
    pieces, order, pos = [], [], 0
    for m in re.finditer("|".join(re.escape(q) for q in quoted), text):
        pieces.append(text[pos : m.start()])
        order.append(quoted[m.group(0)])
        pos = m.end()
    pieces.append(text[pos:])
    fmt = "%s".join(piece.replace("%", "%%") for piece in pieces).encode("utf-8")
    return fmt, itemgetter(*order)


def encode_message(payload_json: str, queue: str, label: str, task_id: str | None = None, priority: int = 0) -> bytes:
    """The kombu/Redis envelope of a Celery protocol-2 message of the fleet's one task
    (``TASK_SAMPLE``) with args ``[payload]``; ``label`` is what Flower shows as its args."""
    task = TASK_SAMPLE
    tid = task_id or _uuid4()
    body = base64.b64encode(("[[" + payload_json + _BODY_TAIL).encode("utf-8"))
    if "\x00" in task or "\x00" in queue:
        envelope = _envelope(task, queue, body.decode("ascii"), tid, label, _uuid4(), priority)
        return json.dumps(envelope, ensure_ascii=False).encode("utf-8")
    fmt, pick = _template(task, queue, priority)
    values = (
        b'"' + body + b'"',
        encode_basestring(tid).encode("utf-8"),
        encode_basestring(label).encode("utf-8"),
        b'"' + _uuid4().encode("ascii") + b'"',
    )
    return fmt % pick(values)


def kept_payload(queue: str, payload_json: str, head: str = "", head_id: str = "") -> str:
    """What the payloads hash keeps of a published task, enough to publish it again:
    ``<head id>\t<queue>\t<payload without its head>``. The head (the part every payload of
    an experiment shares, stored once under its id) keeps 100,000 kept payloads small."""
    if head_id and payload_json.startswith(head):
        return f"{head_id}\t{queue}\t{payload_json[len(head):]}"
    return f"\t{queue}\t{payload_json}"


def unkeep(kept: str, heads: Callable[[str], str | None]) -> tuple[str, str] | None:
    """(queue, payload JSON) from a kept payload; None when its head is unknown."""
    head_id, queue, rest = kept.split("\t", 2)
    head = heads(head_id) if head_id else ""
    return None if head is None else (queue, head + rest)


def publish(client: redis.Redis, keys: Keys, items: Iterable[Outgoing]) -> int:
    """Push every item onto its queue and mark it queued; returns the count.

    Per chunk of ``CHUNK`` tasks: one HSET marking them queued (and HSETs of their kept
    payloads, output owners and experiment's samples), then one LPUSH per queue
    with their messages in order (LPUSH of many values = that many LPUSHes, one after the
    other), in MULTI/EXEC so a chunk is all published and marked or not at all. A crash
    mid-way leaves a prefix of chunks published and marked, which the next enqueue
    completes (planning is a set difference).
    """
    n = 0
    marks: list[str] = []
    kept: list[str] = []
    owners: list[str] = []
    members: dict[str, list[str]] = {}  # experiment -> [sample id, JSON [group, output path], ...]
    messages: dict[str, list[bytes]] = {}

    def flush() -> None:
        if not marks:
            return
        pipe = client.pipeline(transaction=True)
        pipe.hset(keys.queued, items=marks)
        pipe.hset(keys.payloads, items=kept)
        if owners:
            pipe.hset(keys.outputs, items=owners)
        for name, pairs in members.items():
            pipe.hset(keys.experiment_samples(name), items=pairs)
        for queue, msgs in messages.items():
            pipe.lpush(queue, *msgs)
        pipe.execute()
        marks.clear()
        kept.clear()
        owners.clear()
        members.clear()
        messages.clear()

    for it in items:
        marks.append(it.sample_id)
        marks.append(it.queued_value)
        kept.append(it.sample_id)
        kept.append(it.kept if it.kept is not None else kept_payload(it.queue, it.payload_json))
        if it.output_path is not None:
            owners.append(it.output_path)
            owners.append(it.owner)
        if it.experiment is not None:
            members.setdefault(it.experiment, []).extend((it.sample_id, it.member))
        step = NORMAL_STEP if it.priority is None else it.priority
        lst = priority_list(it.queue, step)  # the queue's list of that priority (fleet.priority)
        msgs = messages.get(lst)
        if msgs is None:
            msgs = messages[lst] = []
        msgs.append(encode_message(it.payload_json, it.queue, it.label, priority=step))
        n += 1
        if n % CHUNK == 0:
            flush()
    flush()
    return n
