"""``fleet status``: done / queued / running / failed, per category and in total.

With an experiment, the counts are over its planned samples (done means record and
file); without one, over every record in the namespace.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import redis

from fleet.contract import FailureRecord, Keys
from fleet.experiment import LoadedExperiment
from fleet.planner import plan_experiment
from fleet.records import RedisContentIds, classify

STATES = ("done", "queued", "running", "failed")


@dataclass
class Status:
    by_category: dict[str, Counter] = field(default_factory=dict)
    pending: Counter = field(default_factory=Counter)  # planned but in no state yet, by category
    sample_ids: set[str] | None = None  # the planned samples (experiment status only)

    def add(self, category: str, state: str, n: int = 1) -> None:
        self.by_category.setdefault(category, Counter())[state] += n

    def totals(self) -> Counter:
        t: Counter = Counter()
        for c in self.by_category.values():
            t.update(c)
        return t

    def as_dict(self) -> dict:
        def row(c: Counter, cat: str | None) -> dict:
            d = {s: c.get(s, 0) for s in STATES}
            d["total"] = sum(d.values()) + (sum(self.pending.values()) if cat is None else self.pending.get(cat, 0))
            return d

        cats = sorted(set(self.by_category) | set(self.pending))
        out = row(self.totals(), None)
        out["by_category"] = {c: row(self.by_category.get(c, Counter()), c) for c in cats}
        return out


def experiment_status(client: redis.Redis, namespace: str, exp: LoadedExperiment, categories: list[str] | None = None) -> Status:
    """Counts over the experiment's planned samples (plans; decodes nothing)."""
    keys = Keys(namespace)
    plan = plan_experiment(exp, categories, RedisContentIds(client, keys))
    ids = [s.sample_id for s in plan.samples]
    state = classify(client, keys, ids, [s.output_path for s in plan.samples])
    st = Status(sample_ids=set(ids))
    todo_ids = [ids[i] for i in state.todo]
    failed = set()
    for i in range(0, len(todo_ids), 10000):
        chunk = todo_ids[i : i + 10000]
        failed.update(sid for sid, v in zip(chunk, client.hmget(keys.failed, chunk)) if v is not None)
    for s in plan.samples:
        sid = s.sample_id
        if sid in state.done:
            st.add(s.category, "done")
        elif sid in state.running:
            st.add(s.category, "running")
        elif sid in state.queued:
            st.add(s.category, "queued")
        elif sid in failed:
            st.add(s.category, "failed")
        else:
            st.pending[s.category] += 1
    return st


def global_status(client: redis.Redis, namespace: str) -> Status:
    """Counts over every record of the namespace."""
    keys = Keys(namespace)
    st = Status()
    for v in client.hvals(keys.records):
        st.add(json.loads(v)["category"], "done")
    for v in client.hvals(keys.queued):
        st.add(json.loads(v)[1], "queued")
    for v in client.hvals(keys.running):
        st.add(json.loads(v)["task"].get("category", "?"), "running")
    settled = set(client.hkeys(keys.records)) | set(client.hkeys(keys.queued)) | set(client.hkeys(keys.running))
    for k, v in client.hgetall(keys.failed).items():
        if k not in settled:  # a failure that is being retried counts as queued or running
            st.add(json.loads(v)["category"], "failed")
    return st


def failures(client: redis.Redis, namespace: str, ids: set[str] | None = None) -> list[FailureRecord]:
    """Final failures (not being retried), oldest first; only of ``ids`` when given."""
    keys = Keys(namespace)
    settled = set(client.hkeys(keys.records)) | set(client.hkeys(keys.queued)) | set(client.hkeys(keys.running))
    out = []
    for k, v in client.hgetall(keys.failed).items():
        if k in settled or (ids is not None and k.decode() not in ids):
            continue
        out.append(FailureRecord.model_validate_json(v))
    return sorted(out, key=lambda f: f.failed_at)
