"""``fleet enqueue``: plan, skip what is done or in flight, check inputs, publish in bulk.

Kind-agnostic: the experiment's kind plans and checks its inputs (fleet.kinds); every
check that can reject the input runs before the first message is published, so bad
input never leaves a half-enqueued experiment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from fleet.contract import Keys, queue_name
from fleet.errors import PlacementError
from fleet.kinds import KindModules
from fleet.kinds.base import Experiment, PlanContext, Sample
from fleet.placement import PlacementPolicy
from fleet.planner import check_inputs, payload_head, payloads, plan_experiment
from fleet.publisher import Outgoing, kept_payload, publish
from fleet.records import classify, drop_stale_queued, queued_value
from fleet.routing import queue_for_sample


@dataclass
class EnqueueResult:
    planned: int
    done: int
    in_flight: int
    enqueued: int
    would_enqueue: list[Sample] = field(default_factory=list)  # filled on dry runs

    def as_dict(self) -> dict[str, int]:
        return {"planned": self.planned, "done": self.done, "in_flight": self.in_flight, "enqueued": self.enqueued}


def enqueue(
    client: redis.Redis,
    namespace: str,
    exp: Experiment,
    groups: list[str] | None = None,
    dry_run: bool = False,
    policy: PlacementPolicy | None = None,
    memory_classes_mib: list[int] | None = None,
    kinds: Mapping[str, KindModules] | None = None,
) -> EnqueueResult:
    """Publish every sample of ``exp`` that is neither done nor queued nor running.

    Each sample goes to the queue of what it needs (pinned GPUs, several GPUs, a memory
    class, or any GPU); an impossible need fails here, before anything is published.
    """
    keys = Keys(namespace)
    ctx = PlanContext(client, keys)
    plan = plan_experiment(exp, groups, ctx, kinds)
    ids = [s.sample_id for s in plan.samples]
    outs = [s.output_path for s in plan.samples]
    drop_stale_queued(client, keys, queue_name(namespace, ""))  # a purged queue must not mean "in flight" forever
    state = classify(client, keys, ids, outs)
    todo = [plan.samples[i] for i in state.todo]
    in_flight = len(state.queued) + len(state.running)
    check_inputs(plan, todo, ctx, kinds)
    policy = policy or PlacementPolicy()
    classes = memory_classes_mib or []
    routes: dict[tuple[str, int, int], str] = {}
    for need in {(smp.group, smp.memory_mib, smp.gpus) for smp in todo}:
        try:
            routes[need] = queue_for_sample(need[0], need[1], policy, namespace, classes, need[2])
        except PlacementError as e:
            raise PlacementError(f"{exp.path}: {e}") from None
    if dry_run:
        return EnqueueResult(len(ids), len(state.done), in_flight, 0, todo)
    marks = {g: queued_value(exp.name, g) for g in {smp.group for smp in todo}}  # the queued hash's value, once per group
    head = payload_head(plan)
    head_id = hashlib.sha256(head.encode()).hexdigest()[:16]
    client.hset(keys.payload_heads, head_id, head)
    items = (
        Outgoing(
            queue=q,
            payload_json=payload,
            sample_id=smp.sample_id,
            label=smp.label,
            queued_value=marks[smp.group],
            kept=kept_payload(q, payload, head, head_id),
        )
        for smp, q, payload in payloads(plan, todo, lambda smp: routes[(smp.group, smp.memory_mib, smp.gpus)])
    )
    n = publish(client, keys, items)
    return EnqueueResult(len(ids), len(state.done), in_flight, n)
