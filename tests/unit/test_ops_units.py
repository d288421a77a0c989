"""The systemd units and the Slurm script of ops/ agree with the command line they run.

What they promise (docs/ARCHITECTURE.md, "Deploy"): every unit restarts on failure and
nothing lists exit status 3 (a broken worker) as a success; the supervisor's and the
workers' units send SIGTERM to their main process only, and give the supervisor more time
than its grace period plus the give-back; each ExecStart parses with `fleet`'s own options.
`systemd-analyze verify` (ops/verify-units.sh) checks the units' syntax where it is installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fleet import cli

OPS = Path(__file__).resolve().parents[2] / "ops"
UNITS = sorted(OPS.glob("*.service"))


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}} of a unit file (keys may repeat in systemd)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_the_units_are_there() -> None:
    assert {u.name for u in UNITS} >= {"fleet.service", "fleet-redis.service", "fleet-flower.service",
                                       "fleet-metrics.service", "fleet-worker@.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_each_unit_restarts_on_failure_and_a_broken_worker_counts_as_one(unit: Path) -> None:
    svc = parse_unit(unit)["Service"]
    assert svc["Restart"] == ["on-failure"]
    for key in ("SuccessExitStatus", "RestartPreventExitStatus"):
        assert "3" not in " ".join(svc.get(key, [])).split()


@pytest.mark.parametrize("unit", [u for u in UNITS if u.name.startswith("fleet") and "redis" not in u.name],
                         ids=lambda p: p.name)
def test_each_fleet_command_parses(unit: Path) -> None:
    argv = shlex.split(parse_unit(unit)["Service"]["ExecStart"][0].replace("%i", "0"))
    if argv[0].endswith("/python"):
        assert argv[1:3] == ["-m", "workers.flower"]
        return
    assert argv[0].endswith("/fleet")
    sub = cli.main.commands[argv[1]]
    sub.make_context(argv[1], argv[2:])  # click.UsageError if an option is unknown or malformed


def test_the_supervisor_unit_stops_gracefully() -> None:
    svc = parse_unit(OPS / "fleet.service")["Service"]
    argv = shlex.split(svc["ExecStart"][0])
    assert argv[1:3] == ["up", "--foreground"]
    grace = float(argv[argv.index("--grace-s") + 1])
    assert svc["KillMode"] == ["mixed"]  # SIGTERM to the supervisor only: it stops its workers itself
    # The supervisor waits grace_s, then 10 s for the give-back, before it kills a worker.
    assert seconds(svc["TimeoutStopSec"][0]) >= grace + 10 + 10


def test_the_worker_unit_signals_the_worker_only() -> None:
    svc = parse_unit(OPS / "fleet-worker@.service")["Service"]
    assert svc["KillMode"] == ["mixed"] and svc["KillSignal"] == ["SIGTERM"]


def test_the_slurm_script_runs_the_supervisor_in_the_foreground() -> None:
    text = (OPS / "slurm-workers.sbatch").read_text()
    assert "fleet up --foreground" in text
    m = re.search(r"#SBATCH --signal=B:TERM@(\d+)", text)
    assert m and int(m.group(1)) > 60  # time before the limit for the grace period and the give-back
    assert subprocess.run(["bash", "-n", str(OPS / "slurm-workers.sbatch")]).returncode == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_no_fault() -> None:
    r = subprocess.run([str(OPS / "verify-units.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
