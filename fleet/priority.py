"""Experiment priority: which of a queue's kombu priority lists a sample waits in.

kombu's Redis transport keeps one list per priority step of a queue: ``<queue>`` for step
0 and ``<queue>\\x06\\x16<step>`` for steps 3, 6 and 9 (kombu/transport/redis.py,
``_q_for_pri``, ``PRIORITY_STEPS``). A worker's BRPOP names every step of every queue it
consumes, step 0 of all its queues first, then step 3, ... (``_brpop_start``), so a
lower step is served strictly first, across the worker's queues; within one list the
order stays FIFO (LPUSH publishes at the back, RPUSH puts a sample at the front). A
message's envelope carries its step in ``properties.priority``, which is where kombu
itself puts a message back (a restore after a worker is lost).

An experiment names its priority (``priority: low | normal | high | urgent``, default
normal). Steps: urgent 0, high 3, normal 6, low 9. Messages published before fleet had
priorities sit in the bare ``<queue>`` list (step 0) and so run before anything
published since, as a first-come backlog would; a plain ``app.send_task`` lands there
too.

This module is pure (no Redis but ``queue_length``); the experiment -> step record that
retries, the reaper and lost-message recovery read lives in fleet.control.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from fleet.errors import InputError

PRIORITIES: dict[str, int] = {"urgent": 0, "high": 3, "normal": 6, "low": 9}
DEFAULT = "normal"
NORMAL_STEP = PRIORITIES[DEFAULT]
STEPS: tuple[int, ...] = (0, 3, 6, 9)  # kombu.transport.redis.PRIORITY_STEPS
SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep


def step_of(name: str | None) -> int:
    """The kombu step of a priority name (None: the default); ValueError for an unknown name."""
    if name is None:
        return NORMAL_STEP
    try:
        return PRIORITIES[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {name!r}") from None


def name_of(step: int) -> str:
    """The priority name of a step (the nearest step at or above it, as kombu rounds)."""
    for name, s in sorted(PRIORITIES.items(), key=lambda kv: kv[1], reverse=True):
        if step >= s:
            return name
    return "urgent"


def experiment_step(exp: object) -> int:
    """The step of an experiment of any kind: its optional ``priority`` attribute, normal without
    one; InputError naming the file for an unknown name (a kind that does not validate it)."""
    try:
        return step_of(getattr(exp, "priority", None) or DEFAULT)
    except ValueError as e:
        raise InputError(f"{getattr(exp, 'path', 'experiment')}: {e}") from None


def priority_list(queue: str, step: int) -> str:
    """The Redis list holding ``queue``'s messages of ``step`` (kombu's ``_q_for_pri``)."""
    return queue if step == 0 else f"{queue}{SEP}{step}"


def queue_lists(queue: str) -> list[str]:
    """Every list of ``queue``, in the order a worker serves them."""
    return [priority_list(queue, s) for s in STEPS]


def base_queue(list_name: str) -> str:
    """The queue a priority list belongs to (what kombu reports as the routing key)."""
    return list_name.split(SEP, 1)[0]


def queue_length(client: redis.Redis, queue: str | Iterable[str]) -> int:
    """Messages waiting in a queue (or several), over all its priority lists."""
    names = [queue] if isinstance(queue, str) else list(queue)
    pipe = client.pipeline(transaction=False)
    for q in names:
        for lst in queue_lists(q):
            pipe.llen(lst)
    return int(sum(pipe.execute())) if names else 0
