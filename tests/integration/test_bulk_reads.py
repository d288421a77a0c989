"""fleet.bulk_reads against a real Redis: replies in order, error replies, a flushed script."""

from __future__ import annotations

import pytest
import redis
from redis.exceptions import ResponseError

from fleet import bulk_reads
from fleet.records import _PRESENT


def test_chunked_reads_in_order_and_an_error_reply_leaves_the_connection_usable(fleet_ns) -> None:
    client, key = fleet_ns.client, f"{fleet_ns.namespace}:h"
    client.hset(key, mapping={f"f{i}": f"v{i}" for i in range(0, 25, 2)})
    fields = [f"f{i}" for i in range(25)] + ["f é"]
    assert bulk_reads.hmget_chunks(client, key, fields, 4) == [f"v{i}".encode() if i % 2 == 0 else None
                                                               for i in range(25)] + [None]
    assert bulk_reads.script_chunks(client, _PRESENT, key, fields, 7) == [int(i % 2 == 0) for i in range(25)] + [0]
    client.set(f"{fleet_ns.namespace}:s", "x")
    found = bulk_reads.replies(client, [("HMGET", key, "f0"), ("HMGET", f"{fleet_ns.namespace}:s", "f0"), ("HLEN", key)])
    assert found[0] == [b"v0"] and isinstance(found[1], ResponseError) and found[2] == 13
    with pytest.raises(ResponseError):
        bulk_reads.checked(found)
    assert bulk_reads.hmget_chunks(client, key, ["f2"], 4) == [b"v2"]  # the connection read to its end
    assert bulk_reads.replies(client, []) == []


def test_a_script_the_server_lost_is_loaded_again(own_redis) -> None:
    client = redis.Redis.from_url(own_redis())
    client.hset("h", "a", "1")
    assert bulk_reads.script_chunks(client, _PRESENT, "h", ["a", "b"], 10) == [1, 0]
    client.script_flush()
    assert bulk_reads.script_chunks(client, _PRESENT, "h", ["b", "a"], 1) == [0, 1]


@pytest.mark.parametrize("names_from", [5, 10**9])  # the field-names path and the per-field path
def test_many_fields_against_a_small_hash_give_the_same_answers(fleet_ns, monkeypatch, names_from: int) -> None:
    monkeypatch.setattr(bulk_reads, "FIELD_NAMES_FROM", names_from)
    client, key = fleet_ns.client, f"{fleet_ns.namespace}:small"
    client.hset(key, mapping={"b": "2", "é z": "3", "q": "4"})
    fields = ["a", "b", "c", "é z", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o"]
    assert bulk_reads.hmget_many(client, key, fields, 3) == [None, b"2", None, b"3"] + [None] * 12
    assert bulk_reads.fields_present(client, key, fields, _PRESENT, 3) == {"b", "é z"}
