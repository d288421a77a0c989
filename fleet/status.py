"""``fleet status``: done / queued / running / failed, per group (category, CSV, grid ...)
and in total, for any kind.

With an experiment, the counts are over its planned samples and the samples it has
published (the experiments index, fleet.experiment_index): a sample whose input was deleted
after enqueue keeps its state (done means record and file). Without one, over every record
in the namespace, and one row per experiment of the index.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby

import redis

from fleet import experiment_index, kept_payloads
from fleet.contract import FailureRecord, Keys, record_group
from fleet.kinds import KindModules
from fleet.kinds.base import Experiment, PlanContext
from fleet.planner import bulk, plan_experiment
from fleet.records import adopt_legacy_records, classify, has_legacy_records, present

STATES = ("done", "queued", "running", "failed")


@dataclass
class Status:
    by_group: dict[str, Counter] = field(default_factory=dict)
    pending: Counter = field(default_factory=Counter)  # planned but in no state yet, by group
    sample_ids: set[str] | None = None  # the planned and counted published samples (experiment status only)

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
            # Planned and in no state: never enqueued (a --dry-run, a new row) or cancelled.
            d["pending"] = sum(self.pending.values()) if cat is None else self.pending.get(cat, 0)
            d["total"] = sum(d.values())
            return d

        cats = sorted(set(self.by_group) | set(self.pending))
        out = row(self.totals(), None)
        out["by_group"] = {c: row(self.by_group.get(c, Counter()), c) for c in cats}
        return out


def experiment_status(
    client: redis.Redis, namespace: str, exp: Experiment, groups: list[str] | None = None,
    kinds: Mapping[str, KindModules] | None = None, verify_outputs: bool = False,
) -> Status:
    """Counts over the experiment's planned samples (plans; decodes nothing) and the ones it
    published that are no longer planned (see ``_count_published``). ``verify_outputs``: stat
    every done output, trusting no verified folder (fleet.output_files)."""
    with bulk():
        return _experiment_status(client, namespace, exp, groups, kinds, verify_outputs)


def _experiment_status(client: redis.Redis, namespace: str, exp: Experiment, groups: list[str] | None,
                       kinds: Mapping[str, KindModules] | None, verify_outputs: bool = False) -> Status:
    keys = Keys(namespace)
    legacy = has_legacy_records(client, keys)
    plan = plan_experiment(exp, groups, PlanContext(client, keys, legacy_ids=legacy), kinds)
    ids = plan.ids  # columns: no Sample is made for status
    state = classify(client, keys, ids, plan.outputs, verify_outputs)
    if legacy and state.todo:  # done before ids included the output root: adopted under today's id
        state.done.update(adopt_legacy_records(client, keys, plan.at(state.todo)))
        state.todo = [i for i in state.todo if ids[i] not in state.done]
    st = Status(sample_ids=set(ids))
    todo_ids = [ids[i] for i in state.todo]
    failed = set()
    for i in range(0, len(todo_ids), 10000):
        chunk = todo_ids[i : i + 10000]
        failed.update(sid for sid, v in zip(chunk, client.hmget(keys.failed, chunk)) if v is not None)
    # Counted with set operations per group (in C): a million samples in a fraction of a second.
    # A group's samples are runs of the plan (usually one), found without a step per sample in Python.
    by_group: dict[str, list[tuple[int, int]]] = {}
    at = 0
    for group, run in groupby(plan.groups):
        m = len(list(run))
        by_group.setdefault(group, []).append((at, at + m))
        at += m
    states = (("done", state.done), ("running", state.running), ("queued", state.queued), ("failed", failed))
    if len(by_group) == 1:  # every state is of planned ids and only done and running share any: no set of them
        (group,) = by_group
        rest_n = len(st.sample_ids)
        for state_name, found in (*states[:1], ("running", state.running - state.done), *states[2:]):
            if found:
                st.add(group, state_name, len(found))
                rest_n -= len(found)
        if rest_n:
            st.pending[group] += rest_n
    for group, spans in by_group.items() if len(by_group) > 1 else ():
        rest = set(ids[spans[0][0] : spans[0][1]]) if len(spans) == 1 else {s for a, b in spans for s in ids[a:b]}
        for state_name, found in states:  # the first state that has it wins
            hit = rest & found
            if hit:
                st.add(group, state_name, len(hit))
                rest -= hit
        if rest:
            st.pending[group] += len(rest)
    _count_published(client, keys, exp.name, st, lambda: set(plan.outputs), groups,
                     verify_outputs, ids)
    return st


def _count_published(client: redis.Redis, keys: Keys, name: str, st: Status,
                     planned_paths: Callable[[], set[str]], groups: list[str] | None,
                     verify_outputs: bool = False, planned_ids: Sequence[str] = ()) -> None:
    """Add to ``st`` the samples experiment ``name`` published that its plan no longer has (a
    deleted reference video, a removed row), each in the state its records give, under the
    group it was published with. Left out: ones whose output path a planned sample now writes
    (the experiment changed a parameter: that sample replaces it), ones of other groups than
    ``groups``, and ones in no state any more (cancelled).

    The samples hash only grows (fleet.experiment_index), so while its length is the one a
    status of the same ``planned_ids`` (in order) found wholly planned, it is not read again
    (``Keys.index_checked``): listing a million ids is about a second here."""
    counted = st.sample_ids if st.sample_ids is not None else set()
    seen = ""
    if planned_ids:
        seen = f"{client.hlen(keys.experiment_samples(name))} {experiment_index.plan_digest(planned_ids)}"  # length before ids
        if client.hget(keys.index_checked, name) == seen.encode():
            return
    published = experiment_index.published(client, keys, name, but=counted)
    if not published and seen:
        client.hset(keys.index_checked, name, seen)
    paths = planned_paths() if published else set()  # only when there are any: a million paths
    extra = [(sid, g, p) for sid, (g, p) in published.items() if p not in paths and (groups is None or g in groups)]
    if not extra:
        return
    ids = [sid for sid, _, _ in extra]
    state = classify(client, keys, ids, [p for _, _, p in extra], verify_outputs)
    todo = [ids[i] for i in state.todo]
    failed = set()
    for i in range(0, len(todo), 10000):
        chunk = todo[i : i + 10000]
        failed.update(sid for sid, v in zip(chunk, client.hmget(keys.failed, chunk)) if v is not None)
    for sid, group, _ in extra:
        for state_name, members in (("done", state.done), ("running", state.running), ("queued", state.queued),
                                    ("failed", failed)):
            if sid in members:
                st.add(group, state_name)
                counted.add(sid)
                break
    st.sample_ids = counted


def experiments_overview(client: redis.Redis, namespace: str) -> list[dict]:
    """One row per experiment of the index, the most recently enqueued first: name, kind,
    file, output_root, total (samples published), done, queued, running, failed (as the
    records say; `fleet status EXPERIMENT` also checks each output file), first_enqueued_at
    and last_enqueued_at (unix s)."""
    keys = Keys(namespace)
    running = set(client.hkeys(keys.running))
    failed = set(client.hkeys(keys.failed))
    rows = []
    for e in experiment_index.entries(client, keys):
        ids = client.hkeys(keys.experiment_samples(e.name))
        c: Counter = Counter()
        for i in range(0, len(ids), 10000):
            chunk = ids[i : i + 10000]
            pipe = client.pipeline(transaction=False)
            pipe.smismember(keys.done, chunk)
            present(pipe, keys.queued, chunk)  # flags: a mark keeps a whole payload
            done, queued = pipe.execute()
            for sid, d, q in zip(chunk, done, queued):
                if d:
                    c["done"] += 1
                elif sid in running:
                    c["running"] += 1
                elif q:
                    c["queued"] += 1
                elif sid in failed:
                    c["failed"] += 1
        rows.append({"name": e.name, "kind": e.kind, "file": e.file, "output_root": e.output_root, "total": len(ids),
                     **{s: c.get(s, 0) for s in STATES},
                     "first_enqueued_at": e.first_enqueued_at, "last_enqueued_at": e.last_enqueued_at})
    return rows


def global_status(client: redis.Redis, namespace: str) -> Status:
    """Counts over every record of the namespace."""
    keys = Keys(namespace)
    st = Status()
    for v in client.hvals(keys.records):
        st.add(record_group(v), "done")
    heads = kept_payloads.Heads(client, keys)
    for v in client.hvals(keys.queued):
        st.add(kept_payloads.group_of(v.decode("utf-8", "replace"), heads), "queued")
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


def overview_table(rows: list[dict]):  # -> rich.table.Table (rich is imported only here)
    """`fleet status`'s table of experiments: name, kind, total, done, queued, running,
    failed, last enqueued (local time)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="experiments", box=box.SIMPLE_HEAD)
    for col in ("experiment", "kind", "total", "done", "queued", "run", "failed", "enqueued"):
        # Numbers and times whole; a long name folds (short headers leave it room on 80 columns).
        t.add_column(col, justify="left" if col in ("experiment", "kind", "enqueued") else "right",
                     no_wrap=col != "experiment", overflow="fold")
    for r in rows:
        when = time.strftime("%m-%d %H:%M", time.localtime(r["last_enqueued_at"]))
        t.add_row(escape(r["name"]), escape(r["kind"]), *(str(r[k]) for k in ("total", *STATES)), when)
    return t
