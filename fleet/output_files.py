"""The done check's file side: whether many outputs are in place with their recorded size
(done = a record and the output in place with the recorded size, fleet.records.classify).

A million outputs are a million ``stat`` calls, the largest part of re-checking a million
done samples (about 3 µs each on the 2-core test machine, docs/BENCHMARKS.md "A million
samples"). Each is made relative to its folder, opened once (``fstatat`` resolves one path
component instead of the whole path: about 10 % less). Threads were tried and gave nothing
under the GIL; a forked child that stats half the folders nearly halves it (``forked_checks``).

So a folder whose outputs were all verified is remembered (``in_place``, in the style of
Git's "racy git" rule; docs/ARCHITECTURE.md, "Sample identity"): workers put outputs in
place by rename, and adding, deleting or renaming an entry changes its folder's mtime and
ctime (ctime cannot be set back by a user). While a folder's identity (inode, mtime, ctime)
and the outputs checked in it (names and recorded sizes) are those of its entry, its
outputs are trusted without a ``stat`` each. Not seen that way: a file changed in place
(truncated, overwritten by ``cp``); ``verify_all`` (``--verify-outputs``) checks every file.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby, repeat
from operator import itemgetter

import redis

BY_FOLDER_FROM = 1000  # fewer paths than this are stat'ed by their whole path
FORK_FROM = 20_000  # fewer outputs to stat: a fork (a few ms for a big process) would gain little
CACHE_FROM = 16  # a folder with fewer outputs to check is stat'ed file by file: an entry would save little
# A folder is remembered only when its last change (mtime, ctime) is at least this much older than
# the check: a change within the same time stamp tick as the one seen would not move it (Git's
# "racy" case). Coarse file system clocks tick in milliseconds (FAT: 2 s). The check's clock and the
# file system's must agree within this margin (NTP): one ahead only keeps folders from being
# remembered, one behind could let such a change hide.
RACY_S = 2.0


def sizes(paths: Sequence[str]) -> list[int | None]:
    """The size in bytes of each path (``os.stat``, links followed), None where there is none
    (or it cannot be read), in order."""
    if len(paths) < BY_FOLDER_FROM:
        return [_size(p) for p in paths]
    out: list[int | None] = [None] * len(paths)
    folders: dict[str, list[int]] = {}
    for k, p in enumerate(paths):
        folder, _, name = p.rpartition("/")
        if folder:  # "x/": the folder x itself (_sizes_in)
            folders.setdefault(folder, []).append(k)
        else:  # a bare name or one in "/": as it is
            out[k] = _size(p)
    for folder, ks in folders.items():
        _sizes_in(folder, [paths[k].rpartition("/")[2] for k in ks], ks, out)
    return out


def _sizes_in(folder: str, names: list[str], ks: list[int], out: list) -> None:
    """``out[k]`` = the size of ``folder/name`` for each (name, k), where there is one."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # no folder, no files: None each
    stat = os.stat
    try:
        for name, k in zip(names, ks):
            try:
                out[k] = (stat(name, dir_fd=fd) if name else os.fstat(fd)).st_size  # "x/": the folder itself
            except OSError:
                pass
    finally:
        os.close(fd)


