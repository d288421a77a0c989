"""Control of an experiment's work: ``fleet cancel``, ``pause``/``resume``, ``retry``, and the
experiment priority every republish follows.

Producer side (the commands) and worker side (``park``, the reaper's
``unpark``) share this module; it imports nothing of ``workers`` or celery.

Redis keys (``ControlKeys``), all under the namespace:

| key | type | holds |
| --- | --- | --- |
| ``<ns>:paused`` | set | paused experiment names; ``*`` = the whole namespace |
| ``<ns>:parked`` | hash | parked list key -> ``[experiment, list it returns to]`` |
| ``<ns>:parked:<hash>`` | list | one experiment's parked messages of one queue list (right end = front) |
| ``<ns>:cancelled`` | zset | sample id -> when it was cancelled (the reaper prunes old ones) |
| ``<ns>:priorities`` | hash | experiment -> kombu priority step of its samples (fleet.priority) |
| ``<ns>:control:tmp:*`` | list | a list being rebuilt, inside one script call only |

**Cancel.** A cancelled sample loses its queued mark, which keeps its payload (and a kept
payload of the earlier layout, ``<ns>:payloads``), and its lost-message suspicion (one script,
only while it is still queued), gets a tombstone, and its messages are taken out of the
queues and parked lists (one script per list, matching the delivery tags of the messages
decoded here; a message that only refers to its sample's mark is matched by its sample). Nothing publishes it again: lost-message recovery
needs the queued mark and the kept payload, retries and the reaper check the tombstone.
The rule a worker applies to a message it has popped (the gate of fleet/admission.py's
script, in the same round trip as its done check and claim): kept payload gone and a
tombstone = cancelled, skip it without claiming (the tombstone is what tells a cancelled
sample from a message published without a kept payload, e.g. by a test or a plain
``send_task``, which runs as before; a re-enqueue keeps a payload again and drops the
tombstone, ``forget_cancelled``, so a tombstone never blocks it). A running sample of a cancelled
experiment loses its kept payload and gets a tombstone too: its worker's heartbeat sees it
and sets the sample's stop event (``JobContext.stopping``); a job that honours it stops
early, one that does not finishes. Either way it is never published again: an error after
the cancellation ends the run without a retry or a failure record, and a dead worker's
cancelled sample is dropped by the reaper instead of republished. A sample that finishes
is done as usual.

**Pause.** The experiment (or ``*``) joins the paused set, then its queued messages move,
in order, to parked lists, one per (experiment, queue list). A worker that still receives
one (popped just before, or published since) parks it too instead of claiming it. Parked
samples keep their queued marks and kept payloads; lost-message recovery counts parked
messages as present (fleet.records.stale_queued). **Resume** takes the experiment out of
the set and moves its parked messages back to the front of the lists they came from; the
reaper does the same every beat for anything parked whose experiment is not paused (a
worker that parked a message while resume ran).

**Retry** re-plans the experiment and publishes, at the front of their queues with
attempt 1, exactly its samples that failed for good and are not queued, running or done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import redis

from fleet import kept_payloads
from fleet.contract import Keys, TaskPayload, queue_name, task_label
from fleet.priority import NORMAL_STEP, experiment_step, priority_list
from fleet.publisher import encode_message, message_body

if TYPE_CHECKING:
    from fleet.kinds import KindModules
    from fleet.kinds.base import Experiment
    from fleet.placement import PlacementPolicy

log = logging.getLogger("fleet.control")

ALL = "*"  # the paused set's member for the whole namespace
CHUNK = 5000


class ControlKeys:
    """The Redis keys of fleet.control (see the module docstring)."""

    def __init__(self, namespace: str) -> None:
        ns = namespace
        self.namespace = ns
        self.paused = f"{ns}:paused"
        self.parked = f"{ns}:parked"
        self.cancelled = f"{ns}:cancelled"
        self.priorities = f"{ns}:priorities"

    def parked_list(self, experiment: str, target: str) -> str:
        """The list holding ``experiment``'s parked messages that return to ``target``."""
        h = hashlib.sha1(json.dumps([experiment, target], ensure_ascii=False).encode()).hexdigest()[:20]
        return f"{self.namespace}:parked:{h}"


