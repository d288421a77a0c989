"""The planner driver: an experiment of any kind -> its samples -> the payloads to publish.

The kind plans (fleet.kinds); this module only dispatches and serialises. A payload is a
fleet.contract.TaskPayload: the part every sample of the experiment shares is
serialised once (the payload "head"), per sample only its own fields are, which keeps
100,000 payloads well under a second.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from json.encoder import encode_basestring  # == json.dumps(str, ensure_ascii=False)

from fleet.contract import TASK_SCHEMA
from fleet.kinds import KindModules, producer_kind
from fleet.kinds.base import Experiment, Plan, PlanContext, Sample


def plan_experiment(
    exp: Experiment, groups: list[str] | None = None, ctx: PlanContext | None = None,
    kinds: Mapping[str, KindModules] | None = None,
) -> Plan:
    """Every sample of ``exp`` (of ``groups`` when given), planned by its kind."""
    return producer_kind(exp.kind, kinds, where=str(exp.path)).plan(exp, groups, ctx or PlanContext())


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


def payloads(plan: Plan, todo: list[Sample], route: Callable[[Sample], str]) -> Iterator[tuple[Sample, str, str]]:
    """(sample, queue, payload JSON) for each sample to publish, in order."""
    head = payload_head(plan)
    enc = encode_basestring
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    group_json: dict[str, str] = {}
    for smp in todo:
        gj = group_json.get(smp.group)
        if gj is None:
            gj = group_json[smp.group] = enc(smp.group)
        retries = "" if smp.retries is None else f',"retries":{smp.retries}'
        tail = (
            f',"sample_id":"{smp.sample_id}","group":{gj},"label":{enc(smp.label)}'
            f',"output_path":{enc(smp.output_path)},"memory_mib":{smp.memory_mib},"gpus":{smp.gpus}{retries}'
            f',"body":{dumps(smp.body)}}}'
        )
        yield smp, route(smp), head + tail
