"""The done check's verified folders (fleet.output_files.in_place), through a real worker on a
real Redis: a folder whose outputs were all verified is trusted while it is unchanged (no stat
per file), a deleted output is seen at once, even right after the verification, and
``--verify-outputs`` sees a file changed in place, which the trusted folder does not."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fleet.output_files import CACHE_FROM, RACY_S
from tests.integration.conftest import Fleet, wait_for
from tests.integration.test_compact_queue import KIND_ENV, touch_exp

pytestmark = pytest.mark.integration


def enqueue(f: Fleet, exp: Path, *args: str) -> dict:
    return json.loads(f.fleet("enqueue", str(exp), "--json", *args, check=True, **KIND_ENV).stdout)


def settled(folder: Path) -> bool:
    """The folder has not changed for RACY_S (so a check now may remember it)."""
    st = os.stat(folder)
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > (RACY_S + 0.1) * 1e9


def test_a_verified_folder_is_trusted_until_it_changes(fleet_ns: Fleet, tmp_path: Path) -> None:
    from fleet.experiment import load_experiment
    from fleet.kinds import KindModules
    from fleet.planner import plan_experiment
    from fleet.records import classify

    f = fleet_ns
    n = CACHE_FROM + 4
    exp = touch_exp(tmp_path, "many", [f"s{i:02d}" for i in range(n)])
    out = exp.parent / "out"
    kinds = {"touch": KindModules(planner="tests.kinds.touch", job="tests.kinds.touch")}
    plan = plan_experiment(load_experiment(exp, kinds=kinds), None, None, kinds)
    ids, outs = [s.sample_id for s in plan.samples], [s.output_path for s in plan.samples]

    def check():  # how the done check of a re-run sees the outputs now
        return classify(f.client, f.keys, ids, outs).files

    f.start_worker(**KIND_ENV)
    assert enqueue(f, exp)["enqueued"] == n
    wait_for(lambda: f.done_count() == n and f.client.hlen(f.keys.running) == 0, 60, "every sample done")
    wait_for(lambda: settled(out), 10, "the output folder unchanged for RACY_S")

    # Verified: every file stat'ed, the folder remembered; then trusted without a stat per file.
    assert enqueue(f, exp) == {"planned": n, "done": n, "in_flight": 0, "enqueued": 0}
    assert f.client.hexists(f.keys.verified_folders, str(out))
    files = check()
    assert (files.trusted, files.trusted_folders, files.stat_calls) == (n, 1, 0)

    # A deleted output, right after the verification: exactly that sample is not done.
    victim = out / "s07.txt"
    victim.unlink()
    files = check()
    assert files.trusted == 0 and files.stat_calls == n
    dry = enqueue(f, exp, "--dry-run")
    assert (dry["done"], [s["output"] for s in dry["would_enqueue"]]) == (n - 1, [str(victim)])
    assert enqueue(f, exp)["enqueued"] == 1
    wait_for(lambda: victim.exists() and f.client.hlen(f.keys.queued) == 0 and f.client.hlen(f.keys.running) == 0,
             60, "the deleted sample made again")
    wait_for(lambda: settled(out), 10, "the output folder unchanged for RACY_S")
    assert enqueue(f, exp)["done"] == n  # verified again (the worker's rename changed the folder)
    assert check().trusted == n

    # A file truncated in place leaves its folder as it was: trusted, until --verify-outputs.
    torn = out / "s11.txt"
    with open(torn, "r+b") as fh:
        fh.truncate(1)
    assert check().trusted == n
    dry = enqueue(f, exp, "--dry-run", "--verify-outputs")
    assert [s["output"] for s in dry["would_enqueue"]] == [str(torn)]
    status = json.loads(f.fleet("status", str(exp), "--json", "--verify-outputs", check=True, **KIND_ENV).stdout)
    assert (status["done"], status["queued"]) == (n - 1, 0)
    assert not f.client.hexists(f.keys.verified_folders, str(out))  # forgotten: the next check stats every file
    assert check().stat_calls == n