# ---- priority ------------------------------------------------------------------------------------
def record_priority(client: redis.Redis, keys: Keys, exp: Experiment) -> int:
    """Remember the experiment's priority step (retries, the reaper and recovery read it); returns it."""
    step = experiment_step(exp)
    client.hset(ControlKeys(keys.namespace).priorities, exp.name, step)
    return step


def republish_list(client: redis.Redis, keys: Keys, queue: str, experiment: str) -> tuple[str, int]:
    """(list, step) a sample of ``experiment`` is published again to on ``queue``: the
    priority list of its experiment's recorded priority (normal when none is recorded)."""
    raw = client.hget(ControlKeys(keys.namespace).priorities, experiment)
    try:
        step = int(raw) if raw is not None else NORMAL_STEP
    except ValueError:
        step = NORMAL_STEP
    return priority_list(queue, step), step


# ---- messages in the queues ------------------------------------------------------------------------
class Message(NamedTuple):
    sample_id: str
    experiment: str
    group: str
    tag: str  # the envelope's properties.delivery_tag (what the scripts below match on)
    ref: bool = False  # its payload is a reference: experiment and group are its queued mark's (``decode_all``)


def decode(raw: bytes | str) -> Message | None:
    """What a kombu envelope of fleet.sample says of its sample; None for anything else. A
    reference's experiment and group are empty here (``decode_all`` reads them)."""
    try:
        env = json.loads(raw)
        payload = message_body(env)[0][0]  # type: ignore[index]
        tag = str(env["properties"]["delivery_tag"])
        ref = kept_payloads.reference_of(payload)
        if ref is not None:
            return Message(ref, "", "", tag, True)
        return Message(str(payload["sample_id"]), str(payload.get("experiment", "")),
                       str(payload.get("group", "")), tag)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def decode_all(client: redis.Redis, keys: Keys, raws: list[bytes]) -> list[Message | None]:
    """``decode`` of each message, with the experiment and group of each reference read from
    its sample's queued mark (left empty when the mark is gone)."""
    out = [decode(m) for m in raws]
    refs = [i for i, m in enumerate(out) if m is not None and m.ref]
    heads = kept_payloads.Heads(client, keys)
    for start in range(0, len(refs), CHUNK):
        part = refs[start : start + CHUNK]
        for i, raw in zip(part, client.hmget(keys.queued, [out[i].sample_id for i in part])):  # type: ignore[union-attr]
            if raw is not None:
                exp, group = kept_payloads.owner(raw.decode("utf-8"), heads)
                out[i] = out[i]._replace(experiment=exp, group=group)  # type: ignore[union-attr]
    return out


def queue_lists(client: redis.Redis, keys: Keys) -> list[str]:
    """Every queue list of the namespace, priority lists included."""
    prefix = queue_name(keys.namespace, "")
    return sorted(k.decode() for k in client.scan_iter(match=f"{prefix}*", count=1000, _type="list"))


def parked_lists(client: redis.Redis, keys: Keys) -> list[bytes]:
    """Every parked list of the namespace (for lost-message recovery, which must count them)."""
    return list(client.hkeys(ControlKeys(keys.namespace).parked))


