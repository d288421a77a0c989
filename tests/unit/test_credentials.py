"""Generated secrets (mode 0600, created once, reused), URL masking, and the settings that use them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fleet.credentials import REDIS_PASSWORD_FILE, ensure_secret, mask_url, read_secret, with_password
from fleet.errors import ConfigError
from fleet.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("FLEET_"):
            monkeypatch.delenv(k)


def test_a_secret_is_made_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "x.password"
    assert read_secret(path) is None
    old = os.umask(0)  # even a permissive umask gives 0600
    try:
        first = ensure_secret(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32
    assert ensure_secret(path) == first == read_secret(path)
    assert [p.name for p in path.parent.iterdir()] == ["x.password"]  # no temporary file left


def test_a_secret_others_can_read_or_an_empty_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.password"
    path.write_text("s3cret\n")
    path.chmod(0o640)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 640\).*chmod 600") as e:
        ensure_secret(path)
    assert "s3cret" not in str(e.value)
    path.write_text("")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_secret(path)


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://alice:p%40ss@h:6379/0", "redis://alice:***@h:6379/0"),
    ("redis://pw@h/0", "redis://***@h/0"),
    ("rediss://u:pw@h:1/2?ssl_cert_reqs=none", "rediss://u:***@h:1/2?ssl_cert_reqs=none"),
    ("redis://h:6379/0", "redis://h:6379/0"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_with_password() -> None:
    assert with_password("redis://127.0.0.1:6399/0", "abc") == "redis://:abc@127.0.0.1:6399/0"
    assert with_password("redis://127.0.0.1:6399/0", None) == "redis://127.0.0.1:6399/0"


def test_the_embedded_broker_url_carries_the_state_folders_password(tmp_path: Path) -> None:
    s = load_settings(state_dir=str(tmp_path), embedded_redis_port=6411)
    assert s.effective_broker_url == "redis://127.0.0.1:6411/0"  # before the first `fleet up`
    pw = ensure_secret(tmp_path / REDIS_PASSWORD_FILE)
    assert s.effective_broker_url == f"redis://:{pw}@127.0.0.1:6411/0"
    configured = load_settings(state_dir=str(tmp_path), broker_url="redis://:other@h:1/0")
    assert configured.effective_broker_url == "redis://:other@h:1/0"


def test_flower_login_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.flower_user, s.flower_password) == ("fleet", None)
    monkeypatch.setenv("FLEET_FLOWER_PASSWORD", "hunter2")
    s = load_settings()
    assert s.flower_password == "hunter2" and "hunter2" not in repr(s)
    with pytest.raises(ConfigError, match="flower_user: .*must not contain"):
        load_settings(flower_user="a:b")
    with pytest.raises(ConfigError, match="flower_password: .*must not contain ','"):
        load_settings(flower_password="a,b")
