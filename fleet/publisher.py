"""Bulk publishing of tasks as Celery protocol-2 messages, pushed straight into kombu's
Redis lists in pipelines. ``encode_message`` is the one writer of the message: the
planner, retries and the reaper all use it; ``message_body`` its one reader.

Why not ``apply_async``: one round trip per task caps enqueueing at ~2,000/s, and
kombu's batch producer at ~3,300/s (docs/ARCHITECTURE.md, "Publishing"); a pipelined LPUSH of
the message bytes reaches ~19,000/s. The message is what ``app.send_task(TASK_SAMPLE,
args=[payload], queue=q)`` writes less what neither kombu nor Celery's worker needs: headers
that are empty or defaults, the correlation id, the content encoding (kombu's default is
UTF-8), and the body's base64 (the body is the JSON text itself, which kombu takes when
``body_encoding`` is absent); the task id is also the delivery tag. Real workers run it in
every integration test. JSON is the only serializer.

What a message costs Redis matters at a million queued samples (docs/BENCHMARKS.md,
"A million samples"): a bulk-published message's argument is a reference to the sample's
kept payload (fleet.kept_payloads), so a message is ~400 bytes whatever the kind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import queue
import re
import threading
from collections.abc import Iterable
from functools import lru_cache
from json.encoder import encode_basestring  # what json.dumps(str, ensure_ascii=False) returns, without its set-up
from operator import itemgetter
from typing import NamedTuple

import redis

from fleet.contract import TASK_SAMPLE, Keys
from fleet.priority import NORMAL_STEP, priority_list

_BODY_TAIL = "],{},{}]"  # no kwargs; nothing chained (an empty embed: Celery reads each part with .get)
CHUNK = 5000  # tasks per pipeline flush: big enough to amortise round trips, small enough to stream


class Outgoing(NamedTuple):
    """One task to publish: its queue, the message's argument (already serialised JSON: a
    reference to the mark, or a whole payload), a short human description (shown in Flower)
    and the queued hash's value, the mark that keeps its payload (fleet.kept_payloads).
    A tuple: a million of them are made per enqueue."""

    queue: str
    payload_json: str
    sample_id: str
    label: str
    mark: str
    owner_key: bytes | None = None  # its output path's field in the output owners index (output_key), when given
    owner: str = ""  # that index's value: "<sample id>\t<experiment>"
    priority: int | None = None  # kombu priority step (fleet.priority); None: normal
    experiment: str | None = None  # noted in the experiment's samples hash (Keys.experiment_samples), when given
    member: str = ""  # that hash's value (fleet.experiment_index.member)


def output_key(path: str) -> bytes:
    """The output owners index's field for an output path: 12 bytes of its BLAKE2b hash
    (2^-96 odds that two paths share one), much smaller than the path itself."""
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=12).digest()


def _uuid4() -> str:
    """``str(uuid.uuid4())`` (random, version 4, RFC 4122 variant) at a fraction of its cost."""
    h = os.urandom(16).hex()
    # version nibble "4"; variant: the top two bits of byte 8 are 10, so its first hex digit is 8, 9, a or b
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def _uuid4s(n: int) -> list[str]:
    """``n`` ids as ``_uuid4`` makes them, from one read of the random source (a read per id
    costs a million system calls per million messages)."""
    h = os.urandom(16 * n).hex()
    v = _VARIANT
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-{v[h[i + 16]]}{h[i + 17:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * n, 32)]


def _envelope(task: str, queue: str, body: str, tid: str, label: str, delivery_tag: str, priority: int = 0) -> dict:
    """The kombu/Redis envelope as a dict (the one definition of its fields and their order).

    Only what kombu's Redis channel and Celery's worker read: Celery takes every other header
    with ``.get`` and a default (root and parent id None, no time limit, no eta, retries 0,
    ignore_result from the task), kombu needs ``delivery_info`` (exchange, routing key),
    ``priority`` and a ``delivery_tag`` (the last field: fleet.control's scripts find it at the
    end). No ``body_encoding``: the body is the JSON text itself; no ``content-encoding``: kombu
    takes UTF-8 when there is none."""
    return {
        "body": body,
        "content-type": "application/json",
        "headers": {"task": task, "id": tid, "argsrepr": label},
        "properties": {
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,  # kombu's step: which of the queue's lists holds it (fleet.priority)
            "delivery_tag": delivery_tag,
        },
    }


_SLOTS = ("body", "tid", "label", "tag")  # the per-message values, in this order in encode_message


@lru_cache(maxsize=256)
def _template(task: str, queue: str, priority: int = 0) -> tuple[bytes, itemgetter]:
    """The envelope of (task, queue) as a bytes %-format with a ``%s`` per per-message value.

    Returns (format, pick): the message is ``format % pick((body, tid, label, tag))``, each
    value already JSON-encoded as UTF-8 bytes. Built by ``json.dumps`` of the same dict
    with markers in the slots, so the bytes are exactly those of ``json.dumps(_envelope(...),
    ensure_ascii=False, separators=(",", ":")).encode("utf-8")``. The markers hold a
    NUL, which only a task or queue name with a NUL could repeat: those (never seen in
    practice) take the slow path in ``encode_message``.
    """
    marks = {k: f"fleet\x00slot:{k}" for k in _SLOTS}
    text = json.dumps(_envelope(task, queue, marks["body"], marks["tid"], marks["label"], marks["tag"], priority),
                      ensure_ascii=False, separators=_COMPACT)
    quoted = {json.dumps(m, ensure_ascii=False): _SLOTS.index(k) for k, m in marks.items()}
    pieces, order, pos = [], [], 0
    for m in re.finditer("|".join(re.escape(q) for q in quoted), text):
        pieces.append(text[pos : m.start()])
        order.append(quoted[m.group(0)])
        pos = m.end()
    pieces.append(text[pos:])
    fmt = "%s".join(piece.replace("%", "%%") for piece in pieces).encode("utf-8")
    return fmt, itemgetter(*order)


_COMPACT = (",", ":")


def encode_message(payload_json: str, queue: str, label: str, task_id: str | None = None, priority: int = 0) -> bytes:
    """The kombu/Redis envelope of a Celery protocol-2 message of the fleet's one task
    (``TASK_SAMPLE``) with args ``[payload]`` (a whole payload, or a reference to the sample's
    kept payload: fleet.kept_payloads); ``label`` is what Flower shows as its args."""
    task = TASK_SAMPLE
    tid = task_id or _uuid4()
    body = encode_basestring("[[" + payload_json + _BODY_TAIL)  # the body's JSON text, as a JSON string
    if "\x00" in task or "\x00" in queue:
        envelope = _envelope(task, queue, json.loads(body), tid, label, tid, priority)
        return json.dumps(envelope, ensure_ascii=False, separators=_COMPACT).encode("utf-8")
    fmt, pick = _template(task, queue, priority)
    tid_json = encode_basestring(tid).encode("utf-8")
    return fmt % pick((body.encode("utf-8"), tid_json, encode_basestring(label).encode("utf-8"), tid_json))


def message_body(envelope: dict) -> object:
    """The decoded body (``[args, kwargs, embed]``) of a kombu envelope: base64 (what kombu and
    ``send_task`` write) or the JSON text itself (what ``encode_message`` writes). ValueError
    (binascii.Error, UnicodeDecodeError, json's) when it does not decode; TypeError, KeyError
    for an envelope without a body."""
    raw = envelope["body"]
    if not isinstance(raw, str):
        raise TypeError("body is not text")
    enc = (envelope.get("properties") or {}).get("body_encoding")
    if enc == "base64":
        return json.loads(base64.b64decode(raw, validate=True).decode("utf-8"))
    if enc is not None:
        raise ValueError(f"body encoding {enc!r}")
    return json.loads(raw)


def message_sample_id(raw: bytes | str | dict) -> str | None:
    """The sample a fleet message is for (its payload's ``sample_id``, or the id it refers to);
    None for anything else."""
    try:
        env = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        payload = message_body(env)[0][0]  # type: ignore[index]
        sid = payload.get("ref", payload.get("sample_id"))
        return sid if isinstance(sid, str) else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, binascii.Error):
        return None


def publish(client: redis.Redis, keys: Keys, items: Iterable[Outgoing]) -> int:
    """Push every item onto its queue and mark it queued; returns the count.

    Per chunk of ``CHUNK`` tasks: one HSET of their queued marks (which keep their payloads),
    HSETs of their output owners and experiment's samples, then one LPUSH per queue
    with their messages in order (LPUSH of many values = that many LPUSHes, one after the
    other), in MULTI/EXEC so a chunk is all published and marked or not at all. A crash
    mid-way leaves a prefix of chunks published and marked, which the next enqueue
    completes (planning is a set difference).

    A thread sends the chunks, in order, while this one makes the next: Redis works on chunk k
    while Python builds chunk k+1 (a million samples: some seconds less). An error of Redis
    stops the publishing and is raised here; what was sent stays published.
    """
    n = 0
    marks: list[str] = []
    owners: list[str | bytes] = []
    members: dict[str, list[str]] = {}  # experiment -> [sample id, its member value, ...]
    messages: dict[str, list[bytes]] = {}
    lists: dict[tuple[str, int], str] = {}  # (queue, step) -> the queue's list of that priority (fleet.priority)
    tids = iter(())
    sender = _Sender(client, keys)

    def flush() -> None:
        nonlocal marks, owners, members, messages
        if marks:
            sender.send(marks, owners, members, messages)
            marks, owners, members, messages = [], [], {}, {}

    try:
        for it in items:
            if n % CHUNK == 0:
                flush()
                tids = iter(_uuid4s(CHUNK))
            marks.append(it.sample_id)
            marks.append(it.mark)
            if it.owner_key is not None:
                owners.append(it.owner_key)
                owners.append(it.owner)
            if it.experiment is not None:
                members.setdefault(it.experiment, []).extend((it.sample_id, it.member))
            step = NORMAL_STEP if it.priority is None else it.priority
            lst = lists.get((it.queue, step))
            if lst is None:
                lst = lists[(it.queue, step)] = priority_list(it.queue, step)
            msgs = messages.get(lst)
            if msgs is None:
                msgs = messages[lst] = []
            msgs.append(encode_message(it.payload_json, it.queue, it.label, next(tids), step))
            n += 1
        flush()
    finally:
        sender.close()  # what was handed over is sent (or its error raised) before publish returns
    return n


class _Sender:
    """The thread of ``publish`` that sends its chunks, one MULTI/EXEC each, in order. At most
    two chunks wait (memory stays bounded); the first error stops it and is raised by the next
    ``send`` or by ``close``."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self.chunks: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fleet-publish", daemon=True)
        self.thread.start()

    def send(self, marks: list, owners: list, members: dict, messages: dict) -> None:
        self._raise()
        self.chunks.put((marks, owners, members, messages))

    def close(self) -> None:
        self.chunks.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        keys = self.keys
        while (chunk := self.chunks.get()) is not None:
            if self.error is not None:
                continue  # drain: publish raises at its next send or close
            marks, owners, members, messages = chunk
            try:
                pipe = self.client.pipeline(transaction=True)
                pipe.hset(keys.queued, items=marks)
                if owners:
                    pipe.hset(keys.output_owners, items=owners)
                for name, pairs in members.items():
                    pipe.hset(keys.experiment_samples(name), items=pairs)
                for lst, msgs in messages.items():
                    pipe.lpush(lst, *msgs)
                pipe.execute()
            except BaseException as e:  # raised in publish's thread
                self.error = e
