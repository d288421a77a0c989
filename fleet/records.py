"""Durable sample records in Redis: done, failed, queued, running, leases.

A sample is *done* when its id is in the done set **and** its output file exists (a
record whose file has gone means not done). Records never expire. A running sample
holds a lease (a key with a TTL, renewed by its worker's heartbeat); a running entry
without a lease belongs to a dead worker and is published again by the reaper.

Both sides use this module: the producer to skip done and in-flight samples and to
count status, the workers to claim, finish and fail samples.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_not, not_

import redis
from redis.commands.core import Script

from fleet import bulk_reads, control, output_files
from fleet.contract import CompletionRecord, FailureRecord, Keys, RunningEntry, task_label
from fleet.kept_payloads import Heads, is_legacy, unkeep
from fleet.kinds.base import Sample
from fleet.publisher import encode_message, message_sample_id

CHUNK = 10000


@dataclass
class Classified:
    """Planned ids split by state. ``todo`` keeps the planned order."""

    done: set[str]
    queued: set[str]
    running: set[str]
    todo: list[int]  # indexes into the planned list
    files: output_files.Checked | None = None  # how the outputs of recorded samples were checked


def classify(client: redis.Redis, keys: Keys, ids: Sequence[str], outputs: Sequence[str],
             verify_all: bool = False) -> Classified:
    """Which planned samples are done (record and a file of the recorded size), queued,
    running, or still to do.

    Reads, in this order: the running hash, the done sizes (HMGET; for ids without one,
    the done set, which is all records written before sizes were kept), then - only for
    the samples not done - which have a queued mark (``present``: flags, not the marks, which
    keep whole payloads), and the running hash again. Skipping
    the queued marks of done samples halves the Redis work of a re-run that is mostly
    done. The order catches every sample in transit: queued -> running (claim) is seen by
    reading queued before running; running -> queued (requeue) and running -> done by
    the first read of running. Running means running in either read.

    Outputs are checked by ``output_files.in_place``: a folder whose outputs were verified
    and that has not changed since is trusted without a stat per file; ``verify_all`` stats
    every file (a file changed in place is seen only then).
    """
    n = len(ids)
    running = {k.decode() for k in client.hkeys(keys.running)}
    sizes = bulk_reads.hmget_many(client, keys.done_bytes, ids, CHUNK)  # packed in C: a million ids
    # Ids in the done set without a size: records from before sizes were kept, if there are any.
    unsized = [k for k, b in enumerate(sizes) if b is None] if has_legacy_records(client, keys) else []
    legacy: set[int] = set()
    if unsized:
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(unsized), CHUNK):
            pipe.smismember(keys.done, [ids[k] for k in unsized[i : i + CHUNK]])
        flags = [d for part in pipe.execute() for d in part]
        legacy = {k for k, d in zip(unsized, flags) if d}
    if n and not legacy and None not in sizes:  # every sample recorded (a re-run of a done experiment)
        recorded: Sequence[int] = range(n)
        files = output_files.in_place(client, keys.verified_folders, outputs, sizes, verify_all)
    else:
        recorded = ([k for k, b in enumerate(sizes) if b is not None or k in legacy] if legacy
                    else list(compress(range(n), map(is_not, sizes, repeat(None)))))  # C loops: a million in 0.03 s
        files = output_files.in_place(client, keys.verified_folders, [outputs[k] for k in recorded],
                                      [sizes[k] for k in recorded], verify_all)  # None: a legacy record
    done_at = list(compress(recorded, files.ok))
    done: set[str] = set(map(ids.__getitem__, done_at))
    rest: Sequence[int]  # not done: queued, running or to do
    if len(done_at) == n:
        rest = []
    elif not done_at:
        rest = range(n)  # none done (a first status): no list of a million indexes, nor a copy of the ids
    else:
        settled = set(done_at)
        rest = [k for k in range(n) if k not in settled]
    unsettled = ids if len(rest) == n else [ids[k] for k in rest]
    queued = bulk_reads.fields_present(client, keys.queued, unsettled, _PRESENT, CHUNK)
    running.update(k.decode() for k in client.hkeys(keys.running))  # after the queued flags (above)
    todo: list[int] = []
    if not running:  # the usual case, in C loops: a million in 0.15 s when every one is queued
        if len(queued) != len(unsettled):  # (equal: every unsettled id is queued, nothing to do)
            todo = list(compress(rest, map(not_, map(queued.__contains__, unsettled))))
    else:
        found, queued = queued, set()
        for k in rest:
            sid = ids[k]
            if sid in running:
                pass
            elif sid in found:
                queued.add(sid)
            else:
                todo.append(k)
    return Classified(done, queued, running & set(ids) if running else set(), todo, files)


# 1 for each field of ARGV the hash KEYS[1] has, else 0: HEXISTS over many fields in one call
# (an HMGET would send back every queued mark, a whole payload each).
_PRESENT = """
local out = {}
for i = 1, #ARGV do out[i] = redis.call('HEXISTS', KEYS[1], ARGV[i]) end
return out
"""
_present_script: Script | None = None


def present(pipe: redis.client.Pipeline, key: str, fields: Sequence[str]) -> None:
    """Queue on ``pipe`` one script call per ``CHUNK`` fields; each answers a list of 0/1, in
    order: whether hash ``key`` has that field."""
    global _present_script
    if _present_script is None:
        _present_script = pipe.register_script(_PRESENT)
    for i in range(0, len(fields), CHUNK):
        _present_script(keys=[key], args=list(fields[i : i + CHUNK]), client=pipe)


def has_legacy_records(client: redis.Redis, keys: Keys) -> bool:
    """Whether done samples were recorded before sizes (and path-aware ids) were kept."""
    pipe = client.pipeline(transaction=False)
    pipe.scard(keys.done)
    pipe.hlen(keys.done_bytes)
    n_done, n_sized = pipe.execute()
    return n_done > n_sized


def adopt_legacy_records(client: redis.Redis, keys: Keys, todo: list[Sample]) -> set[str]:
    """Samples done under an earlier id (an alias) whose file is in place: their record is
    copied under the current id, so they count as done now and are never made again."""
    with_alias = [smp for smp in todo if smp.aliases]
    adopted: set[str] = set()
    for i in range(0, len(with_alias), CHUNK):
        chunk = with_alias[i : i + CHUNK]
        olds = [smp.aliases[0] for smp in chunk]
        pipe = client.pipeline(transaction=False)
        pipe.smismember(keys.done, olds)
        pipe.hmget(keys.records, olds)
        flags, recs = pipe.execute()
        pipe = client.pipeline(transaction=True)
        for smp, flag, raw in zip(chunk, flags, recs):
            if not flag or raw is None:
                continue
            try:
                rec = json.loads(raw)
                size = os.stat(smp.output_path).st_size
            except (ValueError, OSError):
                continue
            if rec.get("output_path") != smp.output_path:
                continue
            pipe.hset(keys.records, smp.sample_id, _upgraded(rec, smp, size).model_dump_json(by_alias=True))
            pipe.sadd(keys.done, smp.sample_id)
            pipe.hset(keys.done_bytes, smp.sample_id, size)
            adopted.add(smp.sample_id)
        pipe.execute()
    return adopted


def _upgraded(rec: dict, smp: Sample, size: int) -> CompletionRecord:
    """A record of schema 1 (video only; ``category``, ``gpu`` as text) as today's record of ``smp``."""
    gpu = str(rec.get("gpu", ""))
    return CompletionRecord(
        sample_id=smp.sample_id, experiment=str(rec.get("experiment", "?")), kind=str(rec.get("kind", "video")),
        group=smp.group, label=smp.label, output_path=smp.output_path, output_bytes=size,
        duration_s=float(rec.get("duration_s", 0.0)), worker=str(rec.get("worker", "?")),
        hostname=str(rec.get("hostname", "?")),
        gpus=[int(g) for g in gpu.split(",") if g.strip().isdigit()], attempt=int(rec.get("attempt", 1)),
        deliveries=int(rec.get("deliveries", 1)), model_loaded=bool(rec.get("model_loaded", False)),
        model_load_s=float(rec.get("model_load_s", 0.0)), finished_at=float(rec.get("finished_at", 0.0)),
        metrics={"adopted_from": str(rec.get("sample_id", ""))},
    )