# Take the messages with the given delivery tags out of KEYS[1], keeping the others in order;
# each goes to a parked list (destination d > 0, only while its experiment is paused) or is
# dropped (d = 0). The list is read in windows of 1,000 (one LRANGE of 100,000 messages into
# Lua costs several times more) and rebuilt in a temporary list renamed over it. A parked list
# mirrors a queue (right end = front): what is parked before stays ahead of what is taken now.
# Returns the tags taken. KEYS: the list, paused set, parked index, destinations x n, the
# list's temporary, the destinations' temporaries x n. ARGV: n, (experiment, index value) x n,
# then (tag, destination) pairs.
_TAKE = """
local n = tonumber(ARGV[1])
local parking = {}
for d = 1, n do
  parking[d] = redis.call('sismember', KEYS[2], ARGV[2 * d]) == 1 or redis.call('sismember', KEYS[2], '*') == 1
end
local want = {}
for i = 2 + 2 * n, #ARGV, 2 do
  local d = tonumber(ARGV[i + 1])
  if d == 0 or parking[d] then want[ARGV[i]] = d end
end
local src, tmp = KEYS[1], KEYS[4 + n]
redis.call('del', tmp)
for d = 1, n do redis.call('del', KEYS[4 + n + d]) end
local len = redis.call('llen', src)
local taken = {}
for s = 0, len - 1, 1000 do
  local items = redis.call('lrange', src, s, s + 999)
  local keep, moved = {}, {}
  for _, m in ipairs(items) do
    local tag = string.match(string.sub(m, -200), '"delivery_tag":%s*"([^"]+)"')
    local d = nil
    if tag then d = want[tag] end
    if d == nil then
      keep[#keep + 1] = m
    else
      taken[#taken + 1] = tag
      if d > 0 then
        if moved[d] == nil then moved[d] = {} end
        local t = moved[d]
        t[#t + 1] = m
      end
    end
  end
  if #keep > 0 then redis.call('rpush', tmp, unpack(keep)) end
  for d, t in pairs(moved) do redis.call('rpush', KEYS[4 + n + d], unpack(t)) end
end
if #taken == 0 then
  redis.call('del', tmp)
  return taken
end
if redis.call('exists', tmp) == 1 then redis.call('rename', tmp, src) else redis.call('del', src) end
for d = 1, n do
  local td, dest = KEYS[4 + n + d], KEYS[3 + d]
  if redis.call('exists', td) == 1 then
    local old = redis.call('llen', dest)
    for s = 0, old - 1, 1000 do redis.call('rpush', td, unpack(redis.call('lrange', dest, s, s + 999))) end
    redis.call('rename', td, dest)
    redis.call('hset', KEYS[3], dest, ARGV[2 * d + 1])
  end
end
return taken
"""

# Resume (ARGV[1]: "all" empties the paused set, "one" removes ARGV[2] from it, "sweep" changes
# nothing), then move every parked list whose experiment is not paused back to the front of
# the list it came from, in one step (a reaper sweeping meanwhile cannot take what a resume
# reports). Returns experiment, count, experiment, count, ... KEYS: paused set, parked index.
_RESUME = """
if ARGV[1] == 'all' then redis.call('del', KEYS[1]) elseif ARGV[1] == 'one' then redis.call('srem', KEYS[1], ARGV[2]) end
local out = {}
if redis.call('sismember', KEYS[1], '*') == 1 then return out end
local index = redis.call('hgetall', KEYS[2])
for i = 1, #index, 2 do
  local pk = index[i]
  local ok, meta = pcall(cjson.decode, index[i + 1])
  if ok and type(meta) == 'table' and redis.call('sismember', KEYS[1], meta[1]) == 0 then
    local len = redis.call('llen', pk)
    for s = 0, len - 1, 1000 do redis.call('rpush', meta[2], unpack(redis.call('lrange', pk, s, s + 999))) end
    redis.call('del', pk)
    redis.call('hdel', KEYS[2], pk)
    out[#out + 1] = meta[1]
    out[#out + 1] = len
  end
end
return out
"""

# Forget queued samples for good, each only if it is still queued (a worker may have claimed
# it meanwhile): queued mark, kept payload, lost suspicion; a tombstone instead. Returns the
# ids forgotten. KEYS: queued, payloads, lost suspects, cancelled; ARGV: now, ids...
_FORGET = """
local out = {}
for i = 2, #ARGV do
  local sid = ARGV[i]
  if redis.call('hdel', KEYS[1], sid) == 1 then
    redis.call('hdel', KEYS[2], sid)
    redis.call('hdel', KEYS[3], sid)
    redis.call('zadd', KEYS[4], ARGV[1], sid)
    out[#out + 1] = sid
  end
end
return out
"""

_FORGET_EMPTY = "if redis.call('exists', KEYS[2]) == 0 then return redis.call('hdel', KEYS[1], KEYS[2]) end return 0"


