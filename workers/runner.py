"""Running one delivered sample: claim it, run the job, record the outcome.

Plain code (no celery): the Celery task hands over the payload and the queue it came
from. Duplicate deliveries are harmless: a sample that is done is skipped, and one whose
lease another live worker holds is skipped, so no sample runs twice at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from fleet import records
from fleet.contract import TASK_VIDEO, CompletionRecord, FailureRecord, Keys, RunningEntry, VideoTask
from fleet.errors import FleetError, GpuOutOfMemory, PermanentError
from fleet.publisher import encode_message, kept_payload
from fleet.settings import FleetSettings

log = logging.getLogger("fleet.worker")


@dataclass
class Current:
    """The sample this worker is running, for the heartbeat thread."""

    sample_id: str
    token: str
    category: str


class SampleRunner:
    """Runs samples for one worker process; holds the resident model cache."""

    def __init__(
        self,
        settings: FleetSettings,
        client: redis.Redis,
        worker: str,
        gpu: str,
        device: str,
        oom_route: Callable[[VideoTask, str], str | None] | None = None,
    ) -> None:
        """``oom_route(task, queue)`` names the queue of the next larger memory class, if any."""
        self.oom_route = oom_route
        self.consecutive_errors = 0  # unexpected errors in a row; a broken worker stops (see _on_error)
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.namespace)
        self.worker = worker
        self.gpu = gpu
        self.device = device
        self.hostname = socket.gethostname()
        self.current: Current | None = None
        self.lock = threading.Lock()
        self._cache = None  # the model cache is created on first use: it imports torch

    def _job(self):
        from workers.video_job import run_video_sample  # torch and diffsynth load here, once
        from workers.wan_model import ModelCache

        if self._cache is None:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
            self._cache = ModelCache()
        return run_video_sample, self._cache

    def run(self, payload: object, queue: str) -> str:
        """Run one delivered payload; returns the outcome (done, failed, retried, skipped-*)."""
        try:
            task = VideoTask.model_validate(payload)
        except ValidationError as e:
            sid = payload.get("sample_id", "?") if isinstance(payload, dict) else "?"
            err = e.errors()[0]
            msg = f"invalid payload: {'.'.join(map(str, err['loc']))}: {err['msg']}"
            self._fail(sid, payload, PermanentError(msg), attempt=1, final=True)
            return "failed"
        sid = task.sample_id
        if records.is_done(self.client, self.keys, sid, task.output_path):
            log.info("sample %s already done (%s); skipping duplicate delivery", sid, task.output_path)
            records.release(self.client, self.keys, sid)
            return "skipped-done"
        token = uuid.uuid4().hex
        entry = RunningEntry(task=task.model_dump(by_alias=True), queue=queue, worker=self.worker, token=token, started_at=time.time())
        deliveries = records.claim(self.client, self.keys, entry, sid, self.settings.lease_ttl_s)
        if deliveries is None:
            log.info("sample %s is running on another worker; skipping duplicate delivery", sid)
            return "skipped-running"
        with self.lock:
            self.current = Current(sid, token, task.category)
        try:
            if deliveries > self.settings.max_deliveries:
                msg = f"started {deliveries - 1} times and its worker died each time; not starting it again"
                self._fail(sid, entry.task, PermanentError(msg), task.attempt, final=True, category=task.category)
                return "failed"
            return self._execute(task, queue, deliveries)
        finally:
            with self.lock:
                self.current = None

    def _execute(self, task: VideoTask, queue: str, deliveries: int) -> str:
        t0 = time.monotonic()
        log.info("start %s: %s/%s seed %d prompt %d (attempt %d)", task.sample_id, task.category, task.video, task.seed, task.prompt_index, task.attempt)
        try:
            run_video_sample, cache = self._job()  # a broken torch install fails here, classified below
            result = run_video_sample(task, cache, self.device)
        except Exception as e:  # classified below; the worker itself must survive any sample
            return self._on_error(task, queue, e)
        record = CompletionRecord(
            sample_id=task.sample_id,
            experiment=task.experiment,
            category=task.category,
            output_path=result.output_path,
            duration_s=round(time.monotonic() - t0, 4),
            worker=self.worker,
            hostname=self.hostname,
            gpu=self.gpu,
            attempt=task.attempt,
            deliveries=deliveries,
            model_loaded=result.model_loaded,
            model_load_s=round(result.model_load_s, 4),
            finished_at=time.time(),
        )
        self.consecutive_errors = 0
        # The output is in place: a Redis restart must not make the worker forget it made it.
        self._persist(lambda: records.complete(self.client, self.keys, record), f"the record of {task.sample_id}")
        log.info(
            "done %s in %.2fs (model %s) -> %s",
            task.sample_id, record.duration_s,
            f"loaded in {record.model_load_s:.2f}s" if record.model_loaded else "resident", record.output_path,
        )
        return "done"

    def on_broken(self, why: str) -> None:
        """Stop taking work: a warm shutdown (the current sample's outcome is recorded first);
        `fleet up`'s supervisor restarts the worker after a back-off."""
        log.error("worker %s looks broken (%s); stopping", self.worker, why)
        os.kill(os.getpid(), signal.SIGTERM)

    def _persist(self, write: Callable[[], None], what: str) -> None:
        """Run a Redis write, retrying through a Redis restart (up to redis_retry_s)."""
        deadline = time.monotonic() + self.redis_retry_s
        delay = 0.2
        while True:
            try:
                write()
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("cannot write %s (%s); retrying in %.1f s", what, e, delay)
                time.sleep(delay)
                delay = min(5.0, delay * 2)

    redis_retry_s = 300.0  # how long a finished sample's record waits for Redis to come back

    def _on_error(self, task: VideoTask, queue: str, e: Exception) -> str:
        # An error fleet did not classify (a CUDA fault, a full disk, a library bug) may be
        # this worker's, not the sample's: the sample gets another attempt, elsewhere if
        # this worker stops. Several in a row mean the worker is broken: it stops taking
        # work rather than failing every sample of the queue.
        unexpected = not isinstance(e, FleetError)
        retryable = unexpected or e.retryable
        if unexpected:
            self.consecutive_errors += 1
            if self.consecutive_errors >= self.settings.max_consecutive_errors:
                self.on_broken(f"{self.consecutive_errors} samples in a row failed with unexpected errors, "
                               f"the last {type(e).__name__}: {e}")
        target: str | None = queue
        if isinstance(e, GpuOutOfMemory):
            # A sample that ran out of memory goes to the next larger memory class; with none
            # it fails now: the same GPU would run out again.
            target = self.oom_route(task, queue) if self.oom_route is not None else None
            if target is None:
                e = GpuOutOfMemory(f"{e}; no larger memory class to move it to")
        if retryable and target is not None and task.attempt < self.settings.max_attempts:
            nxt = task.model_copy(update={"attempt": task.attempt + 1})
            failure = self._failure(task.sample_id, task.model_dump(by_alias=True), e, task.attempt, task.category, True)
            msg = encode_message(
                TASK_VIDEO, nxt.to_json(), target,
                f"{task.category}/{task.video} seed {task.seed} prompt {task.prompt_index} (attempt {nxt.attempt})",
            )
            queued = records.queued_value(task.experiment, task.category)
            self._persist(
                lambda: records.requeue(self.client, self.keys, task.sample_id, target, msg, queued, failure,
                                        kept_payload(target, nxt.to_json())),
                f"the retry of {task.sample_id}",
            )
            log.warning("retry %s (attempt %d -> %d) on %s: %s", task.sample_id, task.attempt, nxt.attempt, target, e)
            return "retried"
        self._fail(task.sample_id, task.model_dump(by_alias=True), e, task.attempt, final=True, category=task.category)
        log.error("failed %s (%s): %s", task.sample_id, type(e).__name__, e)
        return "failed"

    def _failure(
        self, sid: str, payload: object, e: BaseException, attempt: int, category: str, retrying: bool = False
    ) -> FailureRecord:
        """``retrying``: another attempt has been published (the record's ``retryable``)."""
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        experiment = payload.get("experiment", "?") if isinstance(payload, dict) else "?"
        return FailureRecord(
            sample_id=sid,
            experiment=str(experiment),
            category=category,
            error_type=type(e).__name__,
            message=str(e)[:2000],
            traceback_tail="\n".join(tb.strip().splitlines()[-12:]),
            retryable=retrying,
            attempt=attempt,
            worker=self.worker,
            hostname=self.hostname,
            gpu=self.gpu,
            failed_at=time.time(),
        )

    def _fail(self, sid: str, payload: object, e: BaseException, attempt: int, final: bool, category: str | None = None) -> None:
        cat = category or (str(payload.get("category", "?")) if isinstance(payload, dict) else "?")
        failure = self._failure(sid, payload, e, attempt, cat)
        self._persist(lambda: records.fail(self.client, self.keys, failure, final=final), f"the failure of {sid}")
        if isinstance(payload, dict):
            records.release(self.client, self.keys, sid)

