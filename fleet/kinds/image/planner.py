"""Image planning: one sample per CSV row, seed = seed_start + row, file ``<image_id>_seed<seed>.png``.

A sample's id is sha256 over everything that decides its image (model files and
pipeline, dtype, size, steps, CFG and its effective truncation, output folder, the row's
id, prompt, negative prompt and seed), so the same experiment on 1 or N GPUs, planned
today or after rows were appended, gives the same ids and files; a changed prompt or
parameter gives a new id (docs/ARCHITECTURE.md, "Sample identity").
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from fleet.errors import InputError
from fleet.kinds.base import Plan, PlanContext, Sample
from fleet.kinds.image.experiment import ImageExperiment
from fleet.kinds.image.prompts_csv import read_prompts_csv
from fleet.kinds.image.spec import SEED_MAX


def _common_fields(exp: ImageExperiment) -> dict[str, Any]:
    s = exp.spec
    return {
        "kind": "image", "model": exp.model.identity(), "dtype": exp.dtype, "width": s.width, "height": s.height,
        "steps": s.steps, "cfg_scale": s.cfg_scale, "cfg_truncation_step": exp.truncation,
        "output": str(exp.output),
    }


def shared_params(exp: ImageExperiment) -> dict[str, Any]:
    """The parameters every sample's payload shares (workers read them as ImageParams)."""
    s = exp.spec
    return {"width": s.width, "height": s.height, "steps": s.steps, "cfg_scale": s.cfg_scale,
            "cfg_truncation_step": exp.truncation, "dtype": exp.dtype, "model": exp.model.model_dump()}


def plan_experiment(exp: ImageExperiment, groups: list[str] | None = None, ctx: PlanContext | None = None) -> Plan:
    """Every sample of the experiment in CSV order; InputError for a bad CSV or too few rows.

    The group of every sample is the CSV's file name; ``groups`` that do not name it select nothing.
    """
    s = exp.spec
    rows = read_prompts_csv(exp.prompts)
    if s.num_samples is not None:
        if s.num_samples > len(rows):
            raise InputError(f"{exp.path}: num_samples: {s.num_samples} is more than the rows of {exp.prompts} "
                             f"({len(rows)})")
        rows = rows[: s.num_samples]
    if rows and s.seed_start + len(rows) - 1 > SEED_MAX:
        raise InputError(f"{exp.path}: seed_start: {s.seed_start} + {len(rows) - 1} rows passes 2**64-1 "
                         "(the largest seed torch accepts)")
    group = exp.prompts.name
    if groups and group not in groups:
        return Plan(exp, [], shared_params(exp))
    common = json.dumps(_common_fields(exp), sort_keys=True, ensure_ascii=False)
    out = str(exp.output)
    samples = []
    for row in rows:
        seed = s.seed_start + row.index
        neg = row.negative_prompt if row.negative_prompt is not None else s.negative_prompt
        key = json.dumps([common, row.image_id, row.prompt, neg, seed], ensure_ascii=False)
        body = {"image_id": row.image_id, "prompt": row.prompt, "negative_prompt": neg, "seed": seed, "row": row.index}
        samples.append(Sample(
            hashlib.sha256(key.encode()).hexdigest()[:32], group, f"{row.image_id} seed {seed}",
            os.path.join(out, f"{row.image_id}_seed{seed}.png"), body, exp.memory_mib, 1,
        ))
    return Plan(exp, samples, shared_params(exp))
