"""Kind ``commands`` (seed 003): shell commands as fleet samples, from a plain commands file
or a YAML experiment. Every error names the file and the line (or entry) at fault.

Plain file (``fleet enqueue commands.txt``), one command a line, ``cmd | mem_GB | n_gpus``,
split from the right (the command may hold ``|`` pipes); blank lines and ``#`` comments are
ignored, and so are the ``COMMANDS=(`` / ``)`` lines and the quotes and ``\\$`` escapes of
seed 003's bash array, so its list runs as written::

    python train.py --gpu ${available_gpu} --epochs 100 | 20 | 1
    "bash scripts/run_ddp.sh m1 --gpus \\${available_gpu_0},\\${available_gpu_1} | 40 | 2"

YAML::

    kind: commands
    name: sweep
    retries: 3                  # per file: -1 forever, 0 none, N (default: the settings' max_attempts - 1)
    timeout_s: 7200             # per file; entries may override both
    commands:
      - {cmd: "python train.py --gpu ${available_gpu}", mem_gb: 20, gpus: 1}
      - {name: prep, cmd: "bash prep.sh", mem_gb: 0, gpus: 0, cwd: tools, env: {DATA: /data}}

Commands run in ``cwd`` (default: the file's folder). ``output`` (default: the settings'
output_dir/<name>, else ``<the file's folder>/fleet-commands/<name>``) holds each
command's result file and its numbered logs.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from fleet.errors import InputError
from fleet.kinds.model_files import resolve

GPU_VAR = re.compile(r"\\?\$\{available_gpu(?:_(\d+))?\}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_GPUS = 64


class CommandEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cmd: str = Field(min_length=1)
    mem_gb: float = Field(0.0, ge=0, description="GPU memory the command needs on each of its GPUs (GB = GiB)")
    gpus: StrictInt = Field(1, ge=0, le=MAX_GPUS, description="GPUs it holds (0: a CPU command)")
    name: str | None = Field(None, min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0)
    retries: StrictInt | None = Field(None, ge=-1)

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not ENV_NAME.fullmatch(k)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name")
        return v


class CommandsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["commands"]
    name: str | None = Field(None, min_length=1)
    commands: list[CommandEntry] = Field(min_length=1)
    cwd: str | None = None
    retries: StrictInt | None = Field(None, ge=-1)
    timeout_s: float | None = Field(None, gt=0)
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    output: str | None = None


@dataclass(frozen=True)
class Command:
    """One command as planned: where it came from, what it runs, what it needs."""

    where: str  # "line 3" or "commands[2]": for messages and labels
    cmd: str
    mem_mib: int
    gpus: int
    name: str | None
    cwd: str  # absolute
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    retries: int | None = None


@dataclass(frozen=True)
class CommandsExperiment:
    path: Path
    name: str
    output: Path
    commands: list[Command]
    enqueued_by: str  # user@host of the producer, kept in each record
    priority: str = "normal"
    kind: str = "commands"


def check_gpu_vars(cmd: str, gpus: int, where: str) -> None:
    """``${available_gpu}`` needs a GPU; ``${available_gpu_K}`` needs K < gpus."""
    for m in GPU_VAR.finditer(cmd):
        k = m.group(1)
        if gpus == 0:
            raise ValueError(f"{where}: uses {m.group(0).lstrip(chr(92))} but asks for 0 GPUs")
        if k is not None and int(k) >= gpus:
            raise ValueError(f"{where}: uses ${{available_gpu_{k}}} but asks for {gpus} GPU(s) "
                             f"(available_gpu_0 .. available_gpu_{gpus - 1})")


def _default_output(path: Path, name: str, default_output: Path | None) -> Path:
    if default_output is not None:
        return default_output.expanduser() / name
    return path.resolve().parent / "fleet-commands" / name


def _cwd(base: Path, cwd: str | None, where: str, path: Path) -> str:
    d = resolve(base, cwd).resolve() if cwd else base
    if not d.is_dir():
        raise InputError(f"{path}: {where}: working folder {d} not found")
    return str(d)


def producer() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def load_commands_experiment(path: Path, data: dict[str, Any], default_output: Path | None) -> CommandsExperiment:
    """A YAML/JSON commands experiment; InputError (file and entry) on any fault."""
    try:
        spec = CommandsSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "experiment"
        raise InputError(f"{path}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None
    base = path.resolve().parent
    name = spec.name or path.stem
    out: list[Command] = []
    for i, e in enumerate(spec.commands):
        where = f"commands[{i}]" + (f" ({e.name})" if e.name else "")
        try:
            check_gpu_vars(e.cmd, e.gpus, where)
        except ValueError as err:
            raise InputError(f"{path}: {err}") from None
        cwd = _cwd(base, e.cwd or spec.cwd, where, path)
        out.append(Command(where, e.cmd, _mib(e.mem_gb), e.gpus, e.name, cwd, dict(e.env),
                           e.timeout_s if e.timeout_s is not None else spec.timeout_s,
                           e.retries if e.retries is not None else spec.retries))
    output = resolve(base, spec.output) if spec.output else _default_output(path, name, default_output)
    return CommandsExperiment(path.resolve(), name, output.resolve(), out, producer(), spec.priority)


def _mib(mem_gb: float) -> int:
    return int(-(-mem_gb * 1024 // 1))  # ceil: a declared 0.5 GB is 512 MiB


def parse_line(line: str) -> tuple[str, float, int] | str:
    """``(cmd, mem_gb, n_gpus)`` of one line, or why it is not one."""
    text = line.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':  # an entry of seed 003's bash array
        text = text[1:-1].replace('\\"', '"').replace("\\$", "$").replace("\\\\", "\\")
    parts = text.rsplit("|", 2)
    if len(parts) != 3:
        return "expected 'command | mem_GB | n_gpus'"
    cmd, mem, n = (p.strip() for p in parts)
    if not cmd:
        return "empty command"
    try:
        mem_gb = float(mem)
    except ValueError:
        return f"mem_GB {mem!r} is not a number"
    if not mem_gb >= 0 or mem_gb == float("inf"):
        return f"mem_GB {mem!r} must be 0 or more"
    if not n.isdigit():
        return f"n_gpus {n!r} is not a whole number of GPUs (0 for a CPU command)"
    if int(n) > MAX_GPUS:
        return f"n_gpus {n} is more than {MAX_GPUS}"
    return cmd, mem_gb, int(n)


def load_commands_file(path: Path, default_output: Path | None) -> CommandsExperiment:
    """A plain commands file (seed 003's ``cmd | mem_GB | n_gpus`` lines)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: commands file not found") from None
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1  # e.object: the bytes without their BOM
        raise InputError(f"{path}: line {line}: not UTF-8 (byte 0x{e.object[e.start]:02x}); save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read commands file: {e.strerror or e}") from None
    base = path.resolve().parent
    out: list[Command] = []
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or line == ")" or re.fullmatch(r"[A-Za-z_]\w*=\(", line):
            continue
        parsed = parse_line(line)
        if isinstance(parsed, str):
            raise InputError(f"{path}: line {no}: {parsed}: {raw.strip()[:120]!r}")
        cmd, mem_gb, n = parsed
        try:
            check_gpu_vars(cmd, n, f"line {no}")
        except ValueError as err:
            raise InputError(f"{path}: {err}") from None
        out.append(Command(f"line {no}", cmd, _mib(mem_gb), n, None, str(base)))
    if not out:
        raise InputError(f"{path}: no commands (one a line: 'command | mem_GB | n_gpus')")
    name = path.stem
    return CommandsExperiment(path.resolve(), name, _default_output(path, name, default_output).resolve(), out,
                              producer())
