"""What a new user's slips get (found by trying fleet as one, on inputs of no fixture): one
line naming the file and the fault, a non-zero exit, nothing published and no folder made;
and what reads back as documented."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from fleet.contract import queue_name
from fleet.priority import queue_length
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration


def commands_exp(folder: Path, name: str | None = "cmds", output: str | None = "out", gpus: int = 0,
                 file: str = "experiment.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc: dict = {"kind": "commands", "commands": [{"cmd": "echo hi", "gpus": gpus}, {"cmd": "echo ho", "gpus": gpus}]}
    if name is not None:
        doc["name"] = name
    if output is not None:
        doc["output"] = output
    path = folder / file
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def one_line_error(f: Fleet, *args: str, **env: str) -> str:
    r = f.fleet(*args, **env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleet: error: "), r.stderr
    return lines[0]


def nothing_published(f: Fleet) -> bool:
    return f.client.hlen(f.keys.queued) == 0 and queue_length(f.client, queue_name(f.namespace, "gpu")) == 0


@pytest.mark.parametrize("name", ["../../escape", "/etc/x", "a/b", "..", "tab\there"])
def test_a_name_that_is_not_one_folder_name_is_refused_and_makes_nothing(fleet_ns: Fleet, tmp_path: Path,
                                                                         name: str) -> None:
    exp = commands_exp(tmp_path / "e", name=name, output=None)
    line = one_line_error(fleet_ns, "enqueue", str(exp), "--dry-run", FLEET_OUTPUT_DIR=str(tmp_path / "root"))
    assert str(exp) in line and "name" in line
    assert not (tmp_path / "root").exists() and not (tmp_path / "escape").exists()
    assert nothing_published(fleet_ns)


def test_a_dry_run_or_a_refused_enqueue_creates_no_output_folder(fleet_ns: Fleet, tmp_path: Path) -> None:
    exp = commands_exp(tmp_path / "e", output="deep/out")
    r = fleet_ns.fleet("enqueue", str(exp), "--dry-run", "--json", check=True)
    assert len(json.loads(r.stdout)["would_enqueue"]) == 2
    assert not (tmp_path / "e" / "deep").exists()
    # Refused after planning (a group that is not there): no folder either.
    line = one_line_error(fleet_ns, "enqueue", str(exp), "--group", "nosuch")
    assert "'nosuch'" in line and str(exp) in line
    assert not (tmp_path / "e" / "deep").exists() and nothing_published(fleet_ns)
    fleet_ns.fleet("enqueue", str(exp), check=True)
    assert (tmp_path / "e" / "deep" / "out").is_dir()


def test_an_output_outside_the_allowed_roots_is_refused_at_enqueue(fleet_ns: Fleet, tmp_path: Path) -> None:
    exp = commands_exp(tmp_path / "e", output=str(tmp_path / "elsewhere"))
    line = one_line_error(fleet_ns, "enqueue", str(exp), FLEET_OUTPUT_ROOTS=json.dumps([str(tmp_path / "allowed")]))
    assert "outside the folders outputs may be written under" in line and str(exp) in line
    assert not (tmp_path / "elsewhere").exists() and nothing_published(fleet_ns)


def test_a_second_file_under_a_name_another_holds_is_refused(fleet_ns: Fleet, tmp_path: Path) -> None:
    first = commands_exp(tmp_path / "a", name=None)  # both named by their file: "experiment"
    second = commands_exp(tmp_path / "b", name=None)
    fleet_ns.fleet("enqueue", str(first), check=True)
    line = one_line_error(fleet_ns, "enqueue", str(second))
    assert str(first) in line and str(second) in line and "'experiment'" in line
    fleet_ns.fleet("enqueue", str(first), check=True)  # the same file again: fine
    os.rename(tmp_path / "a", tmp_path / "moved")  # the first one moved: the same experiment
    fleet_ns.fleet("enqueue", str(tmp_path / "moved" / "experiment.yaml"), check=True)


def test_control_of_a_name_never_enqueued_is_refused(fleet_ns: Fleet, tmp_path: Path) -> None:
    for cmd in ("cancel", "pause", "resume"):
        line = one_line_error(fleet_ns, cmd, "nosuch")
        assert "nosuch: no experiment of that name" in line
    assert json.loads(fleet_ns.fleet("status", "--json", check=True).stdout)["paused_experiments"] == []
    exp = commands_exp(tmp_path / "e", name="real")
    fleet_ns.fleet("enqueue", str(exp), check=True)
    assert fleet_ns.fleet("pause", "real", check=True).returncode == 0
    assert fleet_ns.fleet("resume", "real", check=True).returncode == 0


def test_a_gpu_command_on_a_fleet_without_gpus_is_refused(fleet_ns: Fleet, tmp_path: Path) -> None:
    from fleet.contract import WorkerEntry

    exp = commands_exp(tmp_path / "e", gpus=1)
    entry = WorkerEntry(name="cpu0", hostname="somewhere", pid=1, gpus=(), host_gpus=0, queues=[], seen_at=0.0)
    fleet_ns.client.hset(fleet_ns.keys.workers, "cpu0@somewhere", entry.model_dump_json())
    line = one_line_error(fleet_ns, "enqueue", str(exp))
    assert "needs 1 GPU(s), but no host of this fleet has a GPU" in line and nothing_published(fleet_ns)


@pytest.mark.parametrize(("env", "fault"), [
    ({"FLEET_OUTPUT_ROOTS": "/tmp"}, '"output_roots"'),
    ({"FLEET_PLACEMENT": "{"}, '"placement"'),
    ({"FLEET_BROKER_URL": "notaurl"}, "broker_url: Value error, must be a Redis URL"),
])
def test_a_bad_setting_in_the_environment_is_one_line(fleet_ns: Fleet, env: dict, fault: str) -> None:
    assert fault in one_line_error(fleet_ns, "status", **env)


def test_a_failed_commands_output_cannot_drive_the_terminal() -> None:
    from fleet.cli_view import shown

    assert shown("a\x1b[31mred\x07 [b]x[/b]\nnext\tcol") == "a\\x1b[31mred\\x07 \\[b]x\\[/b]\nnext\tcol"


def test_fleet_gpus_json_reads_back_as_a_fake_inventory(fleet_ns: Fleet, tmp_path: Path) -> None:
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps([{"index": 0, "uuid": "GPU-fake-0", "name": "Fake H100", "memory_total_mib": 81559,
                                 "memory_used_mib": 0, "memory_free_mib": 81000, "utilization_pct": 0}]),
                    encoding="utf-8")
    out = json.loads(fleet_ns.fleet("gpus", "--json", check=True, FLEET_FAKE_GPUS=str(gpus)).stdout)["gpus"]
    assert "fleet_workers" in out[0]
    again = tmp_path / "again.json"
    again.write_text(json.dumps(out), encoding="utf-8")
    back = json.loads(fleet_ns.fleet("gpus", "--json", check=True, FLEET_FAKE_GPUS=str(again)).stdout)["gpus"]
    assert [(g["index"], g["name"], g["memory_total_mib"]) for g in back] == [(0, "Fake H100", 81559)]
