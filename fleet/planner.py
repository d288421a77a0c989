"""The planner driver: an experiment of any kind -> its samples -> the payloads to publish.

The kind plans (fleet.kinds); this module only dispatches and serialises. A payload is a
fleet.contract.TaskPayload: the part every sample of the experiment shares is
serialised once (the payload "head"), per sample only its own fields are (its "tail"), which
keeps 100,000 payloads well under a second; fleet.kept_payloads stores the two apart.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from json.encoder import encode_basestring  # == json.dumps(str, ensure_ascii=False)

from fleet.contract import TASK_SCHEMA
from fleet.errors import InputError
from fleet.kinds import KindModules, producer_kind
from fleet.kinds.base import Experiment, Plan, PlanContext, Sample


def plan_experiment(
    exp: Experiment, groups: list[str] | None = None, ctx: PlanContext | None = None,
    kinds: Mapping[str, KindModules] | None = None,
) -> Plan:
    """Every sample of ``exp`` (of ``groups`` when given), planned by its kind. A group given
    that has no sample is an InputError naming the groups there are (a typo must not plan
    nothing and succeed)."""
    kind = producer_kind(exp.kind, kinds, where=str(exp.path))
    plan = kind.plan(exp, groups, ctx or PlanContext())
    if groups:
        missing = set(groups).difference(plan.groups)
        if missing:
            there = sorted(set(kind.plan(exp, None, ctx or PlanContext()).groups))
            raise InputError(f"{exp.path}: no sample of group {', '.join(map(repr, sorted(missing)))} "
                             f"(its groups: {', '.join(there) or 'none'})")
    return plan


@contextmanager
def bulk() -> Iterator[None]:
    """Cyclic garbage collection off for the block: planning, classifying or publishing a
    million samples makes millions of tracked objects (samples, tuples, lists), and every
    collection of the oldest generation walks them all: 40 % of planning a million samples.
    Nothing there makes reference cycles; the collector runs again after the block."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def check_inputs(plan: Plan, todo: list[Sample], ctx: PlanContext, kinds: Mapping[str, KindModules] | None = None) -> None:
    """The kind's checks of the inputs the samples to publish read; InputError on the first fault."""
    exp = plan.experiment
    producer_kind(exp.kind, kinds, where=str(exp.path)).check(plan, todo, ctx)


def payload_head(plan: Plan) -> str:
    """The start every payload of the plan shares (an unclosed JSON object)."""
    exp = plan.experiment
    const = {
        "schema": TASK_SCHEMA,
        "kind": exp.kind,
        "experiment": exp.name,
        "output_root": str(exp.output),
        "attempt": 1,
        "shared": plan.shared,
    }
    return json.dumps(const, ensure_ascii=False)[:-1]


def tails(plan: Plan, todo: list[Sample], route: Callable[[Sample], str]) -> Iterator[tuple[Sample, str, str]]:
    """(sample, queue, tail) for each sample to publish, in order. The tail is the sample's own
    part of its payload, a JSON fragment closing the head's object that starts with its group
    (fleet.kept_payloads); the payload is ``head + ',"sample_id":"<id>"' + tail``."""
    enc = encode_basestring
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    group_json: dict[str, str] = {}
    for smp in todo:
        gj = group_json.get(smp.group)
        if gj is None:
            gj = group_json[smp.group] = enc(smp.group)
        retries = "" if smp.retries is None else f',"retries":{smp.retries}'
        memory = f',"memory_mib":{smp.memory_mib}' if smp.memory_mib else ""  # 0 is TaskPayload's default
        tail = (
            f',"group":{gj},"label":{enc(smp.label)},"output_path":{enc(smp.output_path)}{memory}'
            f',"gpus":{smp.gpus}{retries},"body":{dumps(body) if (body := smp.body) else "{}"}}}'
        )
        yield smp, route(smp), tail


def payloads(plan: Plan, todo: list[Sample], route: Callable[[Sample], str]) -> Iterator[tuple[Sample, str, str]]:
    """(sample, queue, payload JSON) for each sample to publish, in order."""
    head = payload_head(plan)
    for smp, queue, tail in tails(plan, todo, route):
        yield smp, queue, f'{head},"sample_id":{encode_basestring(smp.sample_id)}{tail}'
