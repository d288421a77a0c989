"""Redis killed (SIGKILL) and restarted mid-run, with append-only persistence: every
sample is done once, none is lost, none is half-written."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from fleet.contract import CompletionRecord
from tests.integration.conftest import Fleet, wait_for
from tests.media import read_frames

pytestmark = pytest.mark.integration


def test_redis_killed_mid_run(fleet_ns: Fleet, own_redis, video_experiment) -> None:
    url = own_redis()
    import redis

    fleet_ns.url = url
    fleet_ns.client = redis.Redis.from_url(url)
    exp = video_experiment(videos={"c": [f"v{i}" for i in range(4)]}, prompts={"*": ["a", "b"]}, steps=8,
                           width=96, height=96)
    assert fleet_ns.enqueue(exp)["enqueued"] == 8
    fleet_ns.start_worker(0), fleet_ns.start_worker(1)
    wait_for(lambda: fleet_ns.done_count() >= 2, 120, "two samples done")

    server = own_redis.procs[-1]  # type: ignore[attr-defined]
    assert fleet_ns.done_count() < 8  # the kill lands mid-run
    server.send_signal(signal.SIGKILL)
    server.wait()
    own_redis()  # same port, same append-only file

    wait_for(lambda: _done(fleet_ns) == 8, 240, "every sample done after the restart")
    recs = [CompletionRecord.model_validate_json(v) for v in fleet_ns.client.hvals(fleet_ns.keys.records)]
    assert len(recs) == 8
    out = exp.parent / "out"
    finals = sorted(out.rglob("*.mp4"))
    assert len([p for p in finals if not p.name.startswith(".")]) == 8
    for rec in recs:
        assert read_frames(Path(rec.output_path)).shape == (5, 96, 96, 3)
    # No sample ran on two workers at once: per sample, its runs (start .. done) never overlap.
    runs: dict[str, list[tuple[str, str]]] = {}
    matched = {"start": 0, "done": 0}
    for log in fleet_ns.tmp.glob("worker*.log"):
        starts: dict[str, str] = {}
        for line in log.read_text(errors="replace").splitlines():
            # "[<sample id>] " after the pid: the running sample's tag (workers/log_tags.py)
            m = re.match(r"(\S+ \S+) INFO fleet.worker \[\d+\] (?:\[\w{32}\] )?(start|done) (\w{32})", line)
            if m:
                t, what, sid = m.groups()
                matched[what] += 1
                if what == "start":
                    starts[sid] = t
                elif sid in starts:
                    runs.setdefault(sid, []).append((starts.pop(sid), t))
    # A changed log format must not turn the overlap check below into a silent pass.
    assert matched["start"] and matched["done"], (
        f"no worker log line matched the start/done pattern {matched}; has the runner's log format changed?\n"
        + "\n".join(f"{log.name}: {log.read_text(errors='replace')[-1500:]}" for log in fleet_ns.tmp.glob("worker*.log")))
    for sid, spans in runs.items():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (sid, spans)
    assert fleet_ns.client.hlen(fleet_ns.keys.running) == 0


def _done(f: Fleet) -> int:
    try:
        return f.done_count()
    except Exception:
        return -1


def test_a_message_redis_lost_is_published_again(fleet_ns: Fleet, video_experiment) -> None:
    # Redis killed between a worker's BRPOP and its reply drops that message (kombu's Redis
    # transport has no reliable pop); here the message is popped and thrown away on purpose.
    exp = video_experiment(videos={"c": ["a", "b"]}, prompts={"*": ["x"]})
    assert fleet_ns.enqueue(exp)["enqueued"] == 2
    from fleet.contract import queue_name
    from fleet.priority import NORMAL_STEP, priority_list

    assert fleet_ns.client.rpop(priority_list(queue_name(fleet_ns.namespace, "gpu"), NORMAL_STEP)) is not None
    fleet_ns.start_worker(0)
    wait_for(lambda: fleet_ns.done_count() == 2, 120, "both samples, the lost one included")
    log = next(fleet_ns.tmp.glob("worker0-*.log")).read_text(errors="replace")
    assert "its message was lost" in log
    assert fleet_ns.client.hlen(fleet_ns.keys.payloads) == 0 and fleet_ns.client.hlen(fleet_ns.keys.lost_suspects) == 0
