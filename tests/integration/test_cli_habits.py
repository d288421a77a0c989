"""The command line's habits, on a real local fleet: `python -m fleet`, -v reaching the
processes `fleet up` starts, `fleet up` refusing flags the running fleet was not started
with, and `fleet demo` leaving alone a fleet it did not start, with closing hints that run
as printed after it ends."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import LocalFleet, wait_for

pytestmark = pytest.mark.integration


def test_python_dash_m_fleet_is_the_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "fleet", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Usage: fleet" in r.stdout and "_FLEET_COMPLETE=bash_source" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "fleet", "status"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FLEET_LOG_LEVEL": "LOUD"})
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "log_level" in bad.stderr


def test_up_with_other_flags_says_so_and_verbose_reaches_the_workers(local_fleet: LocalFleet) -> None:
    f = local_fleet
    f.fleet("-v", "up", "--cpu-workers", "1", check=True)
    wait_for(f.worker_registered, 60, f"the worker\n{f.log_tails()}")
    # -v set the log_level setting of what `up` started: the worker logs at DEBUG.
    wait_for(lambda: " DEBUG " in (f.logs / "worker-cpu0.log").read_text(errors="replace"), 30, "a DEBUG line")

    same = f.fleet("up", "--cpu-workers", "1")
    assert same.returncode == 0 and "already up" in same.stdout
    plain = f.fleet("up")  # no flags: "make sure it is up", whatever it was started with
    assert plain.returncode == 0 and "already up" in plain.stdout

    other = f.fleet("up", "--cpu-workers", "2", "--allow-commands")
    assert other.returncode == 1 and other.stderr.count("\n") == 1, other.stderr
    assert "cpu_workers: 1 -> 2" in other.stderr and "allow_commands: False -> True" in other.stderr
    assert "fleet down" in other.stderr
    assert list(f.worker_pids()) == ["cpu0"]  # nothing was started or stopped


def _run_hint(line: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a printed hint ("go on with: ...") in a shell, as a user pasting it would."""
    cmd = line.split(":", 1)[1].strip()
    return subprocess.run(["bash", "-c", cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_demo_stops_only_its_own_fleet_and_its_hints_run(local_fleet: LocalFleet, tmp_path: Path) -> None:
    f = local_fleet
    demo_dir = tmp_path / "my demo"
    # The user's default settings: no output roots (the demo allows its own folder).
    env = {k: v for k, v in f.env().items() if k != "FLEET_OUTPUT_ROOTS"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "fleet", "demo", "image", "--dir", str(demo_dir), "--workers", "1"],
                       env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr + f.log_tails()
    assert "fleet is down" in r.stdout and not f.state_file().get("pids")  # its own fleet: stopped
    hint = next(line for line in r.stdout.splitlines() if line.startswith("go on with:"))
    assert "FLEET_OUTPUT_ROOTS=" in hint

    # The hint, pasted from another folder: a fleet whose workers may write the demo's outputs.
    started = _run_hint(hint, env, elsewhere)
    assert started.returncode == 0, started.stdout + started.stderr
    assert json.loads(f.fleet("status", str(demo_dir / "experiment.yaml"), "--json", check=True).stdout)["done"] == 6
    pids = dict(f.state_file()["pids"])

    # The demo again, with that fleet up: it uses it and leaves it up.
    again = subprocess.run([sys.executable, "-m", "fleet", "demo", "image", "--dir", str(demo_dir)],
                           env={**env, "FLEET_OUTPUT_ROOTS": json.dumps([str(demo_dir)])}, cwd=elsewhere,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "fleet is already up" in again.stdout and "fleet is down" not in again.stdout
    assert "left up" in again.stdout
    assert f.state_file()["pids"] == pids and all(_alive(p) for p in pids.values())

    # A demo folder the running fleet's workers may not write: refused before anything is enqueued.
    outside = subprocess.run([sys.executable, "-m", "fleet", "demo", "image", "--dir", str(elsewhere / "d2")],
                             env={**env, "FLEET_OUTPUT_ROOTS": json.dumps([str(elsewhere / "d2")])}, cwd=elsewhere,
                             capture_output=True, text=True, timeout=300)
    assert outside.returncode == 1 and "may write only under" in outside.stderr, outside.stdout + outside.stderr
    assert shlex.quote(str(demo_dir)) in outside.stderr or str(demo_dir) in outside.stderr
    assert f.state_file()["pids"] == pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
