"""``python -m workers.command_guard GRACE_S -- ARGV...``: run ARGV so that it never outlives
its worker, and stop it with everything it started.

The worker starts this guard as the leader of a new session (so a new process group); the
command runs in that group. The guard
- asks the kernel for SIGTERM when its parent (the worker's thread) dies, even by SIGKILL
  (Linux PR_SET_PDEATHSIG), so a killed worker leaves no command holding a GPU;
- on SIGTERM/SIGINT/SIGHUP (``fleet cancel``, ``fleet down``, a time limit, the worker's
  death) sends SIGTERM to every process of the group, and SIGKILL to those left after
  GRACE_S seconds;
- when the command ends, ends what it left running in the background the same way;
- exits with the command's status (128 + N when a signal N ended it).

Nothing here imports more than the standard library: it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker's own stop path still ends the group
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(128 + signal.SIGTERM)


def group_members(pgid: int, me: int) -> list[int]:
    """Pids in process group ``pgid`` other than ``me`` (from /proc; [] where there is none)."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":  # field 5 of stat: pgrp; zombies are gone already
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def end_group(pgid: int, me: int, grace_s: float, child: subprocess.Popen | None) -> None:
    """SIGTERM to the group, then SIGKILL to whoever is left after ``grace_s``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM reaches this process too
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if child is not None:
            child.poll()  # reap it, so it stops counting as a member
        if not group_members(pgid, me):
            return
        time.sleep(0.05)
    for pid in group_members(pgid, me):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m workers.command_guard GRACE_S -- ARGV...", file=sys.stderr)
        return 2
    grace_s, cmd = float(argv[0]), argv[2:]
    _die_with_parent(int(os.environ.pop("FLEET_GUARD_PARENT", os.getppid())))  # not passed on to the command
    me, pgid = os.getpid(), os.getpgrp()
    stop = {"asked": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["asked"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    child = subprocess.Popen(cmd)
    while True:
        try:
            rc = child.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if stop["asked"]:
                end_group(pgid, me, grace_s, child)
                rc = child.wait()
                break
    end_group(pgid, me, min(grace_s, 2.0), None)  # what it left running in the background
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
