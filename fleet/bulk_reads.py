"""Read commands over a million ids, sent as one pipeline packed in C.

redis-py's pipeline packs every argument of every command in a Python generator (a type
check per argument) before hiredis packs the command: for the two commands of a million
ids each that the done check sends (HMGET of the done sizes, the queued flags' script),
that loop was about 0.3 s of a million-sample ``fleet status`` (docs/BENCHMARKS.md, "A
million samples"). Here each command goes straight to ``hiredis.pack_command`` and the
replies are read off one connection in order, parsed as the client parses them.

For reads only: nothing here retries a command or wraps it in a transaction. A connection
error propagates (redis.ConnectionError) after the connection is dropped, as redis-py's
own pipeline does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import compress
from typing import Any

import hiredis
import redis
from redis.exceptions import NoScriptError, ResponseError

Command = tuple[str | bytes, ...]  # hiredis packs text and bytes, not numbers


def replies(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """Each command's reply, in order; an error reply is returned as its ResponseError (the
    caller decides), so that the connection is read to the end and stays usable."""
    if not commands:
        return []
    pool = client.connection_pool
    try:
        conn = pool.get_connection()
    except TypeError:  # redis-py 5: the command name is a required argument
        conn = pool.get_connection("PIPELINE")  # type: ignore[call-arg]
    out: list[Any] = []
    try:
        conn.send_packed_command([b"".join(map(hiredis.pack_command, commands))])
        for _ in commands:
            try:
                out.append(conn.read_response())
            except ResponseError as e:
                out.append(e)
    except BaseException:
        conn.disconnect()  # a half-read connection must not go back to the pool as it is
        raise
    finally:
        pool.release(conn)
    return out


def checked(found: list[Any]) -> list[Any]:
    """``found`` with its first error reply raised."""
    for r in found:
        if isinstance(r, ResponseError):
            raise r
    return found


def hmget_chunks(client: redis.Redis, key: str, fields: Sequence[str], chunk: int) -> list[Any]:
    """HMGET of ``fields`` (``chunk`` per command): the values in order, None where missing."""
    found = checked(replies(client, [("HMGET", key, *fields[i : i + chunk]) for i in range(0, len(fields), chunk)]))
    return [v for part in found for v in part]


def hmget_many(client: redis.Redis, key: str, fields: Sequence[str], chunk: int) -> list[Any]:
    """``hmget_chunks``; but many fields against a hash of far fewer (the done sizes of an
    experiment that is mostly not done) list the hash's field names first and ask only for
    the ones it has."""
    size = client.hlen(key) if len(fields) >= FIELD_NAMES_FROM else -1
    if size == 0:  # nothing recorded yet (a first status): no read at all
        return [None] * len(fields)
    if 0 < size <= len(fields) // 4:
        names = field_names(client, key)
        hits = list(compress(range(len(fields)), map(names.__contains__, fields)))  # C loops
        out: list[Any] = [None] * len(fields)
        for k, v in zip(hits, hmget_chunks(client, key, [fields[k] for k in hits], chunk)):
            out[k] = v
        return out
    return hmget_chunks(client, key, fields, chunk)


def script_chunks(client: redis.Redis, body: str, key: str, args: Sequence[str], chunk: int) -> list[Any]:
    """Script ``body`` called with KEYS = [key] and ``chunk`` of ``args`` per call; the calls'
    replies (lists) joined in order. Loads the script when the server does not hold it."""
    sha = hashlib.sha1(body.encode("utf-8")).hexdigest()
    calls = [("EVALSHA", sha, "1", key, *args[i : i + chunk]) for i in range(0, len(args), chunk)]
    found = replies(client, calls)
    if any(isinstance(r, NoScriptError) for r in found):  # a restarted or flushed server
        client.script_load(body)
        found = replies(client, calls)
    return [v for part in checked(found) for v in part]


def field_names(client: redis.Redis, key: str) -> set[str]:
    """Every field name of hash ``key`` (HKEYS, decoded as UTF-8 by hiredis in C): one command
    that holds the server for about 0.15 s a million fields."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": True, "encoding": "utf-8", "encoding_errors": "replace"}
    text = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
    try:
        return set(text.hkeys(key))
    finally:
        text.connection_pool.disconnect()


def fields_present(client: redis.Redis, key: str, fields: Sequence[str], script: str, chunk: int) -> set[str]:
    """Which of ``fields`` hash ``key`` has, as a set. Many fields against a hash not much
    larger: its field names, listed once and intersected with ``fields`` in C (about 0.8 s a
    million against 1.3 s for a script call of HEXISTS per field, most of that the server's,
    docs/BENCHMARKS.md "A million samples"); otherwise ``script`` (which answers 0/1 per field
    of ARGV) over ``chunk`` fields a call."""
    if len(fields) >= FIELD_NAMES_FROM and client.hlen(key) <= 2 * len(fields):
        return field_names(client, key).intersection(fields)
    return set(compress(fields, script_chunks(client, script, key, fields, chunk)))


FIELD_NAMES_FROM = 50_000  # fewer fields: the script's cost is small either way
