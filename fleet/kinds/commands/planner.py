"""Commands planning: one sample per command.

A command's id hashes its text, working folder, environment, GPU count, name and the
output folder (docs/ARCHITECTURE.md, "Sample identity"), so a re-run skips the commands
that succeeded and an edited command runs anew. Its output is a small result file,
``<output>/commands/<slug>-<id>.json`` (exit code, duration, log, last lines), written
atomically when the command succeeds: done = the record and that file. Its logs are
``<output>/logs/<slug>-<id>.<n>.log``, numbered, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from fleet.errors import InputError
from fleet.kinds.base import Plan, PlanContext, Sample
from fleet.kinds.commands.experiment import CommandsExperiment

SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a command or name."""
    return SLUG.sub("_", text).strip("._-")[:limit] or "command"


def plan_experiment(exp: CommandsExperiment, groups: list[str] | None = None, ctx: PlanContext | None = None) -> Plan:
    """Every command in file order; InputError for a command that repeats another exactly."""
    group = exp.path.name
    if groups and group not in groups:
        return Plan(exp, [])
    out = str(exp.output)
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for c in exp.commands:
        key = json.dumps([c.cmd, c.cwd, sorted(c.env.items()), c.gpus, c.name, out], ensure_ascii=False)
        sid = hashlib.sha256(key.encode()).hexdigest()[:32]
        if sid in seen:
            raise InputError(f"{exp.path}: {c.where}: the same command as {seen[sid]} (same folder and "
                             "environment); give one a name (YAML) to run it twice")
        seen[sid] = c.where
        stem = f"{slug(c.name or c.cmd)}-{sid[:12]}"
        body = {"cmd": c.cmd, "cwd": c.cwd, "env": c.env, "timeout_s": c.timeout_s, "where": c.where,
                "name": c.name, "enqueued_by": exp.enqueued_by}
        label = f"{c.where}: {c.name or c.cmd}"
        samples.append(Sample(sid, group, label[:120], os.path.join(out, "commands", f"{stem}.json"), body,
                              c.mem_mib, c.gpus, retries=c.retries))
    return Plan(exp, samples)
