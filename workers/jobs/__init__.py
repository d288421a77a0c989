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


class JobRegistry:
    def __init__(self, extra: Mapping[str, KindModules] | None = None) -> None:
        self._modules = registry(extra)
        self._jobs: dict[str, Job] = {}

    def job(self, kind: str) -> Job:
        """The ``run`` of ``kind``'s job module (imported on first use)."""
        found = self._jobs.get(kind)
        if found is not None:
            return found
        mods = self._modules.get(kind)
        if mods is None:
            raise UnknownKind(f"this worker has no job for kind {kind!r} (it knows {', '.join(sorted(self._modules))})")
        run = getattr(importlib.import_module(mods.job), "run", None)
        if not callable(run):
            raise UnknownKind(f"job module {mods.job} of kind {kind!r} has no run(task, context)")
        self._jobs[kind] = run
        return run