# ---- worker side -----------------------------------------------------------------------------
def undo(client: redis.Redis, keys: Keys, sample_ids: Sequence[str]) -> None:
    """Make done samples to-do again (``fleet enqueue --rerun``): their done marks go, their
    records stay until the new run replaces them."""
    for i in range(0, len(sample_ids), CHUNK):
        chunk = list(sample_ids[i : i + CHUNK])
        pipe = client.pipeline(transaction=True)
        pipe.srem(keys.done, *chunk)
        pipe.hdel(keys.done_bytes, *chunk)
        pipe.execute()


def renew(client: redis.Redis, keys: Keys, sample_id: str, token: str, ttl_s: float) -> bool:
    """Extend our lease; False when it is no longer ours (expired and taken)."""
    script = client.register_script(
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
        "elseif redis.call('exists', KEYS[1]) == 0 then return redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 1 "
        "else return 0 end"
    )
    return bool(script(keys=[keys.lease(sample_id)], args=[token, int(ttl_s * 1000)]))


# KEYS: 1 records, 2 done, 3 done_bytes, 4 payloads, 5 failed, 6 running, 7 deliveries, 8 lease.
# ARGV: 1 sample id, 2 the record's JSON, 3 its output's size in bytes (-1: a folder), 4 the
# completing run's token ('': any run's). The running entry, deliveries and lease are another
# run's when the entry holds another token (this run's lease lapsed, the reaper published the
# sample again and another worker took it): they stay, so that run goes on as running.
_COMPLETE = """
local sid, tok = ARGV[1], ARGV[4]
redis.call('HSET', KEYS[1], sid, ARGV[2])
redis.call('SADD', KEYS[2], sid)
redis.call('HSET', KEYS[3], sid, ARGV[3])
redis.call('HDEL', KEYS[4], sid)
redis.call('HDEL', KEYS[5], sid)
if tok ~= '' then
  local cur = redis.call('HGET', KEYS[6], sid)
  if cur then
    local ok, entry = pcall(cjson.decode, cur)
    if ok and type(entry) == 'table' and type(entry['token']) == 'string' and entry['token'] ~= tok then
      return 2
    end
  end
  local lease = redis.call('GET', KEYS[8])
  if lease and lease ~= tok then
    return 2
  end
end
redis.call('HDEL', KEYS[6], sid)
redis.call('HDEL', KEYS[7], sid)
redis.call('DEL', KEYS[8])
return 1
"""
_complete_script: Script | None = None  # registered once: the sha is the text's, any client runs it


