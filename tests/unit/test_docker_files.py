"""docker/: the compose file's promises (Redis password from a secret, persistence, no eviction;
Flower's login; one GPU per worker; one output volume), the Dockerfiles' build arguments, and
the entrypoint that turns secret files into the environment. Building and running the images is
docker/check.sh's (too slow for CI); here only the files and the shell scripts, in milliseconds."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def _env(svc: dict) -> dict:
    return svc.get("environment") or {}


def test_redis_service_takes_its_password_from_a_secret_and_nothing_holds_one() -> None:
    c = _compose()
    redis = c["services"]["redis"]
    assert redis["command"] == ["fleet-redis"]
    assert "redis_password" in redis["secrets"]
    assert c["secrets"]["redis_password"] == {"file": "./secrets/redis_password"}
    for name, svc in c["services"].items():
        url = _env(svc).get("FLEET_BROKER_URL")
        if url is not None:
            assert "@" not in url, f"{name}: a password in FLEET_BROKER_URL"
            assert "redis_password" in svc["secrets"], f"{name} reaches Redis without its password"
    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    assert not re.search(r"requirepass|PASSWORD\s*:", text)
    # The script Redis runs: append-only, no eviction, the password on stdin only.
    script = (DOCKER / "redis.sh").read_text(encoding="utf-8")
    for flag in ("--appendonly yes", "--maxmemory-policy noeviction"):
        assert flag in script
    assert "requirepass $password" in script and "--requirepass" not in script


def test_redis_disables_what_the_embedded_redis_disables() -> None:
    from fleet.launcher import EMBEDDED_REDIS_DISABLED

    script = (DOCKER / "redis.sh").read_text(encoding="utf-8")
    listed = re.search(r'^DISABLED="([^"]*)"', script, re.M)
    assert listed and tuple(listed.group(1).split()) == EMBEDDED_REDIS_DISABLED


def test_flower_and_metrics_ask_for_a_login() -> None:
    services = _compose()["services"]
    for name in ("flower", "metrics"):
        assert "flower_password" in services[name]["secrets"], name
    assert services["flower"]["command"][:3] == ["python", "-m", "workers.flower"]  # /metrics behind the login too
    assert services["metrics"]["environment"]["FLEET_METRICS_ADDRESS"] == "0.0.0.0"
    for name in ("redis", "flower", "metrics"):  # published on the host's loopback unless told otherwise
        assert all(p.startswith("${") and ":-127.0.0.1:" in p for p in services[name]["ports"]), name


def test_one_gpu_per_worker_and_one_output_volume() -> None:
    services = _compose()["services"]
    gpu = {n: s for n, s in services.items() if n.startswith("worker-gpu")}
    assert len(gpu) >= 2
    devices = []
    for name, svc in gpu.items():
        (res,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert res["capabilities"] == ["gpu"] and len(res["device_ids"]) == 1, name
        devices.append(res["device_ids"][0])
        assert svc["command"] == ["fleet", "worker", "--gpu", "0"], name  # its one GPU is index 0 inside
    assert len(set(devices)) == len(devices)
    cpu = {n: s for n, s in services.items() if n.startswith("worker-cpu")}
    assert cpu and all(s["profiles"] == ["cpu"] and s["command"] == ["fleet", "worker", "--cpu"] for s in cpu.values())
    mounts = {n: s["volumes"] for n, s in services.items() if n.startswith("worker-") or n == "cli"}
    assert all(v == ["${OUTPUT_VOLUME:-output}:/data"] for v in mounts.values()), mounts
    assert all(_env(services[n])["FLEET_OUTPUT_ROOTS"] == '["/data"]' for n in mounts)


def test_dockerfiles_take_a_base_image_and_the_worker_pins_torch_as_pyproject() -> None:
    pins = set(re.findall(r'"((?:torch|torchvision)==[^"]+)"', (ROOT / "pyproject.toml").read_text()))
    assert len(pins) == 2
    for name in ("Dockerfile.control", "Dockerfile.worker"):
        lines = [ln for ln in (DOCKER / name).read_text().splitlines() if ln and not ln.startswith("#")]
        assert lines[0].startswith("ARG BASE_IMAGE=") and lines[1] == "FROM ${BASE_IMAGE}", name
        assert 'ENTRYPOINT ["fleet-entrypoint"]' in lines and "USER fleet" in lines, name
    worker = (DOCKER / "Dockerfile.worker").read_text()
    found = re.search(r'^ARG TORCH_PACKAGES="([^"]*)"', worker, re.M)
    assert found and set(found.group(1).split()) == pins
    assert 'pip install ".[worker]"' in worker
    control = [ln for ln in (DOCKER / "Dockerfile.control").read_text().splitlines() if not ln.startswith("#")]
    assert not any("[worker]" in ln or "torch" in ln for ln in control)


def test_the_build_context_holds_what_the_dockerfiles_copy() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {ln[1:] for ln in ignore if ln.startswith("!")}
    copied = set()
    for name in ("Dockerfile.control", "Dockerfile.worker"):
        for ln in (DOCKER / name).read_text().splitlines():
            if ln.startswith("COPY "):
                copied.update(ln.split()[1:-1])
    assert copied and copied <= kept, copied - kept


def _run_entrypoint(tmp_path: Path, secrets: dict[str, str], env: dict[str, str]) -> subprocess.CompletedProcess:
    folder = tmp_path / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in secrets.items():
        (folder / name).write_text(value)
    base = {"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(folder)}
    return subprocess.run(["sh", str(ENTRYPOINT), "env"], env={**base, **env}, capture_output=True, text=True,
                          timeout=10)


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_entrypoint_puts_the_secrets_into_the_environment(tmp_path: Path) -> None:
    r = _run_entrypoint(tmp_path, {"redis_password": "s3cret-A_b.c~\n", "flower_password": "fl0wer\n"},
                        {"FLEET_BROKER_URL": "redis://redis:6379/0", "FLEET_FLOWER_USER": "ops"})
    assert r.returncode == 0, r.stderr
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert env["FLEET_BROKER_URL"] == "redis://:s3cret-A_b.c~@redis:6379/0"
    assert env["REDISCLI_AUTH"] == "s3cret-A_b.c~"
    assert env["FLEET_FLOWER_PASSWORD"] == "fl0wer"
    assert env["FLOWER_BASIC_AUTH"] == "ops:fl0wer"


def test_entrypoint_keeps_an_url_with_credentials_and_runs_without_secrets(tmp_path: Path) -> None:
    r = _run_entrypoint(tmp_path, {"redis_password": "other"}, {"FLEET_BROKER_URL": "rediss://:mine@h:6380/1"})
    assert r.returncode == 0 and "FLEET_BROKER_URL=rediss://:mine@h:6380/1" in r.stdout.splitlines()
    r = _run_entrypoint(tmp_path / "none", {}, {"FLEET_BROKER_URL": "redis://redis:6379/0"})
    assert r.returncode == 0
    assert "FLEET_BROKER_URL=redis://redis:6379/0" in r.stdout.splitlines() and "FLOWER_BASIC_AUTH" not in r.stdout


@pytest.mark.parametrize("value", ["has space", "a@b", "", "p:w"])
def test_entrypoint_refuses_a_secret_it_cannot_put_in_an_url(tmp_path: Path, value: str) -> None:
    r = _run_entrypoint(tmp_path, {"redis_password": value}, {"FLEET_BROKER_URL": "redis://redis:6379/0"})
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"fleet-entrypoint: {tmp_path / 'secrets' / 'redis_password'}: ")


def test_metrics_listen_where_the_settings_say_and_on_loopback_by_default() -> None:
    from prometheus_client import CollectorRegistry

    from fleet.metrics_server import make_server
    from fleet.settings import FleetSettings

    assert FleetSettings.model_fields["metrics_address"].default == "127.0.0.1"
    server = make_server(CollectorRegistry(), "fleet", "pw", 0, "0.0.0.0")  # the metrics service's setting
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.server_close()
