"""Shell commands through the real fleet (seed 003), with real commands and a fake GPU
inventory: GPU ids and CUDA_VISIBLE_DEVICES, pipes, numbered logs, each error class from a
real failing command, retry counts, refusal by locked workers, and stopping a command's
whole process tree on cancel, on a worker's stop and on its death."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from fleet.contract import CompletionRecord, FailureRecord
from tests.integration.conftest import Fleet, pid_gone, wait_for
from tests.unit.test_commands_file import SEED_003_SECTION_7  # seed 003 §7, as its bash array holds it

pytestmark = pytest.mark.integration


def fake_gpus(path: Path, n: int, free_mib: int = 81000) -> str:
    path.write_text(json.dumps([
        {"index": i, "uuid": f"GPU-fake-{i}", "name": "FAKE", "memory_total_mib": 81559,
         "memory_used_mib": 81559 - free_mib, "memory_free_mib": free_mib, "utilization_pct": 0}
        for i in range(n)]))
    return str(path)


def commands_yaml(root: Path, commands: list[dict], **fields: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "commands.yaml"
    path.write_text(yaml.safe_dump({"kind": "commands", "commands": commands, **fields}, allow_unicode=True))
    return path


def records(f: Fleet) -> dict[str, CompletionRecord]:
    return {r.label.split(":")[0]: r for r in
            (CompletionRecord.model_validate_json(v) for v in f.client.hvals(f.keys.records))}


def failures(f: Fleet) -> dict[str, FailureRecord]:
    return {r.label.split(":")[0]: r for r in
            (FailureRecord.model_validate_json(v) for v in f.client.hvals(f.keys.failed))}


def finished(f: Fleet) -> int:
    """Samples done or failed for good."""
    return f.done_count() + sum(1 for r in failures(f).values() if not r.retryable)


PY = sys.executable


def test_commands_get_their_gpus_logs_and_error_classes(fleet_ns: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "exp"
    (root / "noexec.sh").parent.mkdir(parents=True, exist_ok=True)
    (root / "noexec.sh").write_text("#!/bin/sh\necho never\n")  # not executable: 126
    (root / "oom.py").write_text("import sys\nprint('RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB')\n"
                                 "sys.exit(1)\n")
    cmds = [
        {"name": "one", "cmd": 'echo "gpu ${available_gpu} cvd $CUDA_VISIBLE_DEVICES attempt $FLEET_ATTEMPT" '
                               '| tr a-z A-Z | tee one.txt; echo "$FLEET_WORK_DIR" > work.txt', "mem_gb": 10, "gpus": 1},
        {"name": "two", "cmd": "echo ${available_gpu_0},${available_gpu_1} $CUDA_VISIBLE_DEVICES > two.txt",
         "mem_gb": 30, "gpus": 2},
        {"name": "cpu", "cmd": 'echo "[$CUDA_VISIBLE_DEVICES]" "[${FLEET_BROKER_URL:-unset}]" > cpu.txt', "gpus": 0},
        {"name": "oom", "cmd": f"{PY} oom.py", "gpus": 0},
        {"name": "cuda", "cmd": "echo 'RuntimeError: CUDA error: device-side assert triggered' >&2; exit 1", "gpus": 0},
        {"name": "runtime", "cmd": f"{PY} -c \"raise RuntimeError('shapes do not match')\"", "gpus": 0},
        {"name": "segv", "cmd": f"{PY} -c 'import ctypes; ctypes.string_at(0)'", "gpus": 0},
        {"name": "import", "cmd": f"{PY} -c 'import no_such_module_here'", "gpus": 0},
        {"name": "missing", "cmd": "no-such-command --flag", "gpus": 0},
        {"name": "noexec", "cmd": "./noexec.sh", "gpus": 0},
        {"name": "slow", "cmd": "sleep 30", "gpus": 0, "timeout_s": 1},
    ]
    exp = commands_yaml(root, cmds, retries=0)
    gpus = {"FLEET_FAKE_GPUS": fake_gpus(tmp_path / "gpus.json", 3)}
    locked = fleet_ns.start_named_worker("gpu2s1", "--gpu", "2", "--slot", "1", **gpus)  # not --allow-commands
    fleet_ns.start_named_worker("gpus0-1", "--gpus", "0,1", "--allow-commands", **gpus)
    fleet_ns.start_named_worker("gpu2", "--gpu", "2", "--allow-commands", **gpus)
    assert fleet_ns.enqueue(exp)["enqueued"] == len(cmds)
    wait_for(lambda: finished(fleet_ns) == len(cmds), 120, "every command done or failed")

    done, failed = records(fleet_ns), failures(fleet_ns)
    assert sorted(done) == ["commands[0] (one)", "commands[1] (two)", "commands[2] (cpu)"]
    assert (root / "one.txt").read_text() == "GPU 2 CVD 2 ATTEMPT 1\n"  # the pipe ran, the ids were given
    assert (root / "two.txt").read_text() == "0,1 0,1\n"
    assert (root / "cpu.txt").read_text() == "[] [unset]\n"  # no GPU, and no fleet secrets in its environment
    work = Path((root / "work.txt").read_text().strip())
    assert work.is_dir() and work.name == done["commands[0] (one)"].sample_id
    one = done["commands[0] (one)"]
    assert one.metrics["exit_code"] == 0 and "GPU 2 CVD 2" in str(one.metrics["output_tail"])
    assert "@" in str(one.metrics["enqueued_by"]) and one.gpus == [2]
    # The worker's GPU telemetry (NVML; here the fake inventory) is in every record of a GPU worker.
    assert one.metrics["gpu_mem_mib"] == 81559 - 81000 and one.metrics["gpu_util_pct"] == 0
    assert one.metrics["gpu_samples"] >= 1
    log = Path(str(one.metrics["log"]))
    assert log.name.endswith(".1.log") and "GPU 2 CVD 2" in log.read_text()
    assert json.loads(Path(one.output_path).read_text())["exit_code"] == 0

    expected = {"oom": "CommandOutOfMemory", "cuda": "CudaError", "runtime": "CommandRuntimeError",
                "segv": "SegmentationFault", "import": "CommandImportError", "missing": "CommandNotFound",
                "noexec": "CommandNotExecutable", "slow": "CommandTimeout"}
    got = {k.split("(")[1].rstrip(")"): v for k, v in failed.items()}
    assert {k: v.error_type for k, v in got.items()} == expected
    assert all(v.attempt == 1 and not v.retryable for v in got.values())  # retries: 0
    assert "raise the command's mem_GB" in got["oom"].message and "CUDA out of memory" in got["oom"].message
    assert "exit 127" in got["missing"].message and "command not found" in got["missing"].message
    assert "timed out after 1 s" in got["slow"].message
    assert "@" in str(got["segv"].metrics.get("enqueued_by"))
    entry = fleet_ns.client.hget(fleet_ns.keys.workers, next(k for k in fleet_ns.client.hkeys(fleet_ns.keys.workers)
                                                             if k.startswith(b"gpu2s1@")))
    assert json.loads(entry)["done"] == 0 and json.loads(entry)["failed"] == 0  # the locked worker got none
    assert locked.poll() is None

    # Failure lists: by error type, and as a CSV (seed 002's failed_prompts files, one for the fleet).
    st = json.loads(fleet_ns.fleet("status", str(exp), "--failed", "--json", check=True).stdout)
    assert st["failures_by_type"] == {t: 1 for t in expected.values()} and st["failed"] == 8
    out = tmp_path / "lists" / "failed.csv"
    r = fleet_ns.fleet("status", str(exp), "--export", str(out), check=True)
    assert "wrote 8 failures" in r.stdout
    import csv

    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(x["error_type"] for x in rows) == sorted(expected.values())
    assert all(x["sample_id"] and x["label"].startswith("commands[") for x in rows)
    bad = fleet_ns.fleet("status", str(exp), "--export", str(tmp_path / "failed.txt"))
    assert bad.returncode == 1 and "ending in .csv" in bad.stderr


def test_a_locked_worker_refuses_a_command_with_a_record(fleet_ns: Fleet, tmp_path: Path) -> None:
    exp = commands_yaml(tmp_path / "exp", [{"cmd": "touch pwned", "gpus": 0}])
    # Someone points a locked worker at the commands queue by hand: it still runs nothing.
    fleet_ns.start_named_worker("cpu0", "--cpu", "--queue", f"{fleet_ns.namespace}.q.cmd.gpu")
    assert fleet_ns.enqueue(exp)["enqueued"] == 1
    wait_for(lambda: failures(fleet_ns), 60, "the refusal")
    (rec,) = failures(fleet_ns).values()
    assert rec.error_type == "CommandsNotAllowed" and "--allow-commands" in rec.message and not rec.retryable
    assert not (tmp_path / "exp" / "pwned").exists()


def logs_of(root: Path, name: str) -> list[Path]:
    return sorted((root / "fleet-commands" / "commands" / "logs").glob(f"{name}-*.log"))


def test_retry_counts_and_cancel_stops_a_forever_retry(fleet_ns: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "exp"
    exp = commands_yaml(root, [
        {"name": "twice", "cmd": "exit 3", "gpus": 0, "retries": 2},
        {"name": "never", "cmd": "exit 3", "gpus": 0, "retries": 0},
        {"name": "permanent", "cmd": "no-such-command", "gpus": 0, "retries": -1},
        {"name": "forever", "cmd": "exit 3", "gpus": 0, "retries": -1},
    ])
    fleet_ns.start_named_worker("cpu0", "--cpu", "--allow-commands")
    assert fleet_ns.enqueue(exp)["enqueued"] == 4
    wait_for(lambda: len(logs_of(root, "forever")) >= 5 and finished(fleet_ns) == 3, 90, "retries")
    assert [len(logs_of(root, n)) for n in ("twice", "never", "permanent")] == [3, 1, 1]
    f = {k.split("(")[1].rstrip(")"): v for k, v in failures(fleet_ns).items()}
    assert (f["twice"].attempt, f["never"].attempt, f["permanent"].attempt) == (3, 1, 1)
    r = fleet_ns.fleet("cancel", str(exp), "--json", check=True)
    assert json.loads(r.stdout)["cancelled"] + json.loads(r.stdout)["running"] >= 1
    n = len(logs_of(root, "forever"))
    wait_for(lambda: not fleet_ns.client.hlen(fleet_ns.keys.running) and not fleet_ns.client.zcard(fleet_ns.keys.delayed)
             and not fleet_ns.client.hlen(fleet_ns.keys.queued), 30, "the forever retry to end")
    st = json.loads(fleet_ns.fleet("status", str(exp), "--json", check=True).stdout)
    assert st["done"] == 0 and st["queued"] == 0 and st["running"] == 0
    assert len(logs_of(root, "forever")) <= n + 1  # at most the attempt that was starting


def tree_pids(root: Path, name: str) -> list[int]:
    p = root / f"{name}.pids"
    return [int(x) for x in p.read_text().split()] if p.exists() else []


def tree_command(name: str) -> dict:
    """A command whose process tree is bash, two background sleeps and a foreground sleep;
    it writes their pids (and its own) to <name>.pids."""
    return {"name": name, "gpus": 0,
            "cmd": f"sleep 300 & a=$!; (sleep 300; echo late) & b=$!; echo $$ $a $b > {name}.tmp && "
                   f"mv {name}.tmp {name}.pids; wait"}


def test_cancel_stop_and_death_end_the_whole_process_tree(fleet_ns: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "exp"
    exp = commands_yaml(root, [tree_command("t1")], retries=0)
    w1 = fleet_ns.start_named_worker("cpu0", "--cpu", "--allow-commands", FLEET_COMMAND_GRACE_S="2")
    fleet_ns.enqueue(exp)
    pids = wait_for(lambda: tree_pids(root, "t1"), 60, "the tree to start")
    assert fleet_ns.fleet("cancel", str(exp)).returncode == 0
    wait_for(lambda: all(pid_gone(p) for p in pids), 30, "fleet cancel to end every process of the tree")
    wait_for(lambda: not fleet_ns.client.hlen(fleet_ns.keys.running), 30, "the run to end")
    assert fleet_ns.done_count() == 0 and not failures(fleet_ns)  # cancelled: neither done nor failed
    fleet_ns.stop(w1)

    # A worker asked to stop (fleet down, SIGTERM): the tree ends and the command goes back to the queue.
    exp2 = commands_yaml(tmp_path / "exp2", [tree_command("t2")], retries=0, name="second")
    w = fleet_ns.start_named_worker("cpu1", "--cpu", "--slot", "1", "--allow-commands", FLEET_COMMAND_GRACE_S="2")
    fleet_ns.enqueue(exp2)
    pids = wait_for(lambda: tree_pids(tmp_path / "exp2", "t2"), 60, "the second tree to start")
    os.killpg(w.pid, signal.SIGTERM)
    wait_for(lambda: all(pid_gone(p) for p in pids), 30, "the worker's stop to end the tree")
    w.wait(30)
    wait_for(lambda: fleet_ns.client.hlen(fleet_ns.keys.queued) == 1, 30, "the command back in the queue")
    assert fleet_ns.done_count() == 0

    # A worker killed outright: its command's tree dies with it (no GPU left held by an orphan).
    (tmp_path / "exp2" / "t2.pids").unlink()
    w3 = fleet_ns.start_named_worker("cpu2", "--cpu", "--slot", "2", "--allow-commands")
    pids = wait_for(lambda: tree_pids(tmp_path / "exp2", "t2"), 60, "the tree to start again")
    os.kill(w3.pid, signal.SIGKILL)  # the worker process only, as the OOM killer would
    wait_for(lambda: all(pid_gone(p) for p in pids), 30, "the dead worker's tree to end")


REPORT_SH = 'echo "$0 $* CVD=$CUDA_VISIBLE_DEVICES" >> ran.txt\n'
REPORT_PY = ('import os, sys\nwith open("ran.txt", "a") as f:\n'
             '    f.write(" ".join([sys.argv[0]] + sys.argv[1:]) + " CVD=" + os.environ["CUDA_VISIBLE_DEVICES"] + "\\n")\n')


def test_seed_003_example_list_runs_as_written(local_fleet, tmp_path: Path) -> None:
    """Seed 003's §7 list, pasted as its bash array, on `fleet up --allow-commands` over four
    fake GPUs: the 3- and 2-GPU commands get groups of distinct GPUs, CPU commands none."""
    root = tmp_path / "lab"
    (root / "scripts").mkdir(parents=True)
    for name in ("run_pipeline.sh", "run_fast_slow.sh", "run_ddp.sh", "analyze.sh"):
        (root / "scripts" / name).write_text(REPORT_SH)
    for name in ("train.py", "train_multi.py", "preprocess.py"):
        (root / name).write_text(REPORT_PY)
    (root / "torch" / "distributed").mkdir(parents=True)  # `python -m torch.distributed.launch`, as made here
    (root / "torch" / "__init__.py").write_text("")
    (root / "torch" / "distributed" / "__init__.py").write_text("")
    (root / "torch" / "distributed" / "launch.py").write_text(REPORT_PY)
    (root / "commands.txt").write_text(SEED_003_SECTION_7)
    f = local_fleet
    env = {"FLEET_FAKE_GPUS": fake_gpus(tmp_path / "gpus.json", 4), "FLEET_PLACEMENT_INTERVAL_S": "0.3",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    f.fleet("up", "--allow-commands", check=True, **env)
    assert f.enqueue(root / "commands.txt")["enqueued"] == 9
    wait_for(lambda: f.done_count() == 9, 180, "the nine commands")
    ran = sorted((root / "ran.txt").read_text().splitlines())
    assert len(ran) == 9, ran

    def cvd(prefix: str) -> list[str]:
        return [line.rsplit("CVD=", 1)[1] for line in ran if line.startswith(prefix)]

    (multi,) = [line for line in ran if line.startswith("train_multi.py")]
    given = multi.split("--gpus ")[1].split(" CVD=")[0].split()
    assert len(set(given)) == 3 and multi.endswith("CVD=" + ",".join(given))
    (ddp,) = [line for line in ran if line.startswith("scripts/run_ddp.sh")]
    pair = ddp.split("--gpus ")[1].split(" ")[0]
    assert len(set(pair.split(","))) == 2 and ddp.endswith(f"CVD={pair}")
    launch = cvd(str(Path("torch") / "distributed" / "launch.py")) or cvd(str(root / "torch"))
    assert len(launch) == 1 and len(set(launch[0].split(","))) == 2, ran
    assert cvd("preprocess.py") == [""] and cvd("scripts/analyze.sh") == [""]
    singles = cvd("scripts/run_pipeline.sh") + cvd("scripts/run_fast_slow.sh")
    assert all(len(c.split(",")) == 1 and c in "0123" for c in singles), ran
    # The supervisor grouped GPUs for the queued multi-GPU commands (their commands twin queues).
    assert "3-GPU work queued: group of GPUs" in (f.logs / "supervisor.log").read_text()


@pytest.mark.parametrize("text, fault", [
    ("echo a | 0 | 0\npython train.py | 20\n", "line 2: expected 'command | mem_GB | n_gpus'"),
    ("echo a | 0 | 0\npython train.py | lots | 1\n", "line 2: mem_GB 'lots' is not a number"),
    ("echo a | 0 | 0\n\n# big\npython ddp.py | 10 | 3\n", "line 4: python ddp.py: needs 3 GPUs, but the largest host"),
])
def test_bad_commands_file_is_one_line_and_nothing_enqueued(fleet_ns: Fleet, tmp_path: Path, text: str,
                                                            fault: str) -> None:
    # A worker of a two-GPU host is live: three GPUs is more than any host of this fleet has.
    fleet_ns.start_named_worker("gpu0", "--gpu", "0", FLEET_FAKE_GPUS=fake_gpus(tmp_path / "gpus.json", 2))
    p = tmp_path / "commands.txt"
    p.write_text(text)
    r = fleet_ns.fleet("enqueue", str(p))
    assert r.returncode == 1 and fault in r.stderr and str(p) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not fleet_ns.client.hlen(fleet_ns.keys.queued)
    assert not [k for k in fleet_ns.client.scan_iter(f"{fleet_ns.namespace}.q.*")]


def test_a_rerun_skips_what_succeeded_unless_asked(fleet_ns: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "exp"
    root.mkdir()
    p = root / "commands.txt"
    p.write_text("echo one >> out.txt | 0 | 0\necho two >> out.txt | 0 | 0\n")
    fleet_ns.start_named_worker("cpu0", "--cpu", "--allow-commands")
    assert fleet_ns.enqueue(p)["enqueued"] == 2
    wait_for(lambda: fleet_ns.done_count() == 2, 60, "both commands")
    assert fleet_ns.enqueue(p)["enqueued"] == 0  # succeeded: skipped
    with open(p, "a") as f:
        f.write("echo three >> out.txt | 0 | 0\n")
    assert fleet_ns.enqueue(p)["enqueued"] == 1  # only the new line
    wait_for(lambda: fleet_ns.done_count() == 3, 60, "the new command")
    assert fleet_ns.enqueue(p, "--rerun")["enqueued"] == 3
    wait_for(lambda: len((root / "out.txt").read_text().split()) == 6, 60, "all three again")
    assert len(list((root / "fleet-commands" / "commands" / "logs").glob("*.2.log"))) == 3  # logs kept, numbered
