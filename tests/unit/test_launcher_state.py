"""`fleet up` over a state file it did not leave as it is: a supervisor killed under a fleet
that is otherwise up is said so (not "already up"), and a state file of another shape is
read as none (not a traceback)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleet.errors import ConfigError
from fleet.launcher import _state_file, read_state, up, write_json_atomic
from fleet.settings import load_settings


def settings_at(tmp_path: Path):
    return load_settings(None, state_dir=tmp_path / "state", broker_url="redis://127.0.0.1:1/0")


def test_a_dead_supervisor_under_a_live_fleet_is_named(tmp_path: Path) -> None:
    settings = settings_at(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_json_atomic(_state_file(settings), {"pids": {"supervisor": gone.pid, "flower": os.getpid()},
                                              "broker_url": "redis://127.0.0.1:1/0", "flower_url": "http://x"})
    with pytest.raises(ConfigError, match=rf"supervisor \(pid {gone.pid}\) has exited, flower still runs; "
                                          r"run `fleet down`, then `fleet up`"):
        up(settings)


@pytest.mark.parametrize("text", ["[]", '{"pids": null}', '{"pids": {"supervisor": "abc"}}', '"x"'])
def test_a_state_file_of_another_shape_reads_as_none(tmp_path: Path, text: str) -> None:
    settings = settings_at(tmp_path)
    _state_file(settings).parent.mkdir(parents=True, exist_ok=True)
    _state_file(settings).write_text(text)
    assert read_state(settings).get("pids", {}) == {}