def complete(client: redis.Redis, keys: Keys, record: CompletionRecord, record_json: str | None = None,
             token: str | None = None) -> bool:
    """Mark done (after the output file is in place) and drop the running state, atomically
    in one script call: the record, the done set and size, and the end of the kept payload,
    failure, running entry, deliveries and lease. ``record_json``: the record already
    serialised (by_alias), so a caller that has it does not pay for it twice. ``token``: the
    completing run's; when the running entry or lease is another run's, those stay (the
    sample is done either way). False when they stayed."""
    global _complete_script
    if _complete_script is None:
        _complete_script = client.register_script(_COMPLETE)
    sid = record.sample_id
    result = _complete_script(
        keys=[keys.records, keys.done, keys.done_bytes, keys.payloads, keys.failed, keys.running, keys.deliveries,
              keys.lease(sid)],
        args=[sid, record_json or record.model_dump_json(by_alias=True), record.output_bytes, token or ""],
        client=client)
    return result == 1


def fail(client: redis.Redis, keys: Keys, record: FailureRecord, final: bool) -> None:
    """Record a failure, end the run and release the sample (drop its queued mark: a
    duplicate's), in one transaction; ``final`` also ends its deliveries and kept
    payload (no retry follows)."""
    sid = record.sample_id
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.failed, sid, record.model_dump_json(by_alias=True))
    pipe.hdel(keys.running, sid)
    pipe.delete(keys.lease(sid))
    pipe.hdel(keys.queued, sid)
    if final:
        pipe.hdel(keys.deliveries, sid)
        pipe.hdel(keys.payloads, sid)
    pipe.execute()


def orphans(client: redis.Redis, keys: Keys, ttl_s: float, now: float | None = None) -> list[tuple[str, RunningEntry]]:
    """Running entries whose lease is gone: their worker died mid-sample."""
    now = time.time() if now is None else now
    entries = client.hgetall(keys.running)
    if not entries:
        return []
    pipe = client.pipeline(transaction=False)
    ids = [k.decode() for k in entries]
    for sid in ids:
        pipe.exists(keys.lease(sid))
    alive = pipe.execute()
    out = []
    for sid, live in zip(ids, alive):
        entry = RunningEntry.model_validate_json(entries[sid.encode()])
        if not live and now - entry.started_at > ttl_s:
            out.append((sid, entry))
    return out


