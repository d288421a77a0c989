"""The worker's heartbeat thread: renews the running sample's lease, advertises the
worker (for `fleet gpus` and status), and publishes again the samples of dead workers.

It is a plain thread of the worker process, so it runs while a sample computes, with
the solo pool too (Celery's own heartbeats do not).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from fleet import records
from fleet.contract import Keys, WorkerEntry, task_label
from fleet.kept_payloads import kept_payload, reference
from fleet.publisher import encode_message
from fleet.routing import all_queues_prefix
from workers import control_hooks
from workers.runner import SampleRunner

log = logging.getLogger("fleet.worker")


class Heartbeat(threading.Thread):
    def __init__(self, runner: SampleRunner, queues: list[str]) -> None:
        super().__init__(name="fleet-heartbeat", daemon=True)
        self.runner = runner
        self.queues = queues
        self.stop_event = threading.Event()

    def run(self) -> None:
        s = self.runner.settings
        while not self.stop_event.is_set():
            try:
                self.beat()
                self.reap()
            except Exception:  # Redis restarting, network blip: try again next beat
                log.warning("heartbeat failed", exc_info=True)
            self.stop_event.wait(s.heartbeat_s)

    def beat(self) -> None:
        r, s, keys = self.runner.client, self.runner.settings, self.runner.keys
        if self.runner.journal.pending():  # records kept while Redis was away go first
            n = self.runner.journal.replay(r, keys)
            log.warning("replayed %d record writes kept while Redis was away", n)
        with self.runner.lock:
            cur, finishing = self.runner.current, self.runner.finishing
        # A sample being finished keeps its lease until its record is written: its file is not
        # in place yet, and a reaper must not publish it again meanwhile.
        for held in (cur, finishing):
            if held is not None and not records.renew(r, keys, held.sample_id, held.token, s.lease_ttl_s):
                log.warning("lost the lease of %s to another worker", held.sample_id)
        if cur is not None:
            control_hooks.watch_cancel(self.runner, cur.sample_id)  # fleet cancel: set the sample's stop event
        entry = WorkerEntry(
            name=self.runner.worker,
            hostname=self.runner.hostname,
            pid=os.getpid(),
            gpus=self.runner.gpus,
            host_gpus=self.runner.host_gpus,
            queues=self.queues,
            sample_id=cur.sample_id if cur else None,
            group=cur.group if cur else None,
            label=cur.label if cur else None,
            progress=cur.progress if cur else None,
            finishing=finishing.sample_id if finishing else None,
            done=self.runner.done_count,
            failed=self.runner.failed_count,
            peak_mib=self.runner.peak.peak_mib if self.runner.peak is not None else None,
            peak_samples=self.runner.peak.samples if self.runner.peak is not None else 0,
            seen_at=time.time(),
        )
        r.hset(keys.workers, self.runner.worker, entry.model_dump_json())

    def reap(self) -> None:
        """Publish again every sample whose worker died (its lease expired), and every sample
        whose message Redis lost."""
        r, s, keys = self.runner.client, self.runner.settings, self.runner.keys
        if not r.set(keys.reaper_lock, self.runner.worker, nx=True, px=int(s.heartbeat_s * 1000)):
            return
        self._forget_dead_workers()
        moved = records.release_delayed(r, keys)
        if moved:
            log.info("%d retries done waiting out their back-off: queued again", moved)
        for sid in records.recover_lost(r, keys, all_queues_prefix(s.namespace), max(10.0, 2 * s.heartbeat_s)):
            log.warning("sample %s: its message was lost (Redis restart?); published it again", sid)
        for sid, entry in self._confirmed_orphans():
            task = entry.task
            queued = kept_payload(entry.queue, json.dumps(task, ensure_ascii=False))  # its mark keeps it whole
            label = task_label(str(task.get("experiment", "")), str(task.get("label", "")), sid,
                               f"orphaned by {entry.worker}")
            target = control_hooks.orphan_target(self.runner, sid, entry.queue, str(task.get("experiment", "")))
            if target is None:
                continue  # cancelled: dropped, not published again
            msg = encode_message(reference(sid), entry.queue, label, priority=target[1])
            if records.take_orphan(r, keys, sid, queued, target[0], msg):
                log.warning("sample %s: worker %s died mid-sample; published it again", sid, entry.worker)
        control_hooks.reap(self.runner)  # unpark what is no longer paused; old tombstones

    def _confirmed_orphans(self, now: float | None = None) -> list:
        """Running samples without a lease whose worker has not beaten since: dead.

        A live worker loses its lease too when Redis is down longer than the lease; it
        takes it back at its next beat. So an orphan is published again only when seen
        without a lease for two beats and its worker has not beaten since it was first seen.
        """
        r, s, keys = self.runner.client, self.runner.settings, self.runner.keys
        now = time.time() if now is None else now
        found = records.orphans(r, keys, s.lease_ttl_s, now)
        first = {k.decode(): float(v) for k, v in r.hgetall(keys.orphan_suspects).items()}
        gone = [sid for sid in first if sid not in {sid for sid, _ in found}]
        if gone:
            r.hdel(keys.orphan_suspects, *gone)
        workers = {}
        for k, v in r.hgetall(keys.workers).items():
            try:
                workers[k.decode()] = WorkerEntry.model_validate_json(v)
            except ValueError:
                continue  # an entry of an older fleet version
        confirmed = []
        for sid, entry in found:
            if sid not in first:
                r.hset(keys.orphan_suspects, sid, now)
                continue
            w = workers.get(entry.worker)
            if w is not None and w.seen_at > first[sid] and sid in (w.sample_id, w.finishing):
                r.hdel(keys.orphan_suspects, sid)  # alive: it takes its lease back at its next beat
                continue
            if now - first[sid] >= 2 * s.heartbeat_s:
                r.hdel(keys.orphan_suspects, sid)
                confirmed.append((sid, entry))
        return confirmed

    def _forget_dead_workers(self) -> None:
        """Drop the entries of workers that stopped beating (SIGKILL leaves them behind)."""
        r, s, keys = self.runner.client, self.runner.settings, self.runner.keys
        cutoff = time.time() - max(60.0, 10 * s.heartbeat_s)
        dead = [name for name, raw in r.hgetall(keys.workers).items() if _seen_at(raw) < cutoff]
        if dead:
            r.hdel(keys.workers, *dead)

    def shutdown(self) -> None:
        self.stop_event.set()
        try:
            self.runner.client.hdel(Keys(self.runner.settings.namespace).workers, self.runner.worker)
        except Exception:
            pass



def _seen_at(raw: bytes) -> float:
    """When a worker entry's worker last beat (0 for an entry that does not parse)."""
    try:
        return float(json.loads(raw).get("seen_at", 0))
    except (ValueError, TypeError, AttributeError):
        return 0.0
