"""``fleet enqueue``: plan, skip what is done or in flight, check inputs, publish in bulk.

Every check that can reject the input (experiment, dataset, prompts, every reference
video that a sample to do will read) runs before the first message is published, so
bad input never leaves a half-enqueued experiment.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis

from fleet.contract import Keys, queue_name
from fleet.errors import PlacementError
from fleet.experiment import LoadedExperiment
from fleet.placement import PlacementPolicy
from fleet.routing import queue_for_sample
from fleet.planner import Plan, Sample, payload_head, payloads, plan_experiment
from fleet.publisher import Outgoing, kept_payload, publish
from fleet.records import RedisContentIds, classify, drop_stale_queued, queued_value
from fleet.video_file import probe

PROBE_OK = "ok"


@dataclass
class EnqueueResult:
    planned: int
    done: int
    in_flight: int
    enqueued: int
    would_enqueue: list[Sample] = field(default_factory=list)  # filled on dry runs

    def as_dict(self) -> dict[str, int]:
        return {"planned": self.planned, "done": self.done, "in_flight": self.in_flight, "enqueued": self.enqueued}


def check_videos(client: redis.Redis, keys: Keys, plan: Plan, todo: list[Sample]) -> None:
    """Probe (decode the first frame of) each reference video a sample to do reads.

    Results are cached by content id, so a re-run or a new prompt probes nothing.
    Raises InputError naming the first video that does not decode.
    """
    needed = {smp.video.path: smp.video_cid for smp in todo}
    if not needed:
        return
    cids = list(dict.fromkeys(needed.values()))
    known = dict(zip(cids, client.hmget(keys.probes, cids)))
    to_probe = [(p, c) for p, c in needed.items() if known.get(c) is None]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda pc: (pc, _try_probe(pc[0])), to_probe))
    for (path, _), err in sorted(results, key=lambda r: str(r[0][0])):
        if err is not None:
            raise err
    if to_probe:
        client.hset(keys.probes, mapping={c: PROBE_OK for _, c in to_probe})


def _try_probe(path: Path) -> Exception | None:
    try:
        probe(path)
        return None
    except Exception as e:  # InputError from probe; re-raised in a stable order above
        return e


def enqueue(
    client: redis.Redis,
    namespace: str,
    exp: LoadedExperiment,
    categories: list[str] | None = None,
    dry_run: bool = False,
    policy: PlacementPolicy | None = None,
    memory_classes_mib: list[int] | None = None,
) -> EnqueueResult:
    """Publish every sample of ``exp`` that is neither done nor queued nor running.

    Each sample goes to the queue of what it needs (pinned GPUs, several GPUs, a memory
    class, or any GPU); an impossible need fails here, before anything is published.
    """
    keys = Keys(namespace)
    plan = plan_experiment(exp, categories, RedisContentIds(client, keys))
    ids = [s.sample_id for s in plan.samples]
    outs = [s.output_path for s in plan.samples]
    drop_stale_queued(client, keys, queue_name(namespace, ""))  # a purged queue must not mean "in flight" forever
    state = classify(client, keys, ids, outs)
    todo = [plan.samples[i] for i in state.todo]
    in_flight = len(state.queued) + len(state.running)
    check_videos(client, keys, plan, todo)
    policy = policy or PlacementPolicy()
    classes = memory_classes_mib or []
    routes = {}
    for cat in {smp.category for smp in todo}:
        try:
            routes[cat] = queue_for_sample(cat, exp.memory_mib, policy, namespace, classes, exp.spec.gpus_per_sample)
        except PlacementError as e:
            raise PlacementError(f"{exp.path}: {e}") from None
    if dry_run:
        return EnqueueResult(len(ids), len(state.done), in_flight, 0, todo)
    marks = {cat: queued_value(exp.name, cat) for cat in routes}  # the queued hash's value, once per category
    head = payload_head(plan)
    head_id = hashlib.sha256(head.encode()).hexdigest()[:16]
    client.hset(keys.payload_heads, head_id, head)
    items = (
        Outgoing(
            queue=q,
            task=plan.task_name,
            payload_json=payload,
            sample_id=smp.sample_id,
            label=f"{smp.category}/{smp.video.name} seed {smp.seed} prompt {smp.prompt_index}",
            queued_value=marks[smp.category],
            kept=kept_payload(q, payload, head, head_id),
        )
        for smp, q, payload in payloads(plan, todo, lambda smp: routes[smp.category])
    )
    n = publish(client, keys, items)
    return EnqueueResult(len(ids), len(state.done), in_flight, n)
