"""kombu's channel reuses one Redis client per pool in a fleet worker (workers.transport)."""

from __future__ import annotations

import redis

from workers.transport import GatedChannel, reused_client


class ChannelParts:
    """What reused_client reads of a kombu channel: its pool and how it makes a client."""

    _sync_client = None

    def __init__(self) -> None:
        self.pool = redis.ConnectionPool()
        self.made = 0

    def _create_client(self) -> redis.Redis:
        self.made += 1
        return redis.Redis(connection_pool=self.pool)


def test_one_client_per_pool_and_a_given_client_passes_through() -> None:
    ch = ChannelParts()
    with reused_client(ch) as a, reused_client(ch) as b:
        assert a is b and a.connection_pool is ch.pool
    assert ch.made == 1
    ch.pool = redis.ConnectionPool()  # kombu replaces its pools after a connection error
    with reused_client(ch) as c:
        assert c is not a and c.connection_pool is ch.pool
    assert ch.made == 2
    own = redis.Redis()
    with reused_client(ch, own) as d:
        assert d is own
    assert GatedChannel.conn_or_acquire is reused_client
