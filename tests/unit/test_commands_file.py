"""The commands kind's producer side (seed 003): the plain `cmd | mem_GB | n_gpus` file as
written (its §7 list included), the YAML form, ids, and every bad line as one line; the
error classes, and the job waiting while its GPU lacks the declared memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.errors import InputError, PermanentError, WaitForResources
from fleet.experiment import load_experiment
from fleet.planner import payloads, plan_experiment
from workers.command_errors import (
    CommandFailed,
    CommandImportError,
    CommandNotExecutable,
    CommandNotFound,
    CommandOutOfMemory,
    CommandRuntimeError,
    CommandTimeout,
    CudaError,
    SegmentationFault,
    classify,
)
from workers.jobs.commands import substitute

# Seed 003 §7, as its bash array holds them (quotes and \$ included).
SEED_003_SECTION_7 = r'''COMMANDS=(
    "bash scripts/run_pipeline.sh aircraft --gpu \${available_gpu} | 35 | 1"
    "bash scripts/run_fast_slow.sh eurosat --gpu \${available_gpu} | 20 | 1"
    "bash scripts/run_ddp.sh model1 --gpus \${available_gpu_0},\${available_gpu_1} | 40 | 2"
    "CUDA_VISIBLE_DEVICES=\${available_gpu} python train.py --epochs 100 | 18 | 1"
    "python train.py --gpu \${available_gpu} --lr 0.001 | 20 | 1"
    "CUDA_VISIBLE_DEVICES=\${available_gpu_0},\${available_gpu_1} python -m torch.distributed.launch train.py | 40 | 2"
    "python train_multi.py --gpus \${available_gpu_0} \${available_gpu_1} \${available_gpu_2} | 50 | 3"
    "python preprocess.py --input data/ --output processed/ | 0 | 0"
    "bash scripts/analyze.sh | 0 | 0"
)
'''


def write(tmp: Path, text: str, name: str = "commands.txt") -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


def test_seed_003_list_reads_as_written(tmp_path: Path) -> None:
    plan = plan_experiment(load_experiment(write(tmp_path, SEED_003_SECTION_7)))
    assert [(s.body["cmd"], s.memory_mib, s.gpus) for s in plan.samples][:3] == [
        ("bash scripts/run_pipeline.sh aircraft --gpu ${available_gpu}", 35 * 1024, 1),
        ("bash scripts/run_fast_slow.sh eurosat --gpu ${available_gpu}", 20 * 1024, 1),
        ("bash scripts/run_ddp.sh model1 --gpus ${available_gpu_0},${available_gpu_1}", 40 * 1024, 2),
    ]
    assert [s.gpus for s in plan.samples] == [1, 1, 2, 1, 1, 2, 3, 0, 0]
    assert [s.body["where"] for s in plan.samples][0] == "line 2"
    assert {s.group for s in plan.samples} == {"commands.txt"}
    assert all(s.body["cwd"] == str(tmp_path.resolve()) for s in plan.samples)


def test_split_from_the_right_keeps_pipes_and_comments_are_skipped(tmp_path: Path) -> None:
    p = write(tmp_path, "# a comment\n\n  cat a.txt | grep x | sort -u > out.txt | 1.5 | 0  \n")
    (smp,) = plan_experiment(load_experiment(p)).samples
    assert smp.body["cmd"] == "cat a.txt | grep x | sort -u > out.txt" and smp.memory_mib == 1536 and smp.gpus == 0


@pytest.mark.parametrize("line, fault", [
    ("python train.py | 20", "line 2: expected 'command | mem_GB | n_gpus'"),
    ("python train.py | twenty | 1", "line 2: mem_GB 'twenty' is not a number"),
    ("python train.py | 20 | one", "line 2: n_gpus 'one' is not a whole number"),
    ("python train.py | -5 | 1", "line 2: mem_GB '-5' must be 0 or more"),
    (" | 20 | 1", "line 2: empty command"),
    ("python t.py --gpu ${available_gpu} | 0 | 0", "line 2: uses ${available_gpu} but asks for 0 GPUs"),
    ("python t.py ${available_gpu_2} | 0 | 2", "line 2: uses ${available_gpu_2} but asks for 2 GPU(s)"),
    ("python t.py | 1 | 100", "n_gpus 100 is more than 64"),
])
def test_bad_line_is_one_line_naming_it(tmp_path: Path, line: str, fault: str) -> None:
    p = write(tmp_path, f"echo ok | 0 | 0\n{line}\n")
    with pytest.raises(InputError) as e:
        load_experiment(p)
    assert fault in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_file_that_is_not_utf8_names_the_line_and_byte(tmp_path: Path) -> None:
    p = tmp_path / "commands.txt"
    p.write_bytes(b"\xef\xbb\xbfecho a | 0 | 0\necho caf\xe9 | 0 | 0\n")  # a BOM, then a Latin-1 line
    with pytest.raises(InputError) as e:
        load_experiment(p)
    assert f"{p}: line 2: not UTF-8 (byte 0xe9)" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_empty_file_and_repeated_command_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no commands"):
        load_experiment(write(tmp_path, "# nothing\n"))
    with pytest.raises(InputError, match="line 3: the same command as line 1"):
        plan_experiment(load_experiment(write(tmp_path, "echo a | 0 | 0\necho b | 0 | 0\necho a | 1 | 0\n")))


def test_ids_are_text_folder_and_environment(tmp_path: Path) -> None:
    def ids(text: str, name: str = "commands.txt") -> list[str]:
        return [s.sample_id for s in plan_experiment(load_experiment(write(tmp_path, text, name))).samples]

    a = ids("echo a | 0 | 0\necho b | 0 | 0\n")
    assert ids("echo b | 5 | 0\necho a | 0 | 0\n") == [a[1], a[0]]  # order and declared memory do not matter
    assert ids("echo a  --x | 0 | 0\n")[0] not in a
    (tmp_path / "sub").mkdir()
    yaml_ids = ids("kind: commands\noutput: fleet-commands/commands\ncommands:\n"
                   "  - {cmd: echo a, mem_gb: 0, gpus: 0}\n  - {cmd: echo a, gpus: 0, cwd: sub}\n"
                   "  - {cmd: echo a, gpus: 0, env: {X: '1'}}\n  - {cmd: echo a, gpus: 0, name: again}\n", "c.yaml")
    assert yaml_ids[0] == a[0]  # the same command, folder, environment and output folder
    assert len(set(yaml_ids)) == 4


def test_yaml_form_and_payload(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    p = write(tmp_path, """kind: commands
name: sweep
retries: 2
timeout_s: 60
commands:
  - {cmd: "python train.py --gpu ${available_gpu}", mem_gb: 20, gpus: 1}
  - {name: prep, cmd: "bash prep.sh", mem_gb: 0, gpus: 0, cwd: tools, env: {DATA: /data}, retries: -1, timeout_s: 5}
