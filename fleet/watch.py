"""`fleet watch`: the figures of a live view of the fleet, one frame per refresh, without a
terminal (fleet/watch_view.py renders them; `--json` prints them as they are).

A frame (times unix seconds, durations seconds, rates completions per minute):

    {"t", "total", "done", "failed", "queued", "running", "pending", "rate_per_min", "eta_s",
     "groups": {group: {"total", "done", "failed", "queued", "running", "pending", "rate_per_min", "eta_s"}},
     "workers": [{"name", "gpus", "sample_id", "label", "running_s", "progress", "done", "failed",
                  "rate_per_min", "util_pct", "mem_used_mib"}]}

With an experiment the counts are `fleet status EXPERIMENT`'s (fleet.status.experiment_status),
planned again at most every ``replan_s``; between plans each refresh adds what changed in
Redis since (done set, queued marks, running and failed hashes) over the samples the
experiment published (fleet.experiment_index). Without one, the whole namespace, as
`fleet status` counts it (global_status), the records read incrementally. Rates come from
the completion records' finished_at over a sliding window (fleet.watch_rates).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import redis

from fleet import experiment_index, gpu_series, kept_payloads
from fleet.contract import Keys, WorkerEntry, record_group
from fleet.kinds import KindModules
from fleet.kinds.base import Experiment
from fleet.records import present
from fleet.status import STATES, Status, experiment_status
from fleet.watch_rates import CHUNK, WINDOW_S, RecordTracker, eta_s

REPLAN_S = 30.0  # an experiment is planned again at most this often, seconds
FIELDS = (*STATES, "pending")


class Watcher:
    """Computes one frame per ``refresh``; keeps what it read between refreshes."""

    def __init__(self, client: redis.Redis, namespace: str, exp: Experiment | None = None,
                 kinds: Mapping[str, KindModules] | None = None, heartbeat_s: float = 5.0,
                 window_s: float = WINDOW_S, replan_s: float = REPLAN_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.client, self.keys, self.exp, self.kinds = client, Keys(namespace), exp, kinds
        self.namespace = namespace
        self.heartbeat_s, self.replan_s, self.clock = heartbeat_s, replan_s, clock
        self.records = RecordTracker(client, self.keys, window_s)
        self._planned_at = float("-inf")  # monotonic seconds
        self._base = Status()  # experiment_status at the last plan
        self._group_of: dict[str, str] = {}  # published sample of the plan -> group
        self._index_len = -1
        self._at_plan: dict[str, Counter] = {}  # what Redis said of them right after the plan
        self._done: set[str] = set()  # seen in the done set since the plan: not asked again
        self._names: dict[str, str] = {}  # global mode: queued / failed sample -> group

    # ---- one frame -------------------------------------------------------------------------
    def refresh(self) -> dict:
        now = self.clock()
        running = self._running()
        if self.exp is None:
            st = self._global(now, running)
        else:
            replanned = self._plan_if_due()
            st = self._experiment(now)
            if not replanned and _finished(st):  # confirm the end with a plan: exactly `fleet status`
                self._plan_if_due(force=True)
                st = self._experiment(now)
        self.records.prune(now)
        return self._frame(now, st, running)

    @staticmethod
    def finished(frame: dict) -> bool:
        """Nothing queued, running or (with an experiment) pending."""
        return frame["queued"] == 0 and frame["running"] == 0 and frame["pending"] == 0

    def _frame(self, now: float, st: Status, running: dict[str, dict]) -> dict:
        d = st.as_dict()
        groups = {}
        for g, row in d.pop("by_group").items():  # each row has its pending (Status.as_dict)
            rate = self.records.rate(now, group=g)
            groups[g] = {**row, "rate_per_min": round(rate, 3),
                         "eta_s": _round(eta_s(row["total"] - row["done"] - row["failed"], rate))}
        rate = self.records.rate(now)
        return {"t": round(now, 3), **d, "rate_per_min": round(rate, 3),
                "eta_s": _round(eta_s(d["total"] - d["done"] - d["failed"], rate)),
                "groups": groups, "workers": self._workers(now, running)}

    # ---- with an experiment ----------------------------------------------------------------
    def _plan_if_due(self, force: bool = False) -> bool:
        """Plan again (experiment_status) when ``replan_s`` has passed; True when it did."""
        assert self.exp is not None
        if not force and time.monotonic() - self._planned_at < self.replan_s:
            return False
        self._planned_at = time.monotonic()
        self._base = experiment_status(self.client, self.namespace, self.exp, None, self.kinds)
        self._load_index()
        self._done = set()
        self._at_plan = self._states()
        return True

    def _load_index(self) -> None:
        ids = self._base.sample_ids or set()
        self._index_len = int(self.client.hlen(self.keys.experiment_samples(self.exp.name)))
        pub = experiment_index.published(self.client, self.keys, self.exp.name)
        self._group_of = {sid: g for sid, (g, _) in pub.items() if sid in ids}

    def _experiment(self, now: float) -> Status:
        """The plan's counts plus what changed in Redis since."""
        assert self.exp is not None
        if self.client.hlen(self.keys.experiment_samples(self.exp.name)) != self._index_len:
            before = set(self._group_of)  # an enqueue published more: they were pending at the plan
            self._load_index()
            for sid in set(self._group_of) - before:
                self._at_plan.setdefault(self._group_of[sid], Counter())["pending"] += 1
        now_states = self._states(now)
        st = Status()
        for g in set(self._base.by_group) | set(self._base.pending) | set(now_states):
            base = self._base.by_group.get(g, Counter()) + Counter(pending=self._base.pending.get(g, 0))
            cur, then = now_states.get(g, Counter()), self._at_plan.get(g, Counter())
            for s in FIELDS:
                n = max(0, base[s] + cur[s] - then[s])
                if s == "pending":
                    st.pending[g] = n
                else:
                    st.add(g, s, n)
        return st

    def _states(self, now: float | None = None) -> dict[str, Counter]:
        """group -> Counter of states (done, running, queued, failed, pending: none) of the
        experiment's published samples, as Redis says now. Reads running before and after the
        done set and queued marks (as fleet.records.classify), so a sample in transit is
        never seen in no state; samples seen done are not asked again until the next plan."""
        out: dict[str, Counter] = {}
        for sid in self._done:
            out.setdefault(self._group_of.get(sid, "?"), Counter())["done"] += 1
        ids = [sid for sid in self._group_of if sid not in self._done]
        running = set(self.client.hkeys(self.keys.running))
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(ids), CHUNK):
            pipe.smismember(self.keys.done, ids[i : i + CHUNK])
            present(pipe, self.keys.queued, ids[i : i + CHUNK])  # flags: a mark keeps a whole payload
        pipe.hkeys(self.keys.running)
        pipe.hkeys(self.keys.failed)
        answers = pipe.execute()
        running |= set(answers[-2])
        failed = set(answers[-1])
        done = [d for part in answers[:-2:2] for d in part]
        queued = [q for part in answers[1:-2:2] for q in part]
        newly = []
        for sid, d, q in zip(ids, done, queued):
            b = sid.encode()
            state = ("done" if d else "running" if b in running else "queued" if q
                     else "failed" if b in failed else "pending")
            if d:
                newly.append(sid)
            out.setdefault(self._group_of[sid], Counter())[state] += 1
        self._done.update(newly)
        self.records.add(newly, self.clock() if now is None else now)
        return out

    # ---- the whole namespace ---------------------------------------------------------------
    def _global(self, now: float, running: dict[str, dict]) -> Status:
        """global_status's counts, each record, queued mark and failure read once."""
        self.records.poll(now)
        st = Status()
        for g, n in self.records.done_by_group.items():
            st.add(g, "done", n)
        queued = [k.decode() for k in self.client.hkeys(self.keys.queued)]
        heads = kept_payloads.Heads(self.client, self.keys)
        self._name(queued, self.keys.queued, lambda raw: kept_payloads.group_of(raw.decode("utf-8", "replace"), heads))
        for sid in queued:
            st.add(self._names.get(sid, "?"), "queued")
        for entry in running.values():
            task = entry.get("task", {})
            st.add(str(task.get("group", task.get("category", "?"))), "running")
        settled = set(queued) | set(running)
        failed = [k.decode() for k in self.client.hkeys(self.keys.failed)]
        failed = [k for k in failed if k not in settled and k not in self.records.group_of]
        self._name(failed, self.keys.failed, record_group)
        for sid in failed:
            st.add(self._names.get(sid, "?"), "failed")
        keep = set(queued) | set(failed)
        self._names = {k: v for k, v in self._names.items() if k in keep}
        return st

    def _name(self, ids: list[str], key: str, group: Callable[[bytes], str]) -> None:
        """Learn the group of ``ids`` not known yet from hash ``key``."""
        new = [i for i in ids if i not in self._names]
        for i in range(0, len(new), CHUNK):
            chunk = new[i : i + CHUNK]
            for sid, raw in zip(chunk, self.client.hmget(key, chunk)):
                if raw is not None:
                    try:
                        self._names[sid] = group(raw)
                    except (ValueError, TypeError, IndexError, KeyError):
                        self._names[sid] = "?"

    # ---- workers ---------------------------------------------------------------------------
    def _running(self) -> dict[str, dict]:
        """sample id -> its running entry (RunningEntry as JSON)."""
        out = {}
        for k, v in self.client.hgetall(self.keys.running).items():
            try:
                out[k.decode()] = json.loads(v)
            except ValueError:
                continue
        return out

    def _workers(self, now: float, running: dict[str, dict]) -> list[dict]:
        """One row per worker seen within the last few heartbeats (at least 15 s), by name."""
        live = []
        for raw in self.client.hvals(self.keys.workers):
            try:
                w = WorkerEntry.model_validate_json(raw)
            except ValueError:
                continue  # an entry of another fleet version
            if now - w.seen_at < max(15.0, 3 * self.heartbeat_s):
                live.append(w)
        points = gpu_series.latest(self.client, self.keys) if any(w.gpus for w in live) else {}
        rows = []
        for w in sorted(live, key=lambda w: w.name):
            started = running.get(w.sample_id or "", {}).get("started_at")
            if started is None:  # the entry's sample finished since its last beat (or is not claimed yet)
                w.sample_id = w.label = w.progress = None
            pts = [points[k] for k in (gpu_series.series_name(w.hostname, i) for i in w.gpus) if k in points]
            utils = [p.util_pct for p in pts if p.util_pct is not None]
            mems = [p.mem_used_mib for p in pts if p.mem_used_mib is not None]
            rows.append({
                "name": w.name, "gpus": list(w.gpus), "sample_id": w.sample_id, "label": w.label,
                "running_s": None if started is None else _round(max(0.0, now - float(started))),
                "progress": w.progress, "done": w.done, "failed": w.failed,
                "rate_per_min": round(self.records.rate(now, worker=w.name), 3),
                "util_pct": round(sum(utils) / len(utils), 1) if utils else None,
                "mem_used_mib": sum(mems) if mems else None,
            })
        return rows


def frames(watcher: Watcher, interval_s: float, count: int | None = None,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[dict]:
    """A frame every ``interval_s`` seconds until the work is done or after ``count`` frames."""
    n = 0
    while True:
        started = time.monotonic()
        frame = watcher.refresh()
        n += 1
        yield frame
        if watcher.finished(frame) or (count is not None and n >= count):
            return
        sleep(max(0.0, interval_s - (time.monotonic() - started)))


def _finished(st: Status) -> bool:
    t = st.totals()
    return t["queued"] == 0 and t["running"] == 0 and sum(st.pending.values()) == 0


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