def _take(client: redis.Redis, keys: Keys, lists: list[str], select: Callable[[Message], bool],
          park: bool) -> Counter:
    """Take the selected messages out of ``lists``: park them (``park``) or drop them.
    Returns how many were taken, by experiment."""
    ck = ControlKeys(keys.namespace)
    script = client.register_script(_TAKE)
    taken_by: Counter = Counter()
    for lst in lists:
        raw = client.lrange(lst, 0, -1)
        dests: dict[str, int] = {}
        dest_args: list[str] = []
        pairs: list[str | int] = []
        owner: dict[str, str] = {}
        for msg in decode_all(client, keys, raw):
            if msg is None or not select(msg):
                continue
            if msg.tag in owner:
                continue  # the same message twice (a copy): taken together
            owner[msg.tag] = msg.experiment
            num = 0
            if park:
                pk = ck.parked_list(msg.experiment, lst)
                num = dests.get(pk, 0)
                if not num:
                    num = dests[pk] = len(dests) + 1
                    dest_args += [msg.experiment, json.dumps([msg.experiment, lst], ensure_ascii=False)]
            pairs += [msg.tag, num]
        if not pairs:
            continue
        temps = [f"{keys.namespace}:control:tmp:{uuid.uuid4().hex}:{i}" for i in range(len(dests) + 1)]
        taken = script(keys=[lst, ck.paused, ck.parked, *dests, *temps], args=[len(dests), *dest_args, *pairs])
        for tag in taken:
            taken_by[owner[tag.decode() if isinstance(tag, bytes) else tag]] += 1
    return taken_by


# ---- the worker's side -------------------------------------------------------------------------------
def park(client: redis.Redis, keys: Keys, task: TaskPayload, queue: str) -> None:
    """Park a delivered sample of a paused experiment at the back of its parked list."""
    ck = ControlKeys(keys.namespace)
    target, step = republish_list(client, keys, queue, task.experiment)
    pk = ck.parked_list(task.experiment, target)
    pipe = client.pipeline(transaction=True)
    pipe.lpush(pk, encode_message(task.to_json(), queue, task_label(task.experiment, task.label, task.sample_id),
                                  priority=step))
    pipe.hset(ck.parked, pk, json.dumps([task.experiment, target], ensure_ascii=False))
    pipe.execute()


def was_cancelled(client: redis.Redis, keys: Keys, sample_id: str) -> bool:
    """The sample was cancelled (kept payload gone - its queued mark, or one of the earlier
    layout - and a tombstone present): never publish it again."""
    pipe = client.pipeline(transaction=False)
    pipe.hexists(keys.payloads, sample_id)
    pipe.hexists(keys.queued, sample_id)
    pipe.zscore(ControlKeys(keys.namespace).cancelled, sample_id)
    kept, marked, tombstone = pipe.execute()
    return not kept and not marked and tombstone is not None


def forget_cancelled(client: redis.Redis, keys: Keys, sample_ids: list[str]) -> int:
    """Drop the tombstones of samples about to be published again (`fleet enqueue` of a
    cancelled experiment): they run, and run to the end. One ZCARD when there are none."""
    ck = ControlKeys(keys.namespace)
    if not sample_ids or not client.zcard(ck.cancelled):
        return 0
    n = 0
    for i in range(0, len(sample_ids), CHUNK):
        n += int(client.zrem(ck.cancelled, *sample_ids[i : i + CHUNK]))
    return n


def drop_running(client: redis.Redis, keys: Keys, sample_id: str) -> None:
    """End the run of a cancelled sample without a verdict (no record, no retry)."""
    pipe = client.pipeline(transaction=True)
    pipe.hdel(keys.running, sample_id)
    pipe.hdel(keys.deliveries, sample_id)
    pipe.hdel(keys.orphan_suspects, sample_id)
    pipe.delete(keys.lease(sample_id))
    pipe.execute()


