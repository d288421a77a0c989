"""Settings: precedence, unknown keys rejected, one-line errors naming the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.errors import ConfigError
from fleet.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("FLEET_"):
            monkeypatch.delenv(k)


def test_defaults_are_safe_for_long_gpu_tasks() -> None:
    s = load_settings()
    assert s.visibility_timeout_s >= 6 * 3600
    assert s.broker_url is None and s.effective_broker_url == s.embedded_broker_url
    assert s.logs == s.state_dir / "logs"


def test_precedence_override_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("namespace: from-file\nflower_port: 6001\ntorch_threads: 3\n")
    monkeypatch.setenv("FLEET_FLOWER_PORT", "6002")
    s = load_settings(cfg, torch_threads=4)
    assert (s.namespace, s.flower_port, s.torch_threads) == ("from-file", 6002, 4)
    monkeypatch.setenv("FLEET_CONFIG", str(cfg))
    assert load_settings().namespace == "from-file"


def test_json_config(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.json"
    cfg.write_text('{"broker_url": "redis://h:1/2", "state_dir": "~/x"}')
    s = load_settings(cfg)
    assert s.broker_url == "redis://h:1/2" and "~" not in str(s.state_dir)


@pytest.mark.parametrize(
    "text, fault",
    [
        ("visibilty_timeout_s: 10\n", "visibilty_timeout_s: Extra inputs are not permitted"),
        ("visibility_timeout_s: 10\n", "visibility_timeout_s: Input should be greater than or equal to 60"),
        ("flower_port: [1\n", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, fault: str) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert str(e.value).startswith(str(cfg)) and fault in str(e.value) and "\n" not in str(e.value)


def test_unknown_env_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_BROKER", "redis://x")
    with pytest.raises(ConfigError, match="unknown fleet setting FLEET_BROKER"):
        load_settings()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_the_example_config_in_ops_loads() -> None:
    s = load_settings(Path(__file__).resolve().parents[2] / "ops" / "fleet.example.yaml")
    assert s.placement.reserve == 1 and s.placement.assignment == {"camera_motion": [0]}
    assert s.memory_classes_mib == [40000, 81000]


def test_nested_placement_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_PLACEMENT__RESERVE", "2")
    monkeypatch.setenv("FLEET_PLACEMENT__EXCLUDE_GPUS", "[1, 3]")
    s = load_settings()
    assert (s.placement.reserve, s.placement.exclude_gpus) == (2, [1, 3])
    monkeypatch.setenv("FLEET_PLACEMENT__RESERVED", "2")
    with pytest.raises(ConfigError, match="FLEET_PLACEMENT__RESERVED"):
        load_settings()
