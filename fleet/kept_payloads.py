"""A queued sample's kept payload (its queued mark) and the message that refers to it.

A published sample's payload is stored once, as the value of the queued hash
(``<ns>:queued``, sample id -> *mark*), and its Celery message carries only a reference to
it, ``{"ref": "<sample id>"}`` (docs/ARCHITECTURE.md, "Messages"). The mark is
``<head id>\\t<queue>\\t<tail>``:

- the *head* is the part every payload of an experiment shares (``fleet.planner.payload_head``,
  an unclosed JSON object: schema, kind, experiment, output root, attempt, shared), stored once
  in ``<ns>:payload_heads`` under its id (the first 16 hex digits of its SHA-256, so a head
  never changes under its id and anyone may cache it);
- the *tail* is the sample's own part, a JSON fragment that starts with ``,"group":`` and
  closes the object; the sample id, which is the hash field, is not repeated in it.

The payload is ``head + ',"sample_id":' + <id as JSON> + tail``. A mark without a head id
(``\\t<queue>\\t<payload>``) keeps a whole payload (retries, a dead worker's sample). The queue is
where lost-message recovery publishes the sample again. Marks written before this layout
are ``[experiment, group]`` (their payload is in ``<ns>:payloads``, with the sample id in its
tail); every reader takes both.

The worker expands a reference inside its admission script (fleet/admission.py), in the
round trip that claims the sample; lost-message recovery, ``fleet cancel`` and the counts
read marks through this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from json.decoder import scanstring
from json.encoder import encode_basestring

import redis

from fleet.contract import Keys

REF = "ref"  # the one key of a reference payload
GROUP_START = ',"group":'  # how a tail starts (fleet.planner.tails writes the group first)


def head_id(head: str) -> str:
    """The id a head is stored under: its content's hash, so it never changes under the id."""
    return hashlib.sha256(head.encode("utf-8")).hexdigest()[:16]


def reference(sample_id: str) -> str:
    """The JSON argument of a message whose payload is the sample's queued mark."""
    return '{"ref":' + encode_basestring(sample_id) + "}"


def reference_of(payload: object) -> str | None:
    """The sample id of a reference payload (exactly ``{"ref": "<id>"}``); None for anything else."""
    if isinstance(payload, dict) and len(payload) == 1:
        sid = payload.get(REF)
        if isinstance(sid, str) and sid:
            return sid
    return None


def kept_payload(queue: str, payload_json: str) -> str:
    """A mark keeping a whole payload (no head): what retries, a dead worker's sample and a
    given-back sample are queued with."""
    return f"\t{queue}\t{payload_json}"


def mark(head: str, queue: str, tail: str) -> str:
    """A mark keeping a payload as its head's id and its tail (what `fleet enqueue` writes)."""
    return f"{head}\t{queue}\t{tail}"


def is_legacy(raw: str) -> bool:
    """A mark of the layout before kept payloads lived in it: ``[experiment, group]``."""
    return raw.startswith("[")


class Heads:
    """Payload heads by id, read from Redis once each (a head never changes under its id)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client, self.key = client, keys.payload_heads
        self._text: dict[str, str | None] = {}
        self._experiment: dict[str, str] = {}
        self._root: dict[str, str | None] = {}

    def get(self, hid: str) -> str | None:
        if hid not in self._text:
            raw = self.client.hget(self.key, hid)
            self._text[hid] = None if raw is None else raw.decode("utf-8")
        return self._text[hid]

    def output_root(self, hid: str) -> str | None:
        """The output root a head names (None for an unknown or unreadable head)."""
        if hid not in self._root:
            text = self.get(hid)
            try:
                self._root[hid] = str(json.loads(text + "}")["output_root"]) if text is not None else None
            except (ValueError, KeyError, TypeError):
                self._root[hid] = None
        return self._root[hid]

    def experiment(self, hid: str) -> str:
        """The experiment a head names ("?" for an unknown or unreadable head)."""
        if hid not in self._experiment:
            text = self.get(hid)
            try:
                self._experiment[hid] = str(json.loads(text + "}")["experiment"]) if text is not None else "?"
            except (ValueError, KeyError, TypeError):
                self._experiment[hid] = "?"
        return self._experiment[hid]


def unkeep(kept: str, sample_id: str, heads: Callable[[str], str | None]) -> tuple[str, str] | None:
    """(queue, payload JSON) from a mark or a kept payload of either layout; None when its
    head is unknown or it keeps no payload (a legacy ``[experiment, group]`` mark)."""
    if is_legacy(kept):
        return None
    hid, queue, rest = kept.split("\t", 2)
    if not hid:
        return queue, rest
    head = heads(hid)
    if head is None:
        return None
    if rest.startswith(',"sample_id":'):  # a kept payload of the earlier layout: the id is in it
        return queue, head + rest
    return queue, head + ',"sample_id":' + encode_basestring(sample_id) + rest


def owner(raw: str, heads: Heads) -> tuple[str, str]:
    """(experiment, group) of a queued mark of either layout; ("?", "?") when it does not parse."""
    try:
        if is_legacy(raw):
            exp, group = json.loads(raw)[:2]
            return str(exp), str(group)
        hid, _queue, rest = raw.split("\t", 2)
        if hid and rest.startswith(GROUP_START + '"'):
            return heads.experiment(hid), scanstring(rest, len(GROUP_START) + 1)[0]
        d = json.loads(rest if not hid else "{" + rest[1:])
        return (heads.experiment(hid) if hid else str(d.get("experiment", "?"))), str(d.get("group", "?"))
    except (ValueError, TypeError, AttributeError):
        return "?", "?"


def group_of(raw: str, heads: Heads) -> str:
    """The group of a queued mark of either layout."""
    return owner(raw, heads)[1]


def message_payload(client: redis.Redis, keys: Keys, raw: bytes | str) -> dict | None:
    """The payload a message stands for: its own, or the one its reference's queued mark keeps
    (None when the mark is gone or the message is no fleet task). For tools and tests; a worker
    expands references in its admission script (fleet/admission.py)."""
    from fleet.publisher import message_body

    try:
        arg = message_body(json.loads(raw))[0][0]  # type: ignore[index]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    sid = reference_of(arg)
    if sid is None:
        return arg if isinstance(arg, dict) else None
    mark_raw = client.hget(keys.queued, sid)
    found = unkeep(mark_raw.decode("utf-8"), sid, Heads(client, keys).get) if mark_raw is not None else None
    return json.loads(found[1]) if found is not None else None
