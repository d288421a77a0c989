"""Running one delivered sample of any kind: claim it, run its job, record the outcome.

Plain code (no celery): the Celery task hands over the payload and the queue it came
from. The kind picks the job through the worker's JobRegistry; this module knows no
kind. Duplicate deliveries are harmless: a sample that is done is skipped, and one
whose lease another live worker holds is skipped, so no sample runs twice at once.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from pydantic import ValidationError

from fleet import admission, records
from fleet.contract import CompletionRecord, FailureRecord, Keys, MetricValue, RunningEntry, TaskPayload, task_label
from fleet.error_policy import Action, decide
from fleet.errors import PermanentError, Preempted, WaitForResources
from fleet.kept_payloads import kept_payload, reference, reference_of
from fleet.publisher import encode_message
from fleet.settings import FleetSettings
from workers import control_hooks, manifest
from workers.confinement import ForbiddenOutput, confine
from workers.finisher import Finisher
from workers.gpu_series_feed import SeriesFeed
from workers.gpu_telemetry import GpuTelemetry
from workers.jobs import JobRegistry
from workers.jobs.base import JobContext, JobOutcome
from workers.journal import Journal
from workers.log_tags import tagged
from workers.model_cache import ModelCache
from workers.peak_memory import PeakMemory

log = logging.getLogger("fleet.worker")

WORK_DIR_NAME = ".fleet-work"  # <output root>/.fleet-work/<sample id>: a sample's stable work folder


@dataclass
class Current:
    """The sample this worker is running, for the heartbeat thread."""

    sample_id: str
    token: str
    group: str
    label: str
    progress: float | None = None
    metrics: dict[str, MetricValue] = field(default_factory=dict)


class SampleRunner:
    """Runs samples for one worker process; holds the resident model cache."""

    def __init__(
        self,
        settings: FleetSettings,
        client: redis.Redis,
        worker: str,
        gpus: tuple[int, ...],
        device: str,
        jobs: JobRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.namespace)
        self.worker = worker
        self.gpus = gpus
        self.device = device
        self.jobs = jobs or JobRegistry(settings.kinds, allow_commands=settings.allow_commands)
        self.models = ModelCache()
        self.hostname = socket.gethostname()
        self.current: Current | None = None
        # The sample whose GPU part is done and whose CPU tail (its file, then its record) the
        # finisher runs while `current` computes; its lease is renewed until its record is
        # written (docs/ARCHITECTURE.md, "Overlapped finish").
        self.finishing: Current | None = None
        self.finisher = Finisher()
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # set when the worker is asked to stop (JobContext.stopping)
        # Distinct samples that failed in a row with errors fleet did not classify: several
        # mean the worker, not the samples, is broken (see _on_error).
        self.suspect_streak: list[str] = []
        self.broken = False  # set when it stopped itself as broken (workers.main exits non-zero)
        self.done_count = 0  # samples this process made (its heartbeat entry shows them)
        self.failed_count = 0  # samples this process failed for good
        self.last_record_s: float | None = None  # seconds its last record took to write (manifest and Redis)
        self.allowed_roots = settings.allowed_output_roots()
        self.journal = Journal(settings.state_dir / "journal" / f"{worker}.jsonl")
        self.host_gpus = _host_gpus()  # for enqueue's "more GPUs than any host has" check
        # NVML once a second for the worker's life; each sample's window goes in its record, and
        # each bucket of readings to the GPUs' time series (docs/ARCHITECTURE.md, GPU time series).
        self.series = (SeriesFeed(client, self.keys, self.hostname, settings.gpu_series_bucket_s,
                                  settings.gpu_series_window_s) if gpus else None)
        self.telemetry = GpuTelemetry(gpus, interval_s=min(1.0, settings.gpu_series_bucket_s),
                                      on_reading=self.series.add if self.series is not None else None).start()
        # `slots: auto`: the memory a sample takes at its peak, which the heartbeat advertises.
        self.peak = (PeakMemory(gpus[0], settings.placement.auto_samples)
                     if settings.placement.slots == "auto" and len(gpus) == 1 else None)


    def run(self, payload: object, queue: str) -> str:
        """Run one delivered payload; returns the outcome (done, failed, retried, skipped-*)."""
        ref = reference_of(payload)
        if ref is not None:  # the payload is kept in the sample's queued mark (fleet.kept_payloads)
            return self._run_reference(ref, queue)
        try:
            task = TaskPayload.model_validate(payload)
        except ValidationError as e:
            sid = str(payload.get("sample_id", "?")) if isinstance(payload, dict) else "?"
            self._fail_raw(sid, payload, PermanentError(_invalid(e)))
            return "failed"
        sid = task.sample_id
        try:
            confine(task.output_root, task.output_path, self.allowed_roots)
        except ForbiddenOutput as e:
            log.error("refused %s: %s", sid, e)
            self._fail(task, e, final=True)
            return "failed"
        token = uuid.uuid4().hex
        entry = RunningEntry(task=task.model_dump(by_alias=True), queue=queue, worker=self.worker, token=token,
                             started_at=time.time())
        # Done check, cancel/pause gate and claim: one script, one round trip (fleet/admission.py).
        admitted = admission.admit(self.client, self.keys, sid, task.experiment, task.output_path, token,
                                   self.settings.lease_ttl_s, entry.model_dump_json())
        return self._run_admitted(task, queue, token, admitted)

    def _run_reference(self, sid: str, queue: str) -> str:
        """Run a message that refers to its sample's queued mark: the admission script expands
        the mark and claims the sample in one round trip; then the payload is checked as any."""
        token = uuid.uuid4().hex
        end = RunningEntry(task={}, queue=queue, worker=self.worker, token=token, started_at=time.time())
        admitted = admission.admit_reference(self.client, self.keys, sid, token, self.settings.lease_ttl_s,
                                             end.model_dump_json()[len('{"task":{}'):])
        if admitted.state in ("done", "running", "cancelled", "gone"):
            log.info("sample %s %s; skipping it", sid, _SKIPPED[admitted.state])
            return f"skipped-{admitted.state}"
        try:  # a claimed sample that fails here leaves no running entry (records.fail)
            task = TaskPayload.model_validate_json(admitted.payload or "")
        except ValidationError as e:
            self._fail_raw(sid, _loose(admitted.payload), PermanentError(admitted.why or _invalid(e)))
            return "failed"
        try:
            confine(task.output_root, task.output_path, self.allowed_roots)
        except ForbiddenOutput as e:
            log.error("refused %s: %s", sid, e)
            self._fail(task, e, final=True)
            return "failed"
        return self._run_admitted(task, queue, token, admitted)

    def _run_admitted(self, task: TaskPayload, queue: str, token: str, admitted: admission.Admission) -> str:
        """Act on the admission script's decision; a claimed sample runs."""
        sid = task.sample_id
        if admitted.state == "done":
            log.info("sample %s already done (%s); skipping duplicate delivery", sid, task.output_path)
            return "skipped-done"
        if admitted.state in ("cancelled", "paused"):
            return control_hooks.gated(self, task, queue, admitted.state)  # skip, or park (fleet.control)
        if admitted.state == "running":
            log.info("sample %s is running on another worker; skipping duplicate delivery", sid)
            return "skipped-running"
        deliveries = admitted.deliveries
        with self.lock:
            self.current = Current(sid, token, task.group, task.label)
        try:
            if deliveries > self.settings.max_deliveries:
                msg = (f"started {deliveries - 1} times without an end: its worker died, or it waited for "
                       "GPUs no worker that took it had; not starting it again")
                self._fail(task, PermanentError(msg), final=True)
                return "failed"
            if self.broken:
                # It stopped itself as broken, and Celery handed it one more message before its
                # loop saw the stop: the sample goes back to the front of its queue, not run here.
                return self._on_error(task, queue, Preempted(f"worker {self.worker} looks broken; not running it"))
            return self._execute(task, queue, deliveries)
        finally:
            with self.lock:
                self.current = None

    def _context(self, task: TaskPayload) -> JobContext:
        def on_report(progress: float | None, metrics: dict[str, MetricValue]) -> None:
            with self.lock:
                if self.current is not None and self.current.sample_id == task.sample_id:
                    if progress is not None:
                        self.current.progress = max(0.0, min(1.0, float(progress)))
                    self.current.metrics.update(metrics)

        return JobContext(
            gpus=self.gpus, device=self.device, models=self.models,
            work_dir=Path(task.output_root) / WORK_DIR_NAME / task.sample_id,
            stopping=control_hooks.sample_stop(self, task.sample_id), attempt=task.attempt, on_report=on_report,
            threads=self.settings.torch_threads or 1, stop_grace_s=self.settings.command_grace_s,
            defer_finish=self.settings.finish_in_background, text_cache_entries=self.settings.text_cache_entries,
        )

    def _execute(self, task: TaskPayload, queue: str, deliveries: int) -> str:
        t0 = time.monotonic()
        log.info("start %s: %s %s (attempt %d)", task.sample_id, task.kind, task.label, task.attempt)
        if self.gpus:
            self.telemetry.window()  # this sample's window starts now
        try:
            job = self.jobs.job(task.kind)
            outcome = job(task, self._context(task))
        except Exception as e:  # classified below; the worker itself must survive any sample
            self._note_telemetry()
            return self._on_error(task, queue, e)
        self._note_telemetry()
        if self.peak is not None:
            self.peak.after_sample()
        if outcome.finish is None:
            return self._complete(task, queue, deliveries, t0, outcome)
        if not self.settings.finish_in_background:
            return self._finish(task, queue, deliveries, t0, outcome)
        # The previous sample's file and record first: at most one pending finish.
        t_wait = time.monotonic()
        self.finisher.wait()
        with self.lock:
            cur = self.current
            if cur is not None:
                cur.metrics["stage_wait_s"] = round(time.monotonic() - t_wait, 4)
                # What of its duration held the GPU (GPU-hours and energy in reports); the tail holds none.
                cur.metrics["gpu_held_s"] = round(time.monotonic() - t0, 4)
            # Moved in one step under the lock: the heartbeat renews the lease all along.
            self.finishing, self.current = cur, None
        self.finisher.start(task.sample_id, lambda: self._finish(task, queue, deliveries, t0, outcome))
        # The Celery task returns now and its message is acked: prefetch 1 then hands this worker
        # its next sample. Until the record below is written, the running entry and the lease
        # (renewed as `finishing`) keep this sample: a worker killed now leaves an orphan the
        # reaper publishes again, as one killed mid-sample does.
        return "finishing"

    def _finish(self, task: TaskPayload, queue: str, deliveries: int, t0: float, outcome: JobOutcome) -> str:
        """Run the job's deferred CPU tail (``outcome.finish``), then record the sample: done
        once its file is in place, or this sample's own failure if the tail raises."""
        try:
            with tagged(task.sample_id):  # in the finisher thread too: `fleet logs SAMPLE_ID` finds its lines
                with self.lock:  # the GPU part's figures go into a failure record too
                    slot = self._slot(task.sample_id)
                    if slot is not None:
                        slot.metrics.update(outcome.metrics)
                try:
                    extra = outcome.finish() if outcome.finish is not None else {}
                except Exception as e:
                    return self._on_error(task, queue, e)
                with self.lock:
                    if slot is not None:
                        slot.metrics.update(extra)
                return self._complete(task, queue, deliveries, t0, outcome)
        finally:
            with self.lock:
                if self.finishing is not None and self.finishing.sample_id == task.sample_id:
                    self.finishing = None

    def _slot(self, sample_id: str) -> Current | None:
        """The running or finishing sample ``sample_id`` (call with ``self.lock`` held)."""
        for cur in (self.current, self.finishing):
            if cur is not None and cur.sample_id == sample_id:
                return cur
        return None

    def _complete(self, task: TaskPayload, queue: str, deliveries: int, t0: float, outcome: JobOutcome) -> str:
        """Write the record of a sample whose output is in place (a missing one fails it)."""
        with self.lock:
            slot = self._slot(task.sample_id)
            reported = dict(slot.metrics) if slot is not None else {}
        try:
            st = os.stat(outcome.output_path)
        except OSError as e:
            return self._on_error(task, queue, RuntimeError(f"the job reported {outcome.output_path} but it is not "
                                                            f"there: {e.strerror or e}"))
        if self.last_record_s is not None:
            # A record cannot time its own writing: it carries this worker's previous one's.
            reported["stage_record_prev_s"] = round(self.last_record_s, 4)
        record = CompletionRecord(
            sample_id=task.sample_id,
            experiment=task.experiment,
            kind=task.kind,
            group=task.group,
            label=task.label,
            output_path=outcome.output_path,
            output_bytes=-1 if os.path.isdir(outcome.output_path) else st.st_size,
            duration_s=round(time.monotonic() - t0, 4),
            worker=self.worker,
            hostname=self.hostname,
            gpus=list(self.gpus),
            attempt=task.attempt,
            deliveries=deliveries,
            model_loaded=outcome.model_loaded,
            model_load_s=round(outcome.model_load_s, 4),
            metrics={**reported, **outcome.metrics},
            finished_at=time.time(),
        )
        t_record = time.monotonic()
        with self.lock:
            self.suspect_streak.clear()
            self.done_count += 1
        # The manifest line goes first: a worker killed between the two writes leaves a line
        # whose sample runs again (readers keep the last line per id), never a done sample
        # without a line.
        record_json = record.model_dump_json(by_alias=True)  # once, for the manifest, Redis and the journal
        manifest.append(task.output_root, record_json, task.body)  # the record, outliving Redis
        # The output is in place: a Redis outage must not make the worker forget it made it.
        token = slot.token if slot is not None else None

        def write() -> None:
            if not records.complete(self.client, self.keys, record, record_json, token):
                log.warning("sample %s is done, but another run has taken it meanwhile (this run's lease had "
                            "lapsed): its running state is left to that run", task.sample_id)

        self._persist(write, f"the record of {task.sample_id}", "complete", record=record_json, token=token)
        self.last_record_s = time.monotonic() - t_record
        log.info(
            "done %s in %.2fs (model %s) -> %s",
            task.sample_id, record.duration_s,
            f"loaded in {record.model_load_s:.2f}s" if record.model_loaded else "resident", record.output_path,
        )
        return "done"

    def close(self, timeout_s: float | None = None) -> bool:
        """Wait for the pending finish (its file and record), if any: a stopping worker calls
        this before its heartbeat stops renewing that sample's lease. False on timeout."""
        if self.finisher.pending:
            log.info("waiting for the sample being finished before stopping")
        return self.finisher.wait(timeout_s)

    def _note_telemetry(self) -> None:
        """The GPU figures of the sample that just ran, into what its record keeps (GPU workers only)."""
        if not self.gpus:
            return
        figures = {k: v for k, v in self.telemetry.window().items() if v is not None}
        with self.lock:
            if self.current is not None:
                for k, v in figures.items():
                    self.current.metrics.setdefault(k, v)  # a job's own figure of the same name wins

    def on_broken(self, why: str) -> None:
        """Stop taking work: a warm shutdown (the current sample's outcome is recorded first);
        `fleet up`'s supervisor restarts the worker after a back-off."""
        log.error("worker %s looks broken (%s); stopping", self.worker, why)
        self.broken = True
        os.kill(os.getpid(), signal.SIGTERM)

    def _persist(self, write: Callable[[], None], what: str, op: str, **journal_args: object) -> None:
        """Run a Redis write, retrying through a short Redis restart (redis_retry_s); past
        that, keep it in the local journal, which the heartbeat replays once Redis is back."""
        deadline = time.monotonic() + self.redis_retry_s
        delay = 0.2
        while True:
            try:
                if self.journal.pending():  # keep the order: what was journalled first goes first
                    self.journal.replay(self.client, self.keys)
                write()
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() > deadline or self.stopping.is_set():
                    self.journal.append(op, **journal_args)
                    log.warning("cannot write %s (%s); kept in %s until Redis answers", what, e, self.journal.path)
                    return
                log.warning("cannot write %s (%s); retrying in %.1f s", what, e, delay)
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    redis_retry_s = 10.0  # how long a write retries before it goes to the journal

    def _on_error(self, task: TaskPayload, queue: str, e: Exception) -> str:
        if control_hooks.end_if_cancelled(self, task, e):  # fleet cancel: no retry, no failure record
            return "cancelled"
        verdict = decide(e, task, queue, self.settings)
        if verdict.worker_suspect:
            # Unexpected errors of several different samples in a row mean the worker, not the
            # samples, is broken: it stops taking work rather than failing the whole queue. The
            # same sample failing again (a retry that came back here) is one sample.
            with self.lock:  # the finisher's thread reports its sample's errors too
                if task.sample_id not in self.suspect_streak:
                    self.suspect_streak.append(task.sample_id)
                n = len(self.suspect_streak)
            if n >= self.settings.max_consecutive_errors and not self.broken:
                self.on_broken(f"{n} samples in a row failed with unexpected errors, "
                               f"the last {type(e).__name__}: {e}")
        if verdict.action is not Action.FAIL and verdict.queue is not None:
            target = verdict.queue
            nxt = task.model_copy(update={"attempt": verdict.next_attempt})
            preempted = isinstance(e, Preempted)
            failure = None if preempted else self._failure(task, verdict.error, retrying=True)
            lst, step = control_hooks.republish_list(self, target, task.experiment)  # its priority's list
            # The next attempt's payload is kept whole in its queued mark; its message refers to it.
            msg = encode_message(reference(task.sample_id), target, task_label(task.experiment, task.label,
                                 task.sample_id, f"attempt {nxt.attempt}"), priority=step)
            queued = kept_payload(target, nxt.to_json())
            kept = ""  # no kept payload of the earlier layout
            waiting = isinstance(e, WaitForResources)
            if waiting:
                failure = None  # not a failure: it did not start
            delay = verdict.delay_s
            self._persist(
                lambda: records.requeue(self.client, self.keys, task.sample_id, lst, msg, queued, failure,
                                        kept, keep_deliveries=preempted or waiting, delay_s=delay),
                f"the retry of {task.sample_id}", "requeue", sample_id=task.sample_id, queue=lst,
                message=base64.b64encode(msg).decode(), queued=queued, payload=kept,
                keep_deliveries=preempted or waiting, delay_s=delay,
                failure=failure.model_dump_json(by_alias=True) if failure is not None else None,
            )
            log.warning("%s %s (attempt %d -> %d) on %s%s: %s", "requeue" if preempted or waiting else "retry",
                        task.sample_id, task.attempt, nxt.attempt, target,
                        f" in {delay:.0f} s" if delay else "", e)
            return "requeued" if preempted or waiting else "retried"
        self._fail(task, verdict.error, final=True)
        log.error("failed %s (%s): %s", task.sample_id, type(verdict.error).__name__, verdict.error)
        return "failed"

    def _failure(self, task: TaskPayload, e: BaseException, retrying: bool = False) -> FailureRecord:
        """``retrying``: another attempt has been published (the record's ``retryable``)."""
        with self.lock:
            slot = self._slot(task.sample_id)  # running, or finishing in the finisher's thread
            reported = dict(slot.metrics) if slot is not None else {}
        return self._failure_record(task.sample_id, task.experiment, task.kind, task.group, task.label, e,
                                    task.attempt, retrying, reported)

    def _failure_record(self, sid: str, experiment: str, kind: str, group: str, label: str, e: BaseException,
                        attempt: int, retrying: bool, metrics: dict[str, MetricValue] | None = None) -> FailureRecord:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return FailureRecord(
            sample_id=sid, experiment=experiment, kind=kind, group=group, label=label,
            error_type=type(e).__name__, message=str(e)[:2000],
            traceback_tail="\n".join(tb.strip().splitlines()[-12:]),
            retryable=retrying, attempt=attempt, worker=self.worker, hostname=self.hostname,
            gpus=list(self.gpus), metrics=metrics or {}, failed_at=time.time(),
        )

    def _fail(self, task: TaskPayload, e: BaseException, final: bool) -> None:
        failure = self._failure(task, e)
        self._record_failure(failure, final)

    def _record_failure(self, failure: FailureRecord, final: bool) -> None:
        sid = failure.sample_id
        if final:
            with self.lock:
                self.failed_count += 1

        def write() -> None:
            records.fail(self.client, self.keys, failure, final=final)  # the queued mark too: one round trip

        self._persist(write, f"the failure of {sid}", "fail", failure=failure.model_dump_json(by_alias=True),
                      final=final)

    def _fail_raw(self, sid: str, payload: object, e: BaseException) -> None:
        """The failure of a payload that is not a valid task: recorded under what it says of itself."""
        d = payload if isinstance(payload, dict) else {}
        failure = self._failure_record(sid, str(d.get("experiment", "?")), str(d.get("kind", "?")),
                                       str(d.get("group", "?")), str(d.get("label", "")), e, 1, False)
        self._record_failure(failure, final=True)


_SKIPPED = {"done": "is already done", "running": "is running on another worker", "cancelled": "was cancelled",
            "gone": "has no kept payload (finished, failed for good, or a copy of a message already taken)"}


def _invalid(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"invalid payload: {'.'.join(map(str, err['loc']))}: {err['msg']}"


def _loose(payload_json: str | None) -> object:
    """A payload that did not validate, as far as it parses (its failure record names what it can)."""
    try:
        return json.loads(payload_json or "")
    except ValueError:
        return {}


def _host_gpus() -> int | None:
    """GPUs of this host (NVML, or the fake inventory); None when it cannot be read."""
    from fleet.gpu_inventory import inventory_from_env

    try:
        with inventory_from_env() as inv:
            return len(inv.snapshot())
    except Exception:  # no NVML library, a driver fault: the check then relies on other hosts
        return None
