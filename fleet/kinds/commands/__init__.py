"""Kind ``commands`` (seed 003): any shell command as a fleet sample, with GPU ids, declared
memory, retries and error classes. Producer side: the commands file and YAML experiment
(experiment), planning (planner). Worker side: workers/jobs/commands.py, which only
workers started with ``--allow-commands`` run (fleet.kinds, ``runs_commands``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.kinds.base import Plan, PlanContext, Sample

PLAIN_SUFFIXES = (".txt", ".cmds", ".commands")  # `fleet enqueue commands.txt` takes such a file as it is


class CommandsKind:
    name = "commands"

    def load(self, path: Path, data: dict[str, Any], default_output: Path | None):
        from fleet.kinds.commands.experiment import load_commands_experiment

        return load_commands_experiment(path, data, default_output)

    def load_plain(self, path: Path, default_output: Path | None):
        from fleet.kinds.commands.experiment import load_commands_file

        return load_commands_file(path, default_output)

    def plan(self, exp: Any, groups: list[str] | None, ctx: PlanContext) -> Plan:
        from fleet.kinds.commands.planner import plan_experiment

        return plan_experiment(exp, groups, ctx)

    def check(self, plan: Plan, todo: list[Sample], ctx: PlanContext) -> None:
        return None  # working folders were checked at load; GPU counts by the core (enqueue)


KIND = CommandsKind()