def unpark(client: redis.Redis, keys: Keys, action: str = "sweep", experiment: str = "") -> Counter:
    """Move every parked list whose experiment is not paused back to the front of its list
    (after taking ``experiment`` out of the paused set for ``action`` "one", emptying the set
    for "all"); returns the messages moved, by experiment. The reaper sweeps every beat."""
    ck = ControlKeys(keys.namespace)
    if action == "sweep" and not client.hlen(ck.parked):
        return Counter()
    out = client.register_script(_RESUME)(keys=[ck.paused, ck.parked], args=[action, experiment])
    moved: Counter = Counter()
    for i in range(0, len(out), 2):
        name = out[i].decode() if isinstance(out[i], bytes) else str(out[i])
        if int(out[i + 1]):
            moved[name] += int(out[i + 1])
    return moved


def prune_cancelled(client: redis.Redis, keys: Keys, horizon_s: float, now: float | None = None) -> int:
    """Forget tombstones older than ``horizon_s`` (longer than any message of the sample can
    come back: the visibility timeout) of samples not running; returns how many."""
    ck = ControlKeys(keys.namespace)
    now = time.time() if now is None else now
    old = client.zrangebyscore(ck.cancelled, "-inf", now - horizon_s, start=0, num=1000)
    if not old:
        return 0
    running = client.hmget(keys.running, old)
    gone = [sid for sid, r in zip(old, running) if r is None]
    return int(client.zrem(ck.cancelled, *gone)) if gone else 0


def paused(client: redis.Redis, namespace: str) -> set[str]:
    """The paused experiments (``*``: the whole namespace)."""
    return {p.decode() for p in client.smembers(ControlKeys(namespace).paused)}


def is_paused(client: redis.Redis, namespace: str, experiment: str) -> bool:
    return any(client.smismember(ControlKeys(namespace).paused, [experiment, ALL]))


# ---- the commands ------------------------------------------------------------------------------------
def _matcher(experiment: str, groups: list[str] | None) -> Callable[[str, str], bool]:
    wanted = set(groups or ())
    return lambda exp, group: exp == experiment and (not wanted or group in wanted)


def _running_of(client: redis.Redis, keys: Keys, match: Callable[[str, str], bool]) -> list[str]:
    out = []
    for sid, raw in client.hscan_iter(keys.running, count=1000):
        try:
            task = json.loads(raw)["task"]
        except (ValueError, KeyError, TypeError):
            continue
        if match(str(task.get("experiment", "")), str(task.get("group", task.get("category", "")))):
            out.append(sid.decode())
    return out


@contextmanager
def _namespace_lock(client: redis.Redis, keys: Keys, timeout_s: float = 600.0) -> Iterator[None]:
    """The lock `fleet enqueue` holds (when the namespace has one): cancel and retry do not
    interleave with an enqueue of the same namespace."""
    from redis.exceptions import LockError

    from fleet.errors import BrokerUnavailable

    name = getattr(keys, "enqueue_lock", None)
    if name is None:
        yield
        return
    lock = client.lock(name, timeout=120.0, blocking_timeout=timeout_s)
    if not lock.acquire():
        raise BrokerUnavailable(f"`fleet enqueue` of namespace {keys.namespace!r} has held its lock for "
                                f"{timeout_s:.0f} s; try again when it has finished")
    try:
        yield
    finally:
        try:
            lock.release()
        except LockError:
            pass


@dataclass
class CancelResult:
    experiment: str
    groups: list[str]
    cancelled: int  # queued (or parked) samples forgotten for good
    running: int  # running samples told to stop; they are never published again
    messages: int  # messages taken out of queues and parked lists

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "groups": self.groups, "cancelled": self.cancelled,
                "running": self.running, "messages_removed": self.messages}