def take_orphan(client: redis.Redis, keys: Keys, sample_id: str, queued: str, queue: str, message: bytes) -> bool:
    """Move an orphan from running back to the front of its queue (its worker died: it has
    waited its turn already), atomically; True for exactly one caller."""
    script = client.register_script(
        "if redis.call('exists', KEYS[3]) == 1 then return 0 end "
        "if redis.call('hdel', KEYS[1], ARGV[1]) == 0 then return 0 end "
        "redis.call('hset', KEYS[2], ARGV[1], ARGV[2]) redis.call('rpush', KEYS[4], ARGV[3]) return 1"
    )
    return bool(script(keys=[keys.running, keys.queued, keys.lease(sample_id), queue], args=[sample_id, queued, message]))


def give_back(
    client: redis.Redis, keys: Keys, sample_id: str, token: str, queued: str, queue: str, message: bytes,
    kombu_tag: str | None = None,
) -> bool:
    """A worker that must stop at once (a second Ctrl-C) puts the sample it runs back at the
    front of ``queue`` (a list: its priority's), the same attempt, atomically and only while
    the running entry is still its own (``token``). The start does not count as a delivery:
    the sample did not kill its worker. ``kombu_tag``: the delivery tag of the message it
    came in, taken out of kombu's unacked hash so that it is not delivered again after the
    visibility timeout. True when given back."""
    script = client.register_script(
        "local cur = redis.call('hget', KEYS[1], ARGV[1]) if not cur then return 0 end "
        "local ok, entry = pcall(cjson.decode, cur) if not ok or entry['token'] ~= ARGV[2] then return 0 end "
        "redis.call('hdel', KEYS[1], ARGV[1]) "
        "if redis.call('get', KEYS[3]) == ARGV[2] then redis.call('del', KEYS[3]) end "
        "if redis.call('hincrby', KEYS[5], ARGV[1], -1) <= 0 then redis.call('hdel', KEYS[5], ARGV[1]) end "
        "redis.call('hset', KEYS[2], ARGV[1], ARGV[3]) redis.call('rpush', KEYS[4], ARGV[4]) "
        "if ARGV[5] ~= '' then redis.call('hdel', KEYS[6], ARGV[5]) redis.call('zrem', KEYS[7], ARGV[5]) end "
        "return 1"
    )
    return bool(script(keys=[keys.running, keys.queued, keys.lease(sample_id), queue, keys.deliveries, KOMBU_UNACKED,
                             KOMBU_UNACKED_INDEX],
                       args=[sample_id, token, queued, message, kombu_tag or ""]))

def requeue(
    client: redis.Redis, keys: Keys, sample_id: str, queue: str, message: bytes, queued: str,
    failure: FailureRecord | None, payload: str, keep_deliveries: bool = False, delay_s: float = 0.0,
) -> None:
    """Atomically end a run and publish the sample again at the front of its queue (a retry
    after a retryable error, or a preempted sample): it has waited its turn once already.
    ``keep_deliveries``: a preempted sample's starts keep counting (it did not crash).
    ``delay_s`` > 0: the message waits in the delayed set until then (a back-off); the
    reaper moves it to the front of its queue (``release_delayed``). It counts as queued.
    ``queued``: its queued mark, which keeps its payload; ``payload``: a kept payload of the
    earlier layout (a journal written before marks kept payloads), "" for none."""
    pipe = client.pipeline(transaction=True)
    if failure is not None:
        pipe.hset(keys.failed, sample_id, failure.model_dump_json(by_alias=True))
    pipe.hdel(keys.running, sample_id)
    if not keep_deliveries:
        pipe.hdel(keys.deliveries, sample_id)  # deliveries count crashes within one attempt
    pipe.delete(keys.lease(sample_id))
    pipe.hset(keys.queued, sample_id, queued)
    if payload:
        pipe.hset(keys.payloads, sample_id, payload)
    if delay_s > 0:
        # The message is JSON text (kombu's envelope): it rides inside the member as a string.
        pipe.zadd(keys.delayed, {json.dumps([queue, message.decode()]): time.time() + delay_s})
    else:
        pipe.rpush(queue, message)  # kombu pops from the right: RPUSH is the front of the queue
    pipe.execute()


_RELEASE_DELAYED = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local item = cjson.decode(member)
  redis.call('RPUSH', item[1], item[2])
