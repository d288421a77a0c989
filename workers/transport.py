"""A gate in front of the worker's consumer: what is not a fleet task is set aside, not run.

kombu's Redis transport pops a message (BRPOP) and hands ``json.loads`` of it to Celery.
Bytes that are not JSON raise out of the worker's event loop and end the worker
("Unrecoverable error"); so do a JSON value that is not a kombu envelope, and an envelope
with a header of the wrong type (``timelimit: 5``). Anyone who can write to the Redis
can put such a message in a queue: another program, a typo in redis-cli, a producer of
another version. So the worker checks each message it pops before Celery sees it,
against what ``fleet.publisher.encode_message`` (and Celery's own ``send_task``) writes:
a kombu envelope of JSON content, a body of JSON text (base64, as ``send_task`` writes it,
or the text itself, as ``encode_message`` does), a call of ``fleet.sample`` with one
argument and nothing chained to it; an argument that names a reference (``ref``) is exactly
``{"ref": "<sample id>"}`` (fleet.kept_payloads). Anything else is pushed onto ``<ns>:dead_letters``
(the bytes popped; re-serialised when they were JSON) with the reason and the time,
logged, and never decoded further:
no pickle is ever loaded and no other task runs. Whether the one argument is a valid
``TaskPayload`` is the runner's to judge (an invalid one fails with a record). The
worker's other queue (its control queue, for Flower's and ``celery inspect``'s commands)
gets only the check that keeps kombu from failing on it.

``install()`` puts the gate in kombu's Redis transport of this process (the worker's
only); docs/ARCHITECTURE.md, "Messages".
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Real
from typing import Any

from kombu.transport import redis as kombu_redis

from fleet.contract import TASK_SAMPLE
from fleet.kept_payloads import REF, reference_of
from fleet.publisher import message_body

log = logging.getLogger("fleet.worker")

DEAD_LETTERS_KEPT = 10_000  # the newest set-aside messages kept; a flood of junk must not fill the Redis

_OPTIONAL_STR = (str, type(None))
# Celery protocol 2 headers: the types Celery's worker can take (a wrong one raises out of
# its event loop). Headers not listed are passed through.
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "lang": _OPTIONAL_STR,
    "id": (str,),
    "shadow": _OPTIONAL_STR,
    "group": _OPTIONAL_STR,
    "group_index": (int, type(None)),
    "retries": (int,),
    "root_id": _OPTIONAL_STR,
    "parent_id": _OPTIONAL_STR,
    "argsrepr": _OPTIONAL_STR,
    "kwargsrepr": _OPTIONAL_STR,
    "origin": _OPTIONAL_STR,
    "ignore_result": (bool, type(None)),
    "replaced_task_nesting": (int, type(None)),
    "stamped_headers": (list, type(None)),
    "stamps": (dict, type(None)),
    "redelivered": (bool, type(None)),  # set by kombu when it restores an unacked message
}
_PROPERTY_TYPES: dict[str, tuple[type, ...]] = {
    "correlation_id": _OPTIONAL_STR,
    "reply_to": _OPTIONAL_STR,
    "delivery_mode": (int, type(None)),
    "delivery_info": (dict,),
    "priority": (int, type(None)),
}


def why_not_a_message(envelope: Any) -> str | None:
    """None when ``envelope`` (a popped message, JSON-decoded) has the shape kombu needs to
    make a Message of it (any queue: the control queue too); else why not."""
    if not isinstance(envelope, dict):
        return f"not a Celery message: a JSON {type(envelope).__name__}, not an object"
    props, headers = envelope.get("properties"), envelope.get("headers")
    if not isinstance(props, dict) or not isinstance(headers, (dict, type(None))):
        return "not a Celery message: no properties or headers"
    if not isinstance(props.get("delivery_tag"), str):
        return "no delivery tag"
    if props.get("body_encoding") not in ("base64", None) or not isinstance(envelope.get("body"), (str, type(None))):
        return "body not base64 or JSON text"
    return None


def why_not_a_task(envelope: Any) -> str | None:
    """None when ``envelope`` (a popped message, JSON-decoded) is a message of the fleet's
    task that Celery can take; else why not, in a few words."""
    why = why_not_a_message(envelope)
    if why is not None:
        return why
    props, headers = envelope["properties"], envelope["headers"]
    if not isinstance(headers, dict):
        return "not a Celery message: no headers"
    ctype, cenc = envelope.get("content-type"), envelope.get("content-encoding")
    if ctype != "application/json" or cenc not in ("utf-8", None):  # none: kombu reads UTF-8
        return f"content type {ctype!r} ({cenc!r}): fleet takes JSON only"
    if "task" not in headers:
        return "not a Celery protocol 2 message: no task header"
    if headers["task"] != TASK_SAMPLE:
        return f"unknown task {str(headers['task'])[:100]!r}: a fleet queue holds {TASK_SAMPLE} only"
    if headers.get("compression") is not None:
        return "compressed body: fleet never compresses"
    if headers.get("eta") is not None or headers.get("expires") is not None:
        return "eta or expires set: fleet never schedules a sample"
    for name, types in _HEADER_TYPES.items():
        if name in headers and not isinstance(headers[name], types):
            return f"header {name}: {type(headers[name]).__name__}"
    for name, types in _PROPERTY_TYPES.items():
        if name in props and not isinstance(props[name], types):
            return f"property {name}: {type(props[name]).__name__}"
    info = props.get("delivery_info") or {}
    if not all(isinstance(info.get(k), _OPTIONAL_STR) for k in ("exchange", "routing_key")):
        return "property delivery_info: exchange or routing_key not text"
    tl = headers.get("timelimit")
    if tl is not None and not (isinstance(tl, list) and len(tl) == 2
                               and all(x is None or (isinstance(x, Real) and not isinstance(x, bool)) for x in tl)):
        return "header timelimit: not [soft, hard]"
    if props.get("body_encoding") not in ("base64", None) or not isinstance(envelope.get("body"), str):
        return "body not base64 or JSON text"
    try:
        body = message_body(envelope)
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        return f"body does not decode ({type(e).__name__})"
    if not (isinstance(body, list) and len(body) == 3 and isinstance(body[0], list) and isinstance(body[1], dict)
            and isinstance(body[2], dict)):
        return "body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if len(args) != 1 or kwargs:
        return f"{TASK_SAMPLE} takes one argument, not {len(args)} and {len(kwargs)} keyword(s)"
    if any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord")):
        return "tasks chained to the sample (callbacks, errbacks, chain or chord): fleet chains nothing"
    if isinstance(args[0], dict) and REF in args[0] and reference_of(args[0]) is None:
        return 'a reference is {"ref": "<sample id>"} and nothing else'
    return None


@contextmanager
def reused_client(channel: Any, client: Any = None) -> Iterator[Any]:
    """kombu's ``Channel.conn_or_acquire``, with one client per pool instead of one per call.

    kombu makes a new redis.Redis per call, three per sample (QoS note, ack, unacked index):
    each builds redis-py's table of some 300 response callbacks, about a sixth of a no-op
    sample's worker CPU (docs/BENCHMARKS.md, "Fleet overhead"). A client holds no connection
    of its own (each command takes one from the pool, a pipeline its own), so one per pool
    serves every caller and thread; a pool kombu replaced after a connection error gets a
    new client."""
    if client:
        yield client
        return
    pool = channel.pool
    cached = channel._sync_client
    if cached is None or cached.connection_pool is not pool:
        cached = channel._sync_client = channel._create_client()
    yield cached


class GatedChannel(kombu_redis.Channel):
    """kombu's Redis channel, with ``why_not_a_task`` between each pop from a fleet queue and
    Celery (``why_not_a_message`` for the worker's other queues: its control queue)."""

    dead_letters_key: str | None = None  # set by install()
    queue_prefix: str | None = None  # what every fleet queue's name starts with
    worker: str = ""

    _sync_client: Any = None  # conn_or_acquire's client, for the pool it was made for
    conn_or_acquire = reused_client  # type: ignore[assignment]

    def basic_consume(self, queue, *args, **kwargs):
        tag = super().basic_consume(queue, *args, **kwargs)
        deliver = self.connection._callbacks[queue]  # kombu's: wraps the envelope in a Message for Celery
        check = why_not_a_task if self.queue_prefix and queue.startswith(self.queue_prefix) else why_not_a_message

        def gate(envelope: Any) -> Any:
            self._handed_over = True
            why = check(envelope)
            if why is not None:
                self._set_aside(json.dumps(envelope, ensure_ascii=False).encode("utf-8"), queue, why)
                return None
            return deliver(envelope)

        self.connection._callbacks[queue] = gate
        return tag

    def _brpop_read(self, **options):
        # kombu decodes the popped bytes (UTF-8, then JSON) before any callback: a decoding
        # error raised before the gate ran is about the message popped, kept here as popped.
        self._handed_over = False
        popped: list = []
        client = self.client
        parse = client.parse_response

        def keep(*args, **kwargs):
            reply = parse(*args, **kwargs)
            popped.append(reply)
            return reply

        client.parse_response = keep
        try:
            return super()._brpop_read(**options)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if self._handed_over or not popped or not popped[-1]:
                raise
            dest, raw = (x if isinstance(x, bytes) else str(x).encode("utf-8") for x in popped[-1])
            queue = dest.decode("utf-8", "replace").rsplit(self.sep, 1)[0]
            self._set_aside(raw, queue, f"not JSON ({type(e).__name__}: {e})"[:300])
            return True
        finally:
            del client.parse_response  # kombu's own again

    def _set_aside(self, raw: bytes, queue: str | None, why: str) -> None:
        """Keep ``raw`` in the dead letters (the bytes popped; re-serialised when they were
        JSON) with why; never raises."""
        try:
            text, encoding = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
        entry = json.dumps({"reason": why, "queue": queue, "worker": self.worker, "at": time.time(),
                            "encoding": encoding, "message": text}, ensure_ascii=False)
        where = "nowhere (no dead-letter list configured)"
        if self.dead_letters_key:
            try:
                with self.conn_or_acquire() as client:
                    pipe = client.pipeline(transaction=True)
                    pipe.lpush(self.dead_letters_key, entry)
                    pipe.ltrim(self.dead_letters_key, 0, DEAD_LETTERS_KEPT - 1)
                    pipe.execute()
                where = self.dead_letters_key
            except Exception as e:  # Redis away: the message is gone either way; say so
                where = f"nowhere: cannot write {self.dead_letters_key} ({type(e).__name__}: {e})"
        log.error("set aside a message from %s that is not a fleet task (%s): %d bytes, kept in %s",
                  queue or "a queue", why, len(raw), where)


def install(queue_prefix: str, dead_letters_key: str, worker: str) -> None:
    """Put the gate in kombu's Redis transport of this process (before the worker connects):
    on the queues whose name starts with ``queue_prefix`` (the fleet's)."""
    GatedChannel.queue_prefix = queue_prefix
    GatedChannel.dead_letters_key = dead_letters_key
    GatedChannel.worker = worker
    kombu_redis.Transport.Channel = GatedChannel
