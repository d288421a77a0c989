"""``fleet status``: done / queued / running / failed, per group (category, CSV, grid ...)
and in total, for any kind.

With an experiment, the counts are over its planned samples (done means record and
file); without one, over every record in the namespace.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from fleet.contract import FailureRecord, Keys, record_group
from fleet.kinds import KindModules
from fleet.kinds.base import Experiment, PlanContext
from fleet.planner import plan_experiment
from fleet.records import adopt_legacy_records, classify, has_legacy_records

STATES = ("done", "queued", "running", "failed")


@dataclass
class Status:
    by_group: dict[str, Counter] = field(default_factory=dict)
    pending: Counter = field(default_factory=Counter)  # planned but in no state yet, by group
    sample_ids: set[str] | None = None  # the planned samples (experiment status only)

    def add(self, group: str, state: str, n: int = 1) -> None:
        self.by_group.setdefault(group, Counter())[state] += n

    def totals(self) -> Counter:
        t: Counter = Counter()
        for c in self.by_group.values():
            t.update(c)
        return t

    def as_dict(self) -> dict:
        def row(c: Counter, cat: str | None) -> dict:
            d = {s: c.get(s, 0) for s in STATES}
            d["total"] = sum(d.values()) + (sum(self.pending.values()) if cat is None else self.pending.get(cat, 0))
            return d

        cats = sorted(set(self.by_group) | set(self.pending))
        out = row(self.totals(), None)
        out["by_group"] = {c: row(self.by_group.get(c, Counter()), c) for c in cats}
        return out


def experiment_status(
    client: redis.Redis, namespace: str, exp: Experiment, groups: list[str] | None = None,
    kinds: Mapping[str, KindModules] | None = None,
) -> Status:
    """Counts over the experiment's planned samples (plans; decodes nothing)."""
    keys = Keys(namespace)
    legacy = has_legacy_records(client, keys)
    plan = plan_experiment(exp, groups, PlanContext(client, keys, legacy_ids=legacy), kinds)
    ids = [s.sample_id for s in plan.samples]
    state = classify(client, keys, ids, [s.output_path for s in plan.samples])
    if legacy and state.todo:  # done before ids included the output root: adopted under today's id
        state.done.update(adopt_legacy_records(client, keys, [plan.samples[i] for i in state.todo]))
        state.todo = [i for i in state.todo if ids[i] not in state.done]
    st = Status(sample_ids=set(ids))
    todo_ids = [ids[i] for i in state.todo]
    failed = set()
    for i in range(0, len(todo_ids), 10000):
        chunk = todo_ids[i : i + 10000]
        failed.update(sid for sid, v in zip(chunk, client.hmget(keys.failed, chunk)) if v is not None)
    for s in plan.samples:
        sid = s.sample_id
        if sid in state.done:
            st.add(s.group, "done")
        elif sid in state.running:
            st.add(s.group, "running")
        elif sid in state.queued:
            st.add(s.group, "queued")
        elif sid in failed:
            st.add(s.group, "failed")
        else:
            st.pending[s.group] += 1
    return st


def global_status(client: redis.Redis, namespace: str) -> Status:
    """Counts over every record of the namespace."""
    keys = Keys(namespace)
    st = Status()
    for v in client.hvals(keys.records):
        st.add(record_group(v), "done")
    for v in client.hvals(keys.queued):
        st.add(json.loads(v)[1], "queued")
    for v in client.hvals(keys.running):
        task = json.loads(v)["task"]
        st.add(str(task.get("group", task.get("category", "?"))), "running")
    settled = set(client.hkeys(keys.records)) | set(client.hkeys(keys.queued)) | set(client.hkeys(keys.running))
    for k, v in client.hgetall(keys.failed).items():
        if k not in settled:  # a failure that is being retried counts as queued or running
            st.add(record_group(v), "failed")
    return st


def failures(client: redis.Redis, namespace: str, ids: set[str] | None = None) -> list[FailureRecord]:
    """Final failures (not being retried), oldest first; only of ``ids`` when given."""
    keys = Keys(namespace)
    settled = set(client.hkeys(keys.records)) | set(client.hkeys(keys.queued)) | set(client.hkeys(keys.running))
    out = []
    for k, v in client.hgetall(keys.failed).items():
        if k in settled or (ids is not None and k.decode() not in ids):
            continue
        try:
            out.append(FailureRecord.model_validate_json(v))
        except ValueError:
            continue  # a record of an older schema: counted by status, not listed
    return sorted(out, key=lambda f: f.failed_at)