def cancel(client: redis.Redis, namespace: str, experiment: str, groups: list[str] | None = None,
           now: float | None = None) -> CancelResult:
    """Remove ``experiment``'s queued samples (of ``groups`` when given) for good; mark its
    running ones cancelled (see the module docstring)."""
    keys = Keys(namespace)
    ck = ControlKeys(namespace)
    match = _matcher(experiment, groups)
    now = time.time() if now is None else now
    with _namespace_lock(client, keys):
        ids = []
        heads = kept_payloads.Heads(client, keys)
        for sid, raw in client.hscan_iter(keys.queued, count=1000):
            if match(*kept_payloads.owner(raw.decode("utf-8", "replace"), heads)):
                ids.append(sid.decode())
        forget = client.register_script(_FORGET)
        gone: set[str] = set()  # their messages go too: a reference's mark is gone now, its id says whose
        for i in range(0, len(ids), CHUNK):
            got = forget(keys=[keys.queued, keys.payloads, keys.lost_suspects, ck.cancelled],
                         args=[now, *ids[i : i + CHUNK]])
            gone.update(g.decode() if isinstance(g, bytes) else str(g) for g in got)
        forgotten = len(gone)
        running = _running_of(client, keys, match)
        if running:
            pipe = client.pipeline(transaction=True)
            pipe.hdel(keys.payloads, *running)
            pipe.zadd(ck.cancelled, {sid: now for sid in running})
            pipe.execute()
        lists = queue_lists(client, keys) + [p.decode() for p in parked_lists(client, keys)]
        taken = _take(client, keys, lists, lambda m: m.sample_id in gone or match(m.experiment, m.group), park=False)
        forget_empty = client.register_script(_FORGET_EMPTY)
        for pk in parked_lists(client, keys):
            forget_empty(keys=[ck.parked, pk])  # a parked list the cancel emptied leaves the index
    return CancelResult(experiment, list(groups or []), forgotten, len(running), sum(taken.values()))


@dataclass
class PauseResult:
    experiment: str | None  # None: the whole namespace
    parked: int  # queued messages moved to parked lists now
    running: int  # running samples (they finish)
    paused: list[str] = field(default_factory=list)  # every paused experiment now (``*``: all)

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "parked": self.parked, "running": self.running, "paused": self.paused}


def pause(client: redis.Redis, namespace: str, experiment: str | None = None) -> PauseResult:
    """Workers take none of ``experiment``'s work (None: of the whole namespace) until resumed;
    its running samples finish."""
    keys = Keys(namespace)
    ck = ControlKeys(namespace)
    client.sadd(ck.paused, experiment if experiment is not None else ALL)
    select: Callable[[Message], bool] = (lambda m: True) if experiment is None else (lambda m: m.experiment == experiment)
    taken = _take(client, keys, queue_lists(client, keys), select, park=True)
    running = _running_of(client, keys, lambda e, g: experiment is None or e == experiment)
    return PauseResult(experiment, sum(taken.values()), len(running), sorted(paused(client, namespace)))


@dataclass
class ResumeResult:
    experiment: str | None
    unparked: int  # messages back at the front of their queues (of this experiment, or all)
    paused: list[str] = field(default_factory=list)  # what stays paused

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "unparked": self.unparked, "paused": self.paused}


def resume(client: redis.Redis, namespace: str, experiment: str | None = None) -> ResumeResult:
    """Undo a pause: ``experiment`` (None: everything, experiments paused by name too) runs
    again, its parked samples first."""
    keys = Keys(namespace)
    moved = unpark(client, keys, "all" if experiment is None else "one", experiment or "")
    n = sum(moved.values()) if experiment is None else moved.get(experiment, 0)
    return ResumeResult(experiment, n, sorted(paused(client, namespace)))


@dataclass
class RetryResult:
    experiment: str
    retried: int  # published again
    failed: int  # final failures of the experiment (of the groups) found
    not_planned: int  # failed samples the experiment no longer plans (changed since)

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "retried": self.retried, "failed": self.failed,
                "not_planned": self.not_planned}


def final_failures(client: redis.Redis, keys: Keys, experiment: str, groups: list[str] | None = None) -> set[str]:
    """Ids of the experiment's samples whose last failure was final (no retry was published)."""
    match = _matcher(experiment, groups)
    out = set()
    for sid, raw in client.hscan_iter(keys.failed, count=1000):
        try:
            d = json.loads(raw)
        except ValueError:
            continue
        if not d.get("retryable", False) and match(str(d.get("experiment", "")), str(d.get("group", d.get("category", "")))):
            out.add(sid.decode())
    return out


