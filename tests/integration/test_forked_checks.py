"""The done check's files stat'ed by two processes (fleet.output_files.forked_checks): the same
answers as one process gives, for files in place, missing or of another size, in the child's
share and in this process's; a child that fails leaves its share to this process; and the
folders verified that way are remembered as before (docs/ARCHITECTURE.md, "Sample identity")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet import output_files
from fleet.output_files import in_place
from tests.integration.conftest import Fleet, wait_for
from tests.integration.test_verified_folders import settled

pytestmark = pytest.mark.integration

FOLDERS, PER = 6, 20  # each folder at least CACHE_FROM outputs, so each may be remembered


def outputs(root: Path) -> tuple[list[str], list[bytes | None], set[int]]:
    """Paths and recorded sizes of FOLDERS x PER outputs, and the indexes that are not in place:
    one missing and one of another size in the first folder (this process's share) and in the
    last two (the child's)."""
    paths, want, bad = [], [], set()
    for d in range(FOLDERS):
        folder = root / f"part {d}"  # a space: names as users write them
        folder.mkdir(parents=True)
        for i in range(PER):
            k = len(paths)
            p = folder / f"s{i:02d}.out"
            paths.append(str(p))
            want.append(str(i).encode())
            if d in (0, FOLDERS - 2, FOLDERS - 1) and i in (3, 7):
                bad.add(k)
                if i == 3:
                    continue  # missing
                p.write_bytes(b"x" * (i + 1))  # another size than recorded
            else:
                p.write_bytes(b"x" * i)
    return paths, want, bad


@pytest.fixture
def pid_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every folder checked writes '<pid> <folder>' to this file (from the child too)."""
    log = tmp_path / "pids.txt"
    real = output_files._check_in

    def logged(folder, names, ks, want, ok):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {folder}\n")
        return real(folder, names, ks, want, ok)

    monkeypatch.setattr(output_files, "_check_in", logged)
    monkeypatch.setattr(output_files, "FORK_FROM", 1)
    # Earlier tests of this pytest process may leave threads (a decoder's pool, say), which
    # _may_fork refuses; its other conditions stand (test_no_fork_while_another_thread_runs).
    monkeypatch.setattr(output_files.threading, "active_count", lambda: 1)
    return log


def checkers(log: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for line in log.read_text().splitlines():
        pid, folder = line.split(" ", 1)
        out.setdefault(folder, set()).add(int(pid))
    return out


def test_two_processes_give_one_process_answers(fleet_ns: Fleet, tmp_path: Path, pid_log: Path) -> None:
    paths, want, bad = outputs(tmp_path / "out")
    key = fleet_ns.keys.verified_folders
    assert output_files._may_fork()
    got = in_place(fleet_ns.client, key, paths, want)
    assert got.ok == [k not in bad for k in range(len(paths))]
    assert got.stat_calls == len(paths)
    pids = checkers(pid_log)
    assert len(pids) == FOLDERS and all(len(p) == 1 for p in pids.values())
    others = {p for s in pids.values() for p in s} - {os.getpid()}
    assert len(others) == 1, "a child stat'ed some folders"
    assert pids[str(tmp_path / "out" / "part 0")] == {os.getpid()}
    assert pids[str(tmp_path / "out" / f"part {FOLDERS - 1}")] == others

    # Once the folders are old enough to be remembered, the ones whose every output fits are.
    wait_for(lambda: all(settled(tmp_path / "out" / f"part {d}") for d in range(FOLDERS)), 10, "folders settled")
    in_place(fleet_ns.client, key, paths, want)
    remembered = {k.decode() for k in fleet_ns.client.hkeys(key)}
    assert remembered == {str(tmp_path / "out" / f"part {d}") for d in range(1, FOLDERS - 2)}
    again = in_place(fleet_ns.client, key, paths, want)
    assert again.ok == got.ok and again.trusted_folders == FOLDERS - 3


def test_a_failed_child_leaves_its_share_to_this_process(fleet_ns: Fleet, tmp_path: Path, pid_log: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    paths, want, bad = outputs(tmp_path / "out")

    class Broken:
        @staticmethod
        def dumps(_: object) -> bytes:
            raise RuntimeError("the child cannot send")

    monkeypatch.setattr(output_files, "marshal", Broken)
    got = in_place(fleet_ns.client, fleet_ns.keys.verified_folders, paths, want)
    assert got.ok == [k not in bad for k in range(len(paths))]
    pids = checkers(pid_log)
    assert all(os.getpid() in p for p in pids.values()), "this process checked every folder itself"
    assert any(len(p) == 2 for p in pids.values()), "the child had tried its share"


def test_no_fork_while_another_thread_runs() -> None:
    import threading

    release = threading.Event()
    t = threading.Thread(target=release.wait)
    t.start()
    try:
        assert not output_files._may_fork()
    finally:
        release.set()
        t.join()
