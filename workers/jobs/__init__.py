"""The worker's registry of jobs: a task's kind -> the job module that runs it.

Kinds and their modules come from fleet.kinds (built-in ones plus the settings'
``kinds``); a job module is imported when the worker first meets its kind. A message
can only pick among the kinds the worker was configured with: an unknown kind fails
that sample, it never imports anything named by the message.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

from fleet.contract import TaskPayload
from fleet.errors import PermanentError
from fleet.kinds import KindModules, registry
from workers.jobs.base import JobContext, JobOutcome

Job = Callable[[TaskPayload, JobContext], JobOutcome]


class UnknownKind(PermanentError):
    """The task names a kind this worker has no job for."""


class CommandsNotAllowed(PermanentError):
    """The task would run a shell command and this worker was not started with --allow-commands."""


class JobRegistry:
    def __init__(self, extra: Mapping[str, KindModules] | None = None, allow_commands: bool = False) -> None:
        self._modules = registry(extra)
        self._jobs: dict[str, Job] = {}
        self.allow_commands = allow_commands

    def job(self, kind: str) -> Job:
        """The ``run`` of ``kind``'s job module (imported on first use)."""
        found = self._jobs.get(kind)
        if found is not None:
            return found  # (only ever cached for an allowed kind)
        mods = self._modules.get(kind)
        if mods is None:
            raise UnknownKind(f"this worker has no job for kind {kind!r} (it knows {', '.join(sorted(self._modules))})")
        if mods.runs_commands and not self.allow_commands:
            # Checked before the job module is imported: a locked worker never loads it.
            raise CommandsNotAllowed(f"kind {kind!r} runs shell commands and this worker was not started with "
                                     "--allow-commands (settings allow_commands); it refuses them")
        run = getattr(importlib.import_module(mods.job), "run", None)
        if not callable(run):
            raise UnknownKind(f"job module {mods.job} of kind {kind!r} has no run(task, context)")
        self._jobs[kind] = run
        return run
