"""Admitting a delivered sample: the done check, the cancel/pause gate and the claim, in one
Redis round trip (docs/ARCHITECTURE.md, "Leases" and "The worker's path per sample").

A worker that pops a sample's message asks, in this order: is it done (a record, and its
output in place with the recorded size)? was it cancelled? is its experiment paused? does
another live worker hold its lease? Only then does it take the lease, count the delivery,
write the running entry and drop the queued mark. Asked as separate commands that was five
round trips; here it is one Lua script (EVALSHA; redis-py loads it again after a Redis
restart), which also makes the whole decision atomic: nothing changes between the checks
and the claim.

Redis cannot stat the output, so the worker stats it first and passes its size. A file that
appears between that stat and the script (a worker finishing the same sample elsewhere:
output first, record after) would make a done sample look not done; so when the record says
done and the local stat found no file, the script claims nothing and answers ``recheck``,
and the worker stats again and asks once more with the missing file taken as final. That
costs a second round trip only for a done sample whose output has gone.

The rules are fleet.records's (done) and fleet.control's (cancelled: kept payload gone - the
queued mark, or a payload of the earlier layout - and a tombstone; paused: the experiment or
``*`` in the paused set); parking a paused sample is fleet.control.park's, outside the script
(rare, and it needs the experiment's priority).

A message whose argument is a reference (``{"ref": "<sample id>"}``, what `fleet enqueue`
publishes: fleet.kept_payloads) is expanded by the same script (``admit_reference``): it reads
the sample's queued mark and its payload head, builds the payload and the running entry around
it, and hands the payload back; so a reference costs no extra round trip. Its output size is
not known before the script: a sample whose record says done answers ``recheck`` with the
payload, and the worker stats the output and asks again. A reference whose mark is gone
answers ``done``, ``cancelled``, ``running`` (another worker claimed it) or ``gone``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import redis
from redis.commands.core import Script

from fleet.contract import Keys
from fleet.control import ALL, ControlKeys

# KEYS: 1 done_bytes, 2 done, 3 payloads, 4 cancelled, 5 paused, 6 lease, 7 deliveries, 8 running, 9 queued,
#       10 payload heads.
# ARGV: 1 sample id, 2 the output's local size in bytes ('' = no file), 3 '1' = the missing file is final,
#       4 experiment, 5 the paused set's "all" member, 6 lease token, 7 lease TTL in ms, 8 running entry JSON
#       (for a reference: its end after the task, ',"queue":...}'), 9 '1' = the message is a reference.
# Returns {state} or {'claimed', deliveries}; for a reference, the payload comes last (claimed,
# recheck, paused); ``invalid`` carries why.
_ADMIT = """
local sid = ARGV[1]
local payload = false
local experiment = ARGV[4]
if ARGV[9] == '1' then
  local mark = redis.call('HGET', KEYS[9], sid)
  if not mark then
    if redis.call('HEXISTS', KEYS[1], sid) == 1 or redis.call('SISMEMBER', KEYS[2], sid) == 1 then return {'done'} end
    if redis.call('ZSCORE', KEYS[4], sid) then return {'cancelled'} end
    if redis.call('EXISTS', KEYS[6]) == 1 then return {'running'} end
    return {'gone'}
  end
  local hid, rest = string.match(mark, '^([^\t]*)\t[^\t]*\t(.*)$')
  if not hid then return {'invalid', 'its queued mark keeps no payload'} end
  if hid == '' then
    payload = rest
  else
    local head = redis.call('HGET', KEYS[10], hid)
    if not head then return {'invalid', 'unknown payload head ' .. hid} end
    payload = head .. ',"sample_id":' .. cjson.encode(sid) .. rest
  end
  if redis.call('SCARD', KEYS[5]) > 0 then  -- something is paused: which experiment is this?
    local ok, d = pcall(cjson.decode, payload)
    if ok and type(d) == 'table' and type(d['experiment']) == 'string' then experiment = d['experiment'] end
  end
end
local function answer(t)
  if payload then t[#t + 1] = payload end
  return t
end
local size = redis.call('HGET', KEYS[1], sid)
if size or redis.call('SISMEMBER', KEYS[2], sid) == 1 then
  if ARGV[2] == '' then
    if ARGV[3] ~= '1' then return answer({'recheck'}) end
  elseif (not size) or tonumber(size) < 0 or tonumber(size) == tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[9], sid)
    return {'done'}
  end
