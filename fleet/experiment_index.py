"""The experiments index: which experiments a namespace has published, and every sample
each one published (docs/ARCHITECTURE.md, "Redis keys": ``<ns>:experiments``,
``<ns>:experiment_samples:<name>``, each sample's value ``member``).

A plan is what the experiment file and its inputs say *now*; the index is what was
published. A sample whose input was deleted after enqueue leaves the plan but not the
index, so `fleet status` still counts it (done, failed ...) and `fleet export` still
exports it. Written by `fleet enqueue` (the samples hash in the same transaction as the
messages, ``fleet.publisher``), read by status and export.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from itertools import filterfalse

import redis

from fleet.contract import Keys
from fleet.kept_payloads import Heads
from fleet.kinds.base import Experiment, Sample

CHUNK = 10000


@dataclass(frozen=True)
class ExperimentEntry:
    """One experiment of the index. Times are unix seconds."""

    name: str
    file: str  # the experiment file it was last enqueued from
    kind: str
    output_root: str
    first_enqueued_at: float
    last_enqueued_at: float
    published: int  # distinct samples it has published, ever

    def as_dict(self) -> dict:
        return asdict(self)


def member(group: str, output_path: str, head_id: str = "", output_root: str = "") -> str:
    """The samples hash's value of one sample: JSON [group, output path]; or, for a path under
    ``output_root``, the root of the payload head ``head_id`` (fleet.kept_payloads), that id
    followed by JSON [group, the path relative to the root] - a million samples' index is then
    a few dozen MB smaller. ``fleet.enqueue`` inlines it."""
    if head_id and output_path.startswith(output_root + "/"):
        return head_id + json.dumps([group, output_path[len(output_root) + 1 :]], ensure_ascii=False)
    return json.dumps([group, output_path], ensure_ascii=False)


def _unmember(raw: bytes, heads: Heads) -> tuple[str, str] | None:
    """(group, output path) from a samples hash value of either form; None when it does not parse."""
    try:
        text = raw.decode("utf-8")
        hid, rest = ("", text) if text.startswith("[") else (text[:16], text[16:])
        group, path = json.loads(rest)
        if hid:
            root = heads.output_root(hid)
            if root is None:
                return None
            path = f"{root}/{path}"
        return str(group), str(path)
    except (ValueError, TypeError, AttributeError):
        return None


def adopt_published(client: redis.Redis, keys: Keys, name: str, known: Iterable[Sample]) -> int:
    """Add to experiment ``name``'s samples hash its planned samples that are done, queued or
    running (``known``) when the hash holds fewer ids than that: ones published before the
    index existed. Call before publishing (the first enqueue after an upgrade adds them all;
    later ones find them). Returns how many ids were written."""
    hkey = keys.experiment_samples(name)
    known = list(known)
    if not known or client.hlen(hkey) >= len(known):
        return 0
    for i in range(0, len(known), CHUNK):
        pairs: list[str] = []
        for smp in known[i : i + CHUNK]:
            pairs += [smp.sample_id, member(smp.group, smp.output_path)]
        client.hset(hkey, items=pairs)
    return len(known)


def note_enqueue(client: redis.Redis, keys: Keys, exp: Experiment, published_now: int,
                 now: float | None = None) -> ExperimentEntry | None:
    """Update ``exp``'s entry after an enqueue (under the namespace's enqueue lock, so one
    writer at a time) and return it; None while the experiment has published nothing.
    ``last_enqueued_at`` moves only when samples were published now (or the entry is new)."""
    now = time.time() if now is None else now
    published = int(client.hlen(keys.experiment_samples(exp.name)))
    prev = _load(client.hget(keys.experiments, exp.name))
    if published == 0 and prev is None:
        return None
    first = prev.first_enqueued_at if prev is not None else now
    last = now if published_now or prev is None else prev.last_enqueued_at
    entry = ExperimentEntry(exp.name, str(exp.path), exp.kind, str(exp.output), first, last, published)
    client.hset(keys.experiments, exp.name, json.dumps(entry.as_dict(), ensure_ascii=False))
    return entry


def entries(client: redis.Redis, keys: Keys) -> list[ExperimentEntry]:
    """Every experiment of the index, the most recently enqueued first."""
    out = [e for e in (_load(v, k.decode()) for k, v in client.hgetall(keys.experiments).items()) if e is not None]
    return sorted(out, key=lambda e: (-e.last_enqueued_at, e.name))


def entry(client: redis.Redis, keys: Keys, name: str) -> ExperimentEntry | None:
    """The index's entry of experiment ``name``; None when it was never published."""
    return _load(client.hget(keys.experiments, name), name)


def published(client: redis.Redis, keys: Keys, name: str, but: AbstractSet[str] = frozenset()) -> dict[str, tuple[str, str]]:
    """Sample id -> (group, output path) of every sample experiment ``name`` has published,
    less those in ``but``. With ``but``, the ids are listed first (HKEYS) and only the others'
    values read: a status whose plan has every published sample reads no value at all."""
    hkey = keys.experiment_samples(name)
    out: dict[str, tuple[str, str]] = {}
    if but:
        # In C, and no set of a million: the ids in ``but`` are most of them (a status of a planned experiment).
        ids = list(filterfalse(but.__contains__, map(bytes.decode, client.hkeys(hkey))))
        pairs = ((sid, v) for i in range(0, len(ids), CHUNK)
                 for sid, v in zip(ids[i : i + CHUNK], client.hmget(hkey, ids[i : i + CHUNK])))
    else:
        pairs = ((k.decode(), v) for k, v in client.hscan_iter(hkey, count=CHUNK))
    heads = Heads(client, keys)
    for sid, v in pairs:
        found = _unmember(v, heads) if v is not None else None
        if found is not None:
            out[sid] = found
    return out


def plan_digest(planned_ids: Sequence[str]) -> str:
    """A digest of a plan's ids, in order: with the samples hash's length, ``Keys.index_checked``'s
    value (``"<length> <digest>"``) says every id the hash had then is among these."""
    return hashlib.blake2b("\n".join(planned_ids).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def keep_checked(client: redis.Redis, keys: Keys, name: str, planned_ids: Sequence[str], length_before: int,
                 length_after: int) -> None:
    """After an enqueue that wrote only ``planned_ids`` to experiment ``name``'s samples hash
    (``length_before`` ids before, ``length_after`` after; under the enqueue lock): when the hash
    was wholly planned before (empty, or so checked for this plan), it still is, so the next
    `fleet status` of this plan need not list its ids (about a second a million)."""
    digest = plan_digest(planned_ids)
    if length_before == 0 or client.hget(keys.index_checked, name) == f"{length_before} {digest}".encode():
        client.hset(keys.index_checked, name, f"{length_after} {digest}")


def _load(raw: bytes | str | None, name: str | None = None) -> ExperimentEntry | None:
    """An entry from its JSON; ``name`` (the hash field) wins over the one inside."""
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        if name is not None:
            d["name"] = name
        return ExperimentEntry(**{f: d[f] for f in ExperimentEntry.__dataclass_fields__})
    except (ValueError, TypeError, KeyError):
        return None  # an entry of another fleet version
