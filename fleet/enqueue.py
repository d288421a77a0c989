"""``fleet enqueue``: plan, skip what is done or in flight, check inputs, publish in bulk.

Kind-agnostic: the experiment's kind plans and checks its inputs (fleet.kinds); every
check that can reject the input runs before the first message is published, so bad
input never leaves a half-enqueued experiment.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path

import redis
from redis.exceptions import LockError

from fleet import experiment_index
from fleet.contract import Keys, WorkerEntry, queue_name, task_label
from fleet.control import forget_cancelled, record_priority
from fleet.errors import BrokerUnavailable, InputError, PlacementError
from fleet.experiment_index import adopt_published, keep_checked, note_enqueue
from fleet.kept_payloads import head_id, reference
from fleet.kinds import KindModules, registry
from fleet.kinds.base import Experiment, PlanContext, Sample
from fleet.placement import PlacementPolicy
from fleet.planner import bulk, check_inputs, payload_head, plan_experiment, tails
from fleet.publisher import Outgoing, output_key, publish
from fleet.records import (
    CHUNK,
    adopt_legacy_records,
    classify,
    drop_stale_queued,
    has_legacy_records,
    undo,
)
from fleet.routing import queue_for_sample
from fleet.settings import inside

LOCK_TTL_S = 120.0  # a crashed enqueue's lock frees itself after this long
LOCK_WAIT_S = 600.0  # how long an enqueue waits for another one of the namespace


@dataclass
class EnqueueResult:
    planned: int
    done: int
    in_flight: int
    enqueued: int
    would_enqueue: list[Sample] = field(default_factory=list)  # filled on dry runs

    def as_dict(self) -> dict[str, int]:
        return {"planned": self.planned, "done": self.done, "in_flight": self.in_flight, "enqueued": self.enqueued}


def enqueue(
    client: redis.Redis,
    namespace: str,
    exp: Experiment,
    groups: list[str] | None = None,
    dry_run: bool = False,
    policy: PlacementPolicy | None = None,
    memory_classes_mib: list[int] | None = None,
    kinds: Mapping[str, KindModules] | None = None,
    lock_timeout_s: float = LOCK_WAIT_S,
    rerun: bool = False,
    verify_outputs: bool = False,
    allowed_roots: list[Path] | None = None,
) -> EnqueueResult:
    """Publish every sample of ``exp`` that is neither done nor queued nor running.

    Each sample goes to the queue of what it needs (pinned GPUs, several GPUs, a memory
    class, or any GPU); an impossible need fails here, before anything is published.
    One enqueue of the namespace runs at a time (a lock in Redis), so two concurrent
    enqueues of one experiment, or of two that share samples, queue each sample once.
    ``rerun``: done samples are published again too (their outputs are made anew).
    ``verify_outputs``: stat every done output, trusting no verified folder (fleet.output_files).
    ``allowed_roots``: the folders this fleet's workers may write under (resolved; the settings'
    ``allowed_output_roots``): an experiment whose output lies elsewhere is refused here, before
    anything is made or published, rather than failed sample by sample by the workers.
    """
    if allowed_roots is not None:
        check_output_allowed(exp, allowed_roots)
    keys = Keys(namespace)
    lock = client.lock(keys.enqueue_lock, timeout=LOCK_TTL_S, blocking_timeout=lock_timeout_s)
    if not lock.acquire():
        raise BrokerUnavailable(f"another `fleet enqueue` of namespace {namespace!r} has held its lock for "
                                f"{lock_timeout_s:.0f} s; try again when it has finished")
    try:
        with bulk():
            return _enqueue(client, keys, exp, groups, dry_run, policy, memory_classes_mib, kinds, rerun,
                            verify_outputs)
    finally:
        try:
            lock.release()
        except LockError:
            pass  # expired meanwhile (an enqueue longer than LOCK_TTL_S): nothing to release


def _enqueue(
    client: redis.Redis, keys: Keys, exp: Experiment, groups: list[str] | None, dry_run: bool,
    policy: PlacementPolicy | None, memory_classes_mib: list[int] | None, kinds: Mapping[str, KindModules] | None,
    rerun: bool = False, verify_outputs: bool = False,
) -> EnqueueResult:
    namespace = keys.namespace
    check_name_free(client, keys, exp)
    ctx = PlanContext(client, keys, legacy_ids=has_legacy_records(client, keys))
    plan = plan_experiment(exp, groups, ctx, kinds)
    ids, outs = plan.ids, plan.outputs  # columns: no Sample made for a sample that is done or in flight
    drop_stale_queued(client, keys, queue_name(namespace, ""))  # a purged queue must not mean "in flight" forever
    state = classify(client, keys, ids, outs, verify_outputs)
    todo = plan.at(state.todo)
    if rerun:
        busy = state.queued | state.running
        todo = plan.at([i for i, sid in enumerate(ids) if sid not in busy])
    if ctx.legacy_ids and todo:
        migrated = adopt_legacy_records(client, keys, todo)
        state.done.update(migrated)
        todo = [smp for smp in todo if smp.sample_id not in migrated]
    in_flight = len(state.queued) + len(state.running)
    owner_keys = [output_key(smp.output_path) for smp in todo]  # once: checked, then written
    if todo:
        check_output_owners(client, keys, exp, todo, owner_keys)
    check_inputs(plan, todo, ctx, kinds)
    check_gpu_counts(client, keys, exp, todo, registry(kinds)[exp.kind].runs_commands)
    policy = policy or PlacementPolicy()
    classes = memory_classes_mib or []
    routes: dict[tuple[str, int, int], str] = {}
    commands = registry(kinds)[exp.kind].runs_commands  # its own queues: only --allow-commands workers take them
    for need in {(smp.group, smp.memory_mib, smp.gpus) for smp in todo}:
        try:
            routes[need] = queue_for_sample(need[0], need[1], policy, namespace, classes, need[2], commands)
        except PlacementError as e:
            raise PlacementError(f"{exp.path}: {e}") from None
    if todo:  # after every other check: a refused enqueue or a dry run creates no folder
        check_output_root(exp, create=not dry_run)
    if dry_run:
        return EnqueueResult(len(ids), len(state.done), in_flight, 0, todo)
    if rerun and state.done:
        undo(client, keys, [smp.sample_id for smp in todo if smp.sample_id in state.done])
    step = record_priority(client, keys, exp)  # the experiment's priority: its queue lists (fleet.control)
    # Each payload is kept once, in its queued mark: the head, shared, under its id; the sample's
    # own tail in the mark. The message carries a reference the worker expands (fleet.kept_payloads).
    head = payload_head(plan)
    hid = head_id(head)
    client.hset(keys.payload_heads, hid, head)
    forget_cancelled(client, keys, [smp.sample_id for smp in todo])  # a cancelled sample enqueued again runs
    enc = encode_basestring
    owner_tail = "\t" + exp.name
    root = str(exp.output) + "/"  # the head's output root: the samples index keeps paths under it relative
    cut = len(root)
    items = (
        Outgoing(
            queue=q,
            payload_json=reference(smp.sample_id),
            sample_id=smp.sample_id,
            label=task_label(exp.name, smp.label, smp.sample_id),
            mark=f"{hid}\t{q}\t{tail}",  # kept_payloads.mark, inlined
            owner_key=okey,
            owner=smp.sample_id + owner_tail,
            priority=step,
            experiment=exp.name,
            member=(f"{hid}[{enc(smp.group)},{enc(smp.output_path[cut:])}]" if smp.output_path.startswith(root)
                    else f"[{enc(smp.group)},{enc(smp.output_path)}]"),  # experiment_index.member, inlined
        )
        for (smp, q, tail), okey in zip(tails(plan, todo, lambda smp: routes[(smp.group, smp.memory_mib, smp.gpus)]),
                                        owner_keys)
    )
    # The experiments index (fleet.experiment_index), what `fleet status` lists and counts: the
    # samples hash gets the ids published now with their messages, ones published before it existed here.
    # (adopt_published does nothing while the hash holds as many ids as are busy: counted, not listed.)
    n_busy = len(state.done) + len(state.queued) + len(state.running - state.done)
    n_index = client.hlen(keys.experiment_samples(exp.name))
    if n_busy and n_index < n_busy:
        busy = state.done | state.queued | state.running
        adopt_published(client, keys, exp.name, plan.at([i for i, sid in enumerate(ids) if sid in busy]))
    n = publish(client, keys, items)
    entry = note_enqueue(client, keys, exp, n)
    if entry is not None and entry.published != n_index:  # only planned ids added: status need not list them
        keep_checked(client, keys, exp.name, ids, n_index, entry.published)
    return EnqueueResult(len(ids), len(state.done), in_flight, n)


def host_gpu_counts(client: redis.Redis, keys: Keys) -> list[int]:
    """GPUs of each host that has a live worker (their heartbeat entries), and of this host
    (0 for a host without any)."""
    counts: dict[str, int] = {}
    for raw in client.hvals(keys.workers):
        try:
            w = WorkerEntry.model_validate_json(raw)
        except ValueError:
            continue
        if w.host_gpus is not None:
            counts[w.hostname] = max(counts.get(w.hostname, 0), w.host_gpus)
    try:
        from fleet.gpu_inventory import inventory_from_env

        with inventory_from_env() as inv:
            counts[socket.gethostname()] = max(counts.get(socket.gethostname(), 0), len(inv.snapshot()))
    except Exception:  # no NVML here (a laptop, a login node): the workers' hosts decide
        pass
    return list(counts.values())


def check_gpu_counts(client: redis.Redis, keys: Keys, exp: Experiment, todo: list[Sample],
                     commands: bool = False) -> None:
    """Refuse a sample that needs more GPUs than any known host has (hosts with live workers,
    and this one); with no host known there is nothing to check against. A model's sample
    of one GPU also runs on a CPU worker (``--cpu``); a command (``commands``) is given real
    GPUs, so one needing any is refused where every known host has none and a worker is live."""
    need = max((smp.gpus for smp in todo), default=0)
    if need < 1 or (need == 1 and not commands):
        return
    hosts = [n for n in host_gpu_counts(client, keys) if n > 0]
    if commands and not hosts and client.hlen(keys.workers):
        smp = next(s for s in todo if s.gpus == need)
        raise PlacementError(f"{exp.path}: {smp.label}: needs {need} GPU(s), but no host of this fleet has a GPU "
                             "(start a GPU worker first, or let it ask for none)")
    if hosts and need > max(hosts):
        smp = next(s for s in todo if s.gpus == need)
        raise PlacementError(f"{exp.path}: {smp.label}: needs {need} GPUs, but the largest host of this fleet "
                             f"has {max(hosts)}")


def check_name_free(client: redis.Redis, keys: Keys, exp: Experiment) -> None:
    """Refuse a second experiment file under a name another one holds (two folders' own
    ``experiment.yaml``, say): their samples, status, cancel and pause would be merged. The
    same file reached by another path, or a file moved (the one of the index is gone), is
    the same experiment."""
    prev = experiment_index.entry(client, keys, exp.name)
    if prev is None or prev.file == str(exp.path):
        return
    other = Path(prev.file)
    try:
        if not other.exists() or other.samefile(exp.path):
            return
    except OSError:
        return
    raise InputError(f"{exp.path}: experiment name {exp.name!r} is already that of {other}; "
                     "give this one its own `name:`")


def check_output_allowed(exp: Experiment, allowed: list[Path]) -> None:
    """InputError unless the experiment's output folder (symlinks resolved) lies in one of
    ``allowed``, by the rule the workers' confinement applies (``fleet.settings.inside``)."""
    out = os.path.realpath(exp.output)
    if any(inside(out, str(root)) for root in allowed):
        return
    raise InputError(f"{exp.path}: output {exp.output} is outside the folders outputs may be written under "
                     f"({', '.join(map(str, allowed)) or 'none'}; setting output_roots or output_dir)")


