"""Training planning: one sample per run of the grid.

A run's id hashes the data (each shard's path, size and modification time), the columns,
the run's settings and its output folder: the same experiment plans the same ids, a new
grid value adds runs, changed data trains anew. A run writes to ``<output>/<run name>/``;
its sample's output is ``result.json`` there, written when the run has finished.
"""

from __future__ import annotations

import hashlib
import json
import os

from fleet.kinds.base import Plan, PlanContext, Sample
from fleet.kinds.train.experiment import TrainExperiment


def plan_experiment(exp: TrainExperiment, groups: list[str] | None = None, ctx: PlanContext | None = None) -> Plan:
    group = exp.path.name
    if groups and group not in groups:
        return Plan(exp, [])
    data = {"table": exp.table.name, "shards": exp.table.identity(), "label": exp.label,
            "categorical": exp.categorical, "numeric": exp.numeric}
    shared = {**data, "shards": [s[0] for s in data["shards"]]}
    samples = []
    for run in exp.runs:
        folder = os.path.join(str(exp.output), run.name)
        settings = run.settings.model_dump()
        key = json.dumps([data, settings, folder], sort_keys=True, ensure_ascii=False)
        sid = hashlib.sha256(key.encode()).hexdigest()[:32]
        body = {"run": run.name, "settings": settings}
        samples.append(Sample(sid, group, f"{exp.name}/{run.name}", os.path.join(folder, "result.json"), body,
                              exp.memory_mib, exp.gpus))
    return Plan(exp, samples, shared)
