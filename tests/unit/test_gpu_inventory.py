"""The GPU inventory: NVML without a GPU, NVML fields the driver lacks, and the fake file."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleet import gpu_inventory
from fleet.errors import ConfigError
from fleet.gpu_inventory import (
    FAKE_GPUS_ENV,
    FakeInventory,
    GpuSnapshot,
    NvmlInventory,
    inventory_from_env,
    snapshots_to_json,
)

MIB = 1024 * 1024
H100 = {"index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559,
        "memory_used_mib": 1, "memory_free_mib": 81000}


def write_atomic(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


# ---- NVML -----------------------------------------------------------------------------------
def test_nvml_on_a_host_without_gpu_returns_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has the nvidia-ml-py package but no driver: nvmlInit fails -> no GPUs.
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this host has an NVIDIA driver")
    with NvmlInventory() as inv:
        assert inv.snapshot() == []
        assert inv.snapshot() == []  # and again: a failed init leaves nothing half-open


def test_nvml_without_the_package_returns_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(gpu_inventory, "_load_pynvml", missing)
    assert NvmlInventory().snapshot() == []


class FakeNvml:
    """Enough of pynvml for one GPU whose driver lacks power readings and process names."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, pid: int) -> None:
        self.pid, self.calls = pid, []

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        if h == 1:
            raise self.NVMLError("Unknown Error")  # this GPU is left out, the other is kept
        return SimpleNamespace(total=81559 * MIB, used=20000 * MIB + 5, free=61000 * MIB)

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return b"GPU-1234"  # old pynvml releases return bytes

    def nvmlDeviceGetName(self, h: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return 700000

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 41

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=self.pid, usedGpuMemory=None), SimpleNamespace(pid=2**22 + 1, usedGpuMemory=3 * MIB)]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        raise self.NVMLError("Not Supported")

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        raise self.NVMLError("No Permission")


def test_nvml_unsupported_fields_are_none_and_users_come_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(os.getpid())
    monkeypatch.setattr(gpu_inventory, "_load_pynvml", lambda: fake)
    inv = NvmlInventory()
    [snap] = inv.snapshot()
    assert (snap.index, snap.uuid, snap.memory_total_mib, snap.memory_used_mib, snap.memory_free_mib) == (
        0, "GPU-1234", 81559, 20000, 61000)
    assert (snap.utilization_pct, snap.power_w, snap.power_limit_w, snap.temperature_c) == (37, None, 700.0, 41)
    me, gone = snap.processes
    assert (me.pid, me.used_mib, me.user) == (os.getpid(), None, pwd.getpwuid(os.getuid()).pw_name)
    assert me.name == Path(f"/proc/{os.getpid()}/comm").read_text().strip()  # NVML refused: /proc's name
    assert (gone.used_mib, gone.user, gone.name) == (3, None, None)  # a pid /proc does not have
    inv.snapshot()
    inv.close()
    assert fake.calls == ["init", "shutdown"]  # initialised once, lazily; shut down on close


# ---- fake inventory ------------------------------------------------------------------------------
def test_fake_inventory_sees_file_changes_on_next_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_atomic(path, [H100])
    inv = FakeInventory(path)
    [first] = inv.snapshot()
    assert (first.memory_free_mib, first.processes, first.utilization_pct) == (81000, (), None)
    second_gpu = {**H100, "index": 1, "uuid": "GPU-bbbb", "utilization_pct": 55,
                  "processes": [{"pid": 12, "used_mib": 2048, "user": "alice", "name": "python"}]}
    write_atomic(path, [second_gpu, {**H100, "memory_used_mib": 40000, "memory_free_mib": 41000}])
    snaps = inv.snapshot()
    assert [s.index for s in snaps] == [0, 1]  # sorted by index whatever the file's order
    assert snaps[0].memory_used_mib == 40000 and snaps[1].processes[0].user == "alice"


def test_fake_round_trips_the_json_form(tmp_path: Path) -> None:
    snap = GpuSnapshot.model_validate({**H100, "power_w": 71.5, "processes": [{"pid": 3, "used_mib": None}]})
    path = tmp_path / "gpus.json"
    write_atomic(path, snapshots_to_json([snap]))
    assert FakeInventory(path).snapshot() == [snap]
    dumped = json.loads(snapshots_to_json([snap]))[0]
    assert dumped["processes"] == [{"pid": 3, "used_mib": None, "user": None, "name": None}]


@pytest.mark.parametrize(("content", "fault"), [
    ("[{\"index\": 0,", "not valid JSON"),
    ({"index": 0}, "must hold a list of GPU objects, not dict"),
    ([{k: v for k, v in H100.items() if k != "memory_total_mib"}], "GPU entry 0: memory_total_mib: Field required"),
    ([H100, {**H100, "colour": "red"}], "GPU entry 1: colour: Extra inputs are not permitted"),
    ([{**H100, "memory_used_mib": 90000}], "exceed total"),
    ([H100, H100], "GPU index 0 appears more than once"),
])
def test_malformed_fake_file_gives_one_line_config_error_naming_the_file(tmp_path: Path, content: object,
                                                                         fault: str) -> None:
    path = tmp_path / "bad.json"
    write_atomic(path, content)
    with pytest.raises(ConfigError) as e:
        FakeInventory(path).snapshot()
    assert str(e.value).startswith(f"{path}: ") and fault in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_fake_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read fake GPU file"):
        FakeInventory(tmp_path / "nope.json").snapshot()


def test_inventory_from_env(tmp_path: Path) -> None:
    chosen = inventory_from_env({FAKE_GPUS_ENV: str(tmp_path / "g.json")})
    assert isinstance(chosen, FakeInventory) and chosen.path == tmp_path / "g.json"
    assert isinstance(inventory_from_env({}), NvmlInventory)
    assert isinstance(inventory_from_env({FAKE_GPUS_ENV: ""}), NvmlInventory)


def test_fleet_modules_import_neither_torch_nor_nvml() -> None:
    code = ("import sys, fleet.gpu_inventory, fleet.placement; "
            "print(sorted(m for m in ('torch', 'diffsynth', 'workers', 'pynvml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