def check_output_root(exp: Experiment, create: bool = True) -> None:
    """The output folder exists or can be created (``create``: is created), and is writable;
    InputError otherwise. Without ``create`` (a dry run) nothing is made: the nearest folder
    that exists must be one this process may create folders in."""
    out = Path(exp.output)
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{exp.path}: output: cannot create {out}: {e.strerror or e}") from None
    elif not out.exists():
        at = out.parent
        while not at.exists() and at != at.parent:
            at = at.parent
        if not (at.is_dir() and os.access(at, os.W_OK | os.X_OK)):
            raise InputError(f"{exp.path}: output: cannot create {out}: {at} is not a writable folder")
        return
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{exp.path}: output: {out} is not a writable folder")


def check_output_owners(client: redis.Redis, keys: Keys, exp: Experiment, todo: list[Sample],
                        owner_keys: list[bytes] | None = None) -> None:
    """Refuse a sample whose output path another experiment writes with other parameters.

    The output owners index maps each published output path (by its hash) to the sample and
    experiment that write it; its earlier form (keyed by the path) is read too while it exists.
    The same experiment re-planning a path with new parameters replaces its own sample (that
    is how a changed parameter is made again); another experiment would overwrite a file the
    first one counts as done. ``owner_keys``: ``output_key`` of each sample's path, when made already.
    """
    legacy = bool(client.exists(keys.outputs))
    okeys = owner_keys if owner_keys is not None else [output_key(s.output_path) for s in todo]
    for i in range(0, len(todo), CHUNK):
        chunk = todo[i : i + CHUNK]
        pipe = client.pipeline(transaction=False)
        pipe.hmget(keys.output_owners, okeys[i : i + CHUNK])
        if legacy:
            pipe.hmget(keys.outputs, [s.output_path for s in chunk])
        found = pipe.execute()
        for k, smp in enumerate(chunk):
            raw = next((part[k] for part in found if part[k] is not None), None)  # the current index first
            if raw is None:
                continue
            try:
                text = raw.decode("utf-8")
                sid, other = json.loads(text) if text.startswith("[") else text.split("\t", 1)
            except (ValueError, TypeError):
                continue
            if sid != smp.sample_id and other != exp.name:
                raise InputError(
                    f"{exp.path}: output {smp.output_path} is also written by experiment {other!r} with other "
                    f"parameters; give experiment {exp.name!r} an output folder of its own")