def _check_in(folder: str, names: list[str], ks: Sequence[int], want: Sequence[bytes | None], ok: list[bool]) -> tuple[bool, int]:
    """``ok[k]`` = whether ``folder/name`` fits ``want[k]`` (see ``fits``), for each (name, k);
    returns (all fit, the oldest mtime in ns among them)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False, -1  # no folder, no files
    stat = os.stat
    good, oldest = True, -1
    try:
        for name, k in zip(names, ks):
            try:
                st = stat(name, dir_fd=fd) if name else os.fstat(fd)  # "x/": the folder itself
            except OSError:
                good = False
                continue
            w = want[k]
            if w is None or w == b"-1" or st.st_size == int(w):
                ok[k] = True
            else:
                good = False
            if st.st_mtime_ns < oldest or oldest < 0:
                oldest = st.st_mtime_ns
    finally:
        os.close(fd)
    return good, oldest


def forked_checks(jobs: Sequence[tuple[str, list[str], Sequence[int]]], want: Sequence[bytes | None],
                  ok: list[bool]) -> list[tuple[bool, int]]:
    """``_check_in`` of each job (folder, names, indexes), in order. With many files on Linux
    and more than one core, a forked child stats about half of them meanwhile: a ``stat`` is
    mostly the kernel's time, threads gave nothing (the GIL), a second process nearly halves
    it (a million outputs: about 2.5 s to 1.5 s on 2 cores, docs/BENCHMARKS.md "A million
    samples"). The child only stats and writes its findings to a pipe, then ``os._exit``s;
    if it fails in any way, this process does its share too."""
    total = sum(len(ks) for _, _, ks in jobs)
    if total < FORK_FROM or len(jobs) < 2 or not _may_fork():
        return [_check_in(folder, names, ks, want, ok) for folder, names, ks in jobs]
    acc, cut = 0, 0
    for cut, (_, _, ks) in enumerate(jobs):  # the child takes the jobs after the first half of the files
        acc += len(ks)
        if acc * 2 >= total:
            break
    cut = min(cut + 1, len(jobs) - 1)
    theirs = jobs[cut:]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing but stat calls and one write; never the parent's exit path
        code = 1
        try:
            os.close(r)
            out = []
            for folder, names, ks in theirs:
                good, oldest = _check_in(folder, names, ks, want, ok)
                out.append((good, oldest, b"" if good else bytes(map(ok.__getitem__, ks))))
            with os.fdopen(w, "wb") as f:
                f.write(marshal.dumps(out))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    reaped = False
    try:
        mine = [_check_in(folder, names, ks, want, ok) for folder, names, ks in jobs[:cut]]
        with os.fdopen(r, "rb") as f:
            data = f.read()
        reaped, status = True, os.waitpid(pid, 0)[1]
        got = marshal.loads(data) if status == 0 and data else None
    finally:
        if not reaped:  # interrupted: the child must not outlive this
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if not isinstance(got, list) or len(got) != len(theirs):
        return mine + [_check_in(folder, names, ks, want, ok) for folder, names, ks in theirs]
    for (_, _, ks), (good, _, flags) in zip(theirs, got):
        if good:
            for k in ks:
                ok[k] = True
        else:
            for k, f in zip(ks, flags):
                if f:
                    ok[k] = True
    return mine + [(good, oldest) for good, oldest, _ in got]


def _may_fork() -> bool:
    """Linux (fork is cheap and safe for a child that only makes system calls), more than one
    core to run on, and no other thread (whose locks the child would inherit held)."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return False
    try:
        return len(os.sched_getaffinity(0)) > 1
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) > 1


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


@dataclass
class Checked:
    """What ``in_place`` found, and how (the counts show the cache at work)."""

    ok: list[bool]  # per path: in place with its recorded size
    stat_calls: int = 0  # outputs stat'ed one by one
    trusted: int = 0  # outputs trusted by their folder's entry, not stat'ed
    trusted_folders: int = 0


def fits(size: int | None, want: bytes | None) -> bool:
    """Whether a file of ``size`` bytes (None: none) is the one recorded with ``want``: its
    size as ``<ns>:done_bytes`` keeps it (ASCII digits; b"-1": a folder, any size), None: a
    record from before sizes were kept (any size)."""
    return size is not None and (want is None or want == b"-1" or size == int(want))


