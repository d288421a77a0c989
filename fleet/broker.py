"""The connection to Redis (broker and records), with unreachable translated to one line."""

from __future__ import annotations

import redis

from fleet.credentials import mask_url
from fleet.errors import BrokerUnavailable
from fleet.settings import FleetSettings


def connect(settings: FleetSettings, timeout_s: float = 5.0) -> redis.Redis:
    """A checked client for the fleet's Redis; BrokerUnavailable when it does not answer."""
    url = settings.effective_broker_url
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=60, health_check_interval=30)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        how = "start one with `fleet up`" if settings.broker_url is None else "check FLEET_BROKER_URL / broker_url"
        raise BrokerUnavailable(f"cannot reach Redis at {mask_url(url)} ({_short(e)}); {how}") from None
    except redis.ResponseError as e:  # wrong password, protected mode ...
        raise BrokerUnavailable(f"Redis at {mask_url(url)} refused the connection: {_short(e)}") from None
    return client


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__