""", "sweep.yaml")
    plan = plan_experiment(load_experiment(p))
    a, b = plan.samples
    assert (a.retries, a.body["timeout_s"], b.retries, b.body["timeout_s"]) == (2, 60, -1, 5)
    assert b.body["cwd"] == str((tmp_path / "tools").resolve()) and b.body["env"] == {"DATA": "/data"}
    assert b.label == "commands[1] (prep): prep" and "@" in b.body["enqueued_by"]
    (_, _, payload), _ = list(payloads(plan, [a, b], lambda s: "q"))
    assert json.loads(payload)["retries"] == 2


@pytest.mark.parametrize("doc, fault", [
    ("kind: commands\ncommands: []\n", "commands: List should have at least 1 item"),
    ("kind: commands\ncommands:\n  - {cmd: x, gpus: -1}\n", "commands.0.gpus"),
    ("kind: commands\ncommands:\n  - {cmd: x, retries: -2}\n", "commands.0.retries"),
    ("kind: commands\ncommands:\n  - {cmd: x, cwd: nowhere}\n", "working folder"),
    ("kind: commands\ncommands:\n  - {cmd: x, env: {'A B': '1'}}\n", "is not an environment variable name"),
    ("kind: commands\ncommands:\n  - {cmd: x, shell: zsh}\n", "Extra inputs are not permitted"),
])
def test_bad_yaml_is_one_line(tmp_path: Path, doc: str, fault: str) -> None:
    with pytest.raises(InputError) as e:
        plan_experiment(load_experiment(write(tmp_path, doc, "c.yaml")))
    assert fault in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_substitution() -> None:
    assert substitute(r"a ${available_gpu} b \${available_gpu_1},${available_gpu_0} $HOME", (3, 5)) == "a 3 b 5,3 $HOME"


@pytest.mark.parametrize("code, tail, timed_out, cls", [
    (1, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", False, CommandOutOfMemory),
    (1, "torch.cuda: not enough CUDA memory", False, CommandOutOfMemory),
    (1, "RuntimeError: CUDA error: device-side assert triggered", False, CudaError),
    (1, "RuntimeError: shapes do not match", False, CommandRuntimeError),
    (139, "", False, SegmentationFault),
    (1, "Segmentation fault (core dumped)", False, SegmentationFault),
    (1, "ModuleNotFoundError: No module named 'x'", False, CommandImportError),
    (1, "ImportError: cannot import name 'y'", False, CommandImportError),
    (127, "bash: foo: command not found", False, CommandNotFound),
    (126, "bash: ./x.sh: Permission denied", False, CommandNotExecutable),
    (143, "", True, CommandTimeout),
    (2, "usage: train.py [-h]", False, CommandFailed),
])
def test_error_classes(code: int, tail: str, timed_out: bool, cls: type) -> None:
    assert classify(code, tail, timed_out) is cls
    assert cls.advice
    # ImportError, 127 and 126 are never retried (PermanentError); the others may be.
    never = cls in (CommandImportError, CommandNotFound, CommandNotExecutable)
    assert issubclass(cls, PermanentError) is never


def test_a_command_waits_while_its_gpu_lacks_the_declared_memory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from fleet.contract import TaskPayload
    from workers.jobs import commands as job
    from workers.jobs.base import JobContext
    from workers.model_cache import ModelCache

    gpus = [{"index": 0, "uuid": "GPU-fake-0", "name": "FAKE", "memory_total_mib": 24000, "memory_used_mib": 20000,
             "memory_free_mib": 4000, "utilization_pct": 90}]
    (tmp_path / "gpus.json").write_text(json.dumps(gpus))
    monkeypatch.setenv("FLEET_FAKE_GPUS", str(tmp_path / "gpus.json"))
    task = TaskPayload(kind="commands", sample_id="s1", experiment="e", group="g", label="l", gpus=1,
                       memory_mib=8 * 1024, output_path=str(tmp_path / "commands" / "x-s1.json"),
                       output_root=str(tmp_path), body={"cmd": "touch ran", "cwd": str(tmp_path), "where": "line 1"})
    ctx = JobContext(gpus=(0,), device="cpu", models=ModelCache(), work_dir=tmp_path / ".w", stopping=threading.Event())
    with pytest.raises(WaitForResources, match="GPU 0 has 4000 MiB free; the command declares 8192 MiB"):
        job.run(task, ctx)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "logs").exists()  # nothing started, no log used