def in_place(client: redis.Redis | None, key: str, paths: Sequence[str], want: Sequence[bytes | None],
             verify_all: bool = False) -> Checked:
    """Whether each output is in place with its recorded size ``want`` (see ``fits``).

    ``key``: the Redis hash of verified folders (``Keys.verified_folders``), folder path ->
    ``<inode>:<mtime ns>:<ctime ns> <digest of the paths checked there and their sizes>``.
    A folder of at least ``CACHE_FROM`` outputs whose entry still holds is trusted; any other
    is stat'ed file by file, and remembered when every output in it passed, it changed after
    its oldest file and not for ``RACY_S``. ``verify_all``: stat every file (entries are refreshed).
    Per output, on a trusted folder: its folder's name, and its path and size hashed (C loops)."""
    n = len(paths)
    if client is None or n < CACHE_FROM:
        return Checked([fits(s, w) for s, w in zip(sizes(paths), want)], stat_calls=n)
    # Runs of outputs in one folder (a plan keeps a folder's outputs together), merged by folder.
    spans: dict[str, list[tuple[int, int]]] = {}
    at = 0
    for folder, run in groupby(map(itemgetter(0), map(str.rpartition, paths, repeat("/")))):  # C loops
        m = len(list(run))
        spans.setdefault(folder, []).append((at, at + m))
        at += m
    res = Checked([False] * n)
    ok = res.ok
    big = [f for f, sp in spans.items() if f and sum(b - a for a, b in sp) >= CACHE_FROM]
    entries = dict(zip(big, client.hmget(key, big))) if big else {}
    remember: dict[str, str] = {}
    forget: list[str] = []
    jobs: list[tuple[str, list[str], Sequence[int]]] = []  # folders stat'ed file by file
    seen: list[tuple[str, os.stat_result, int, str, bytes | None] | None] = []  # per job: what decides remembering
    for folder, sp in spans.items():
        ks = [k for a, b in sp for k in range(a, b)] if len(sp) > 1 else range(*sp[0])
        if not folder:
            for k in ks:  # a bare name or one in "/": as it is
                ok[k] = fits(_size(paths[k]), want[k])
            res.stat_calls += len(ks)
            continue
        cut = len(folder) + 1
        if folder not in entries:  # a few outputs: one stat each
            jobs.append((folder, [paths[k][cut:] for k in ks], ks))
            seen.append(None)
            continue
        # The folder's identity before its files: a change while they are stat'ed moves it.
        now_ns = time.time_ns()
        try:
            st = os.stat(folder)
        except OSError:
            forget.append(folder)
            continue  # no folder: none of its outputs
        digest = hashlib.blake2b(digest_size=16)
        for a, b in sp:
            digest.update("\n".join(paths[a:b]).encode("utf-8", "surrogateescape"))
            wants = want[a:b]
            digest.update(b",".join(wants if None not in wants else [w or b"" for w in wants]))
        entry = f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns} {digest.hexdigest()}"
        cached = entries[folder]
        if not verify_all and cached is not None and cached.decode() == entry:
            for a, b in sp:
                ok[a:b] = [True] * (b - a)
            res.trusted += len(ks)
            res.trusted_folders += 1
            continue
        jobs.append((folder, [paths[k][cut:] for k in ks], ks))
        seen.append((folder, st, now_ns, entry, cached))
    for (_, _, ks), found, (good, oldest) in zip(jobs, seen, forked_checks(jobs, want, ok)):
        res.stat_calls += len(ks)
        if found is None:
            continue
        folder, st, now_ns, entry, cached = found
        changed_ns = max(st.st_mtime_ns, st.st_ctime_ns)
        # Changed after its oldest file: a file system that keeps folder times (some FUSE mounts do
        # not, and a deletion there would go unseen).
        if good and oldest <= changed_ns < now_ns - int(RACY_S * 1e9):
            remember[folder] = entry
        elif cached is not None:
            forget.append(folder)
    if remember or forget:
        pipe = client.pipeline(transaction=False)
        if remember:
            pipe.hset(key, mapping=remember)
        if forget:
            pipe.hdel(key, *forget)
        pipe.execute()
    return res