end
if redis.call('HEXISTS', KEYS[3], sid) == 0 and redis.call('HEXISTS', KEYS[9], sid) == 0
   and redis.call('ZSCORE', KEYS[4], sid) then
  return {'cancelled'}
end
if redis.call('SISMEMBER', KEYS[5], experiment) == 1 or redis.call('SISMEMBER', KEYS[5], ARGV[5]) == 1 then
  return answer({'paused'})
end
if not redis.call('SET', KEYS[6], ARGV[6], 'NX', 'PX', ARGV[7]) then
  return {'running'}
end
local n = redis.call('HINCRBY', KEYS[7], sid, 1)
if payload then
  redis.call('HSET', KEYS[8], sid, '{"task":' .. payload .. ARGV[8])
else
  redis.call('HSET', KEYS[8], sid, ARGV[8])
end
redis.call('HDEL', KEYS[9], sid)
return answer({'claimed', n})
"""

State = Literal["claimed", "done", "cancelled", "paused", "running", "gone", "invalid"]

_script: Script | None = None  # the sha is the text's: one Script serves every client


@dataclass(frozen=True)
class Admission:
    """What the script decided. ``claimed``: the lease is ours and ``deliveries`` counts this
    start; ``done``: record and file (its queued mark dropped); ``cancelled``: skip it;
    ``paused``: park it (fleet.control.park); ``running``: another live worker holds the lease.
    For a reference (``admit_reference``): ``payload``, the expanded payload's JSON (claimed or
    paused); ``gone``: no kept payload and no other state (a duplicate of a message already
    taken: nothing to run); ``invalid``: the mark cannot be expanded, ``why`` says why."""

    state: State
    deliveries: int = 0
    payload: str | None = None
    why: str = ""


def output_size(path: str) -> str:
    """The output's size in bytes as the script takes it; '' when there is none."""
    try:
        return str(os.stat(path).st_size)
    except OSError:
        return ""


def admit(client: redis.Redis, keys: Keys, sample_id: str, experiment: str, output_path: str, token: str,
          ttl_s: float, running_entry: str) -> Admission:
    """Decide, and claim when nothing stands in the way, in one round trip (two for a done
    sample whose output has gone). ``running_entry``: the RunningEntry JSON to write;
    ``ttl_s``: the lease's time to live in seconds."""
    global _script
    if _script is None:
        _script = client.register_script(_ADMIT)
    ks = _keys(keys, sample_id)
    final = "0"
    while True:
        reply = _script(keys=ks, args=[sample_id, output_size(output_path), final, experiment, ALL, token,
                                       int(ttl_s * 1000), running_entry, "0"], client=client)
        state = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if state != "recheck":
            return Admission(state, int(reply[1]) if state == "claimed" else 0)  # type: ignore[arg-type]
        final = "1"  # stat again: a file that appeared meanwhile is seen, one still missing is gone


def _keys(keys: Keys, sample_id: str) -> list[str]:
    ck = ControlKeys(keys.namespace)
    return [keys.done_bytes, keys.done, keys.payloads, ck.cancelled, ck.paused, keys.lease(sample_id),
            keys.deliveries, keys.running, keys.queued, keys.payload_heads]


def admit_reference(client: redis.Redis, keys: Keys, sample_id: str, token: str, ttl_s: float,
                    entry_end: str) -> Admission:
    """``admit`` for a message that refers to the sample's queued mark: the script expands the
    mark and writes the running entry ``{"task": <payload>`` + ``entry_end``. One round trip;
    two for a sample whose record says done (its output is stat'ed between them)."""
    global _script
    if _script is None:
        _script = client.register_script(_ADMIT)
    ks = _keys(keys, sample_id)
    size, final = "", "0"
    while True:
        reply = _script(keys=ks, args=[sample_id, size, final, "", ALL, token, int(ttl_s * 1000), entry_end, "1"],
                        client=client)
        parts = [p.decode("utf-8") if isinstance(p, bytes) else p for p in reply]
        state = str(parts[0])
        if state == "invalid":
            return Admission("invalid", why=str(parts[1]))
        payload = str(parts[-1]) if state in ("claimed", "paused", "recheck") else None
        if state != "recheck":
            return Admission(state, int(parts[1]) if state == "claimed" else 0, payload)  # type: ignore[arg-type]
        try:
            size = output_size(str(json.loads(payload)["output_path"]))  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError):
            size = ""  # a payload the worker will refuse anyway: taken as not done
        final = "1"