end
return #due
"""


def release_delayed(client: redis.Redis, keys: Keys, now: float | None = None) -> int:
    """Move every delayed retry that is due to the front of its queue list, atomically (one
    script); returns how many."""
    script = client.register_script(_RELEASE_DELAYED)
    now = time.time() if now is None else now
    moved = 0
    while True:
        n = int(script(keys=[keys.delayed], args=[repr(now)]))
        moved += n
        if n < 1000:
            return moved


def delayed_messages(client: redis.Redis, keys: Keys) -> list[tuple[str, bytes]]:
    """(queue list, message) of every delayed retry."""
    return [(lst, msg.encode()) for lst, msg in (json.loads(m) for m in client.zrange(keys.delayed, 0, -1))]


KOMBU_UNACKED = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, routing key]
KOMBU_UNACKED_INDEX = "unacked_index"  # kombu's Redis transport: delivery tag -> when delivered (zset)


def stale_queued(client: redis.Redis, keys: Keys, queue_prefix: str) -> list[str]:
    """Samples marked queued whose message is nowhere (not in a queue, not delivered).

    Cheap unless the counts disagree: only then are the queues read. Causes: a purged
    queue, a Redis restored from an older file, or Redis killed between a worker's BRPOP
    and its reply (kombu's Redis transport loses that message).
    """
    queues = [q for q in client.scan_iter(match=f"{queue_prefix}*", count=1000)]
    queues += control.parked_lists(client, keys)  # a paused experiment's parked messages are present (fleet.control)
    waiting = sum(client.llen(q) for q in queues) + client.zcard(keys.delayed)  # retries in their back-off too
    # Delivered but not acked yet: ours only (the hash is shared by every app of this db,
    # and holds a killed worker's message for the whole visibility timeout).
    delivered = []
    for v in client.hvals(KOMBU_UNACKED):
        try:
            message, _exchange, routing_key = json.loads(v)
        except (ValueError, TypeError):
            continue
        if isinstance(routing_key, str) and routing_key.startswith(queue_prefix):
            delivered.append(message)
    if client.hlen(keys.queued) <= waiting + len(delivered):
        return []
    live: set[str] = set()
    backing_off = [m for _, m in delayed_messages(client, keys)]
    for raw in [m for q in queues for m in client.lrange(q, 0, -1)] + delivered + backing_off:
        sid = message_sample_id(raw)  # a whole payload's id, or the id a reference names
        if sid is not None:
            live.add(sid)
    return [k.decode() for k in client.hkeys(keys.queued) if k.decode() not in live]


def drop_stale_queued(client: redis.Redis, keys: Keys, queue_prefix: str) -> int:
    """Forget queued marks whose message is gone, so their samples plan as to do; returns how many."""
    stale = stale_queued(client, keys, queue_prefix)
    if stale:
        client.hdel(keys.queued, *stale)
    return len(stale)


def recover_lost(
    client: redis.Redis, keys: Keys, queue_prefix: str, grace_s: float, now: float | None = None,
) -> list[str]:
    """Publish again the samples whose message has been missing for ``grace_s`` (seen
    missing twice, so a message between a worker's BRPOP and its claim is not taken for
    lost). Returns the ids published."""
    now = time.time() if now is None else now
    stale = set(stale_queued(client, keys, queue_prefix))
    first_seen = {k.decode(): float(v) for k, v in client.hgetall(keys.lost_suspects).items()}
    gone = [sid for sid in first_seen if sid not in stale]
    if gone:
        client.hdel(keys.lost_suspects, *gone)
    new = {sid: now for sid in stale if sid not in first_seen}
    if new:
        client.hset(keys.lost_suspects, mapping=new)
    due = [sid for sid in stale if sid in first_seen and now - first_seen[sid] >= grace_s]
    published = []
    heads = Heads(client, keys)
    for sid, mark in zip(due, client.hmget(keys.queued, due) if due else []):
        client.hdel(keys.lost_suspects, sid)
        if mark is None:
            continue  # started or finished meanwhile
        kept = mark.decode("utf-8")
        if is_legacy(kept):  # a mark of the earlier layout: the payload was kept apart
            raw = client.hget(keys.payloads, sid)
            if raw is None:
                continue
            kept = raw.decode("utf-8")
        found = unkeep(kept, sid, heads.get)
        if found is None:
            continue
        queue, payload = found
        lst, step = control.list_for_payload(client, keys, queue, payload)  # its priority's list (fleet.control)
        client.rpush(lst, encode_message(payload, queue, _label_of(payload, sid), priority=step))
        published.append(sid)
    return published


def _label_of(payload_json: str, sample_id: str) -> str:
    try:
        d = json.loads(payload_json)
        return task_label(str(d.get("experiment", "")), str(d.get("label", "")), sample_id, "recovered")
    except (ValueError, AttributeError):
        return task_label("", "", sample_id, "recovered")