def retry(
    client: redis.Redis, namespace: str, exp: Experiment, groups: list[str] | None = None,
    policy: PlacementPolicy | None = None, memory_classes_mib: list[int] | None = None,
    kinds: Mapping[str, KindModules] | None = None,
) -> RetryResult:
    """Publish again, at the front of their queues and with attempt 1, exactly the samples
    of ``exp`` that failed for good and are not queued, running or done. Their payloads are
    re-planned (a final failure drops the kept payload); the kind's input checks run first."""
    from fleet.errors import PlacementError
    from fleet.kinds.base import PlanContext
    from fleet.placement import PlacementPolicy
    from fleet.planner import check_inputs, payload_head, plan_experiment, tails
    from fleet.records import classify
    from fleet.routing import queue_for_sample

    keys = Keys(namespace)
    ck = ControlKeys(namespace)
    with _namespace_lock(client, keys):
        failed = final_failures(client, keys, exp.name, groups)
        if not failed:
            return RetryResult(exp.name, 0, 0, 0)
        ctx = PlanContext(client, keys)
        plan = plan_experiment(exp, groups, ctx, kinds)
        cands = plan.at([i for i, sid in enumerate(plan.ids) if sid in failed])
        state = classify(client, keys, [s.sample_id for s in cands], [s.output_path for s in cands])
        todo = [cands[i] for i in state.todo]
        not_planned = len(failed) - len(cands)
        if not todo:
            return RetryResult(exp.name, 0, len(failed), not_planned)
        check_inputs(plan, todo, ctx, kinds)
        policy = policy or PlacementPolicy()
        classes = memory_classes_mib or []
        routes: dict[tuple[str, int, int], str] = {}
        for need in {(s.group, s.memory_mib, s.gpus) for s in todo}:
            try:
                routes[need] = queue_for_sample(need[0], need[1], policy, namespace, classes, need[2])
            except PlacementError as e:
                raise PlacementError(f"{exp.path}: {e}") from None
        step = record_priority(client, keys, exp)
        head = payload_head(plan)
        hid = kept_payloads.head_id(head)
        client.hset(keys.payload_heads, hid, head)
        out = [
            (smp.sample_id, kept_payloads.mark(hid, q, tail), priority_list(q, step),
             encode_message(kept_payloads.reference(smp.sample_id), q,
                            task_label(exp.name, smp.label, smp.sample_id, "retry"), priority=step))
            for smp, q, tail in tails(plan, todo, lambda s: routes[(s.group, s.memory_mib, s.gpus)])
        ]
        _publish_front(client, keys, ck, out)
    return RetryResult(exp.name, len(out), len(failed), not_planned)


def _publish_front(client: redis.Redis, keys: Keys, ck: ControlKeys,
                   items: list[tuple[str, str, str, bytes]]) -> None:
    """Publish (sample id, queued mark, list, message) items at the front of their lists, the
    first item frontmost: RPUSH from the last item to the first, chunk by chunk, each chunk
    with its marks (which keep the payloads) in one transaction."""
    rev = items[::-1]
    for i in range(0, len(rev), CHUNK):
        chunk = rev[i : i + CHUNK]
        pipe = client.pipeline(transaction=True)
        pipe.hset(keys.queued, mapping={sid: mark for sid, mark, _, _ in chunk})
        pipe.hdel(keys.deliveries, *[sid for sid, *_ in chunk])
        pipe.zrem(ck.cancelled, *[sid for sid, *_ in chunk])
        by_list: dict[str, list[bytes]] = {}
        for _sid, _mark, lst, msg in chunk:
            by_list.setdefault(lst, []).append(msg)
        for lst, msgs in by_list.items():
            pipe.rpush(lst, *msgs)
        pipe.execute()


def list_for_payload(client: redis.Redis, keys: Keys, queue: str, payload_json: str) -> tuple[str, int]:
    """``republish_list`` for a payload given as JSON (lost-message recovery)."""
    try:
        experiment = str(json.loads(payload_json).get("experiment", ""))
    except (ValueError, AttributeError):
        experiment = ""
    return republish_list(client, keys, queue, experiment)
