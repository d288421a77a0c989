"""The ``fleet`` command line. Loads the settings at the edge and passes them down.

Every FleetError becomes one line on stderr and exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fleet.errors import FleetError, PlacementError
from fleet.settings import CONFIG_ENV, FleetSettings, load_settings


def _fail(msg: str) -> None:
    click.echo(f"fleet: error: {msg}", err=True)
    sys.exit(1)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FleetError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def settings_of(ctx: click.Context, **overrides: Any) -> FleetSettings:
    return load_settings(ctx.obj.get("config"), **overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), envvar=CONFIG_ENV, help="Fleet settings file (YAML or JSON).")
@click.option("-v", "--verbose", "verbosity", flag_value="DEBUG", help="Debug logging (here and in what it starts).")
@click.option("-q", "--quiet", "verbosity", flag_value="WARNING", help="Warnings and errors only.")
@click.version_option(package_name="fleet")
@click.pass_context
def main(ctx: click.Context, config: str | None, verbosity: str | None) -> None:
    """fleet: run experiments of thousands of samples on shared GPU servers.

    Shell completion: eval "$(_FLEET_COMPLETE=bash_source fleet)" in ~/.bashrc
    (zsh_source, fish_source for those shells).
    """
    ctx.obj = {"config": config}
    if config:  # child processes (workers, Flower) read the same file
        os.environ[CONFIG_ENV] = str(Path(config).resolve())
    if verbosity:  # the log_level setting, for this process and the workers and supervisor it starts
        os.environ["FLEET_LOG_LEVEL"] = verbosity
    import logging

    level = verbosity or os.environ.get("FLEET_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "WARNING",
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--group", "--category", "groups", multiple=True,
              help="Only this group: a video category, ... (repeatable).")
@click.option("--dry-run", is_flag=True, help="Plan and check, publish nothing, list what would go.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: planned, done, in_flight, enqueued.")
@click.option("--rerun", is_flag=True, help="Publish done samples again too (commands that succeeded run again).")
@click.pass_context
@handles_errors
def enqueue(ctx: click.Context, experiment: Path, groups: tuple[str, ...], dry_run: bool, as_json: bool,
            rerun: bool) -> None:
    """Publish every sample of EXPERIMENT that is not done, queued or running."""
    from fleet.broker import connect
    from fleet.enqueue import enqueue as do_enqueue
    from fleet.experiment import load_experiment

    settings = settings_of(ctx)
    exp = load_experiment(experiment, settings.output_dir, settings.kinds)
    client = connect(settings)
    res = do_enqueue(client, settings.namespace, exp, list(groups) or None, dry_run=dry_run,
                     policy=settings.placement, memory_classes_mib=settings.memory_classes_mib, kinds=settings.kinds,
                     rerun=rerun)
    if as_json:
        d = res.as_dict()
        if dry_run:
            d["would_enqueue"] = [
                {"sample_id": s.sample_id, "group": s.group, "label": s.label, "output": s.output_path, **s.body}
                for s in res.would_enqueue
            ]
        click.echo(json.dumps(d, ensure_ascii=False))
        return
    if dry_run:
        for s in res.would_enqueue:
            click.echo(f"would enqueue {s.sample_id}  {s.output_path}")
    verb = "would enqueue" if dry_run else "enqueued"
    click.echo(
        f"{exp.name}: planned {res.planned}, done {res.done}, in flight {res.in_flight}, "
        f"{verb} {len(res.would_enqueue) if dry_run else res.enqueued}"
    )


@main.command()
@click.option("--gpu", type=int, help="The GPU (NVML / PCI bus index) this worker owns.")
@click.option("--gpus", help="Several GPUs of this host for multi-GPU tasks, e.g. 0,1.")
@click.option("--cpu", is_flag=True, help="A CPU worker (no GPU).")
@click.option("--slot", type=int, default=0, show_default=True, help="Slot number when several workers share a GPU.")
@click.option("--queue", "queues", multiple=True, help="Consume these queues (default: what the GPU can serve).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: cuda for --gpu/--gpus, except on a fake GPU inventory.")
@click.option("--allow-commands", is_flag=True, help="Run shell commands (kind commands); refused by default.")
@click.pass_context
@handles_errors
def worker(ctx: click.Context, gpu: int | None, gpus: str | None, cpu: bool, slot: int, queues: tuple[str, ...], device: str,
           allow_commands: bool) -> None:
    """Run one Celery worker for one GPU (prefetch 1, late acks, model kept resident)."""
    from fleet.gpu_inventory import inventory_from_env
    from fleet.worker_launch import parse_gpus, worker_command

    settings = settings_of(ctx, **({"allow_commands": True} if allow_commands else {}))
    if sum(x for x in (gpu is not None, gpus is not None, cpu)) != 1:
        raise PlacementError("fleet worker: give exactly one of --gpu N, --gpus N,M or --cpu")
    ids: tuple[int, ...] = () if cpu else ((gpu,) if gpu is not None else parse_gpus(gpus or ""))
    if gpu is not None and gpu < 0:
        raise PlacementError(f"fleet worker --gpu {gpu}: give a GPU index (0, 1, ...)")
    snapshot = None
    if ids:
        with inventory_from_env() as inv:
            snaps = {s.index: s for s in inv.snapshot()}
        missing = [i for i in ids if snaps and i not in snaps]
        if missing:
            raise PlacementError(f"fleet worker: GPU {missing[0]} is not on this host (GPUs {sorted(snaps)})")
        snapshot = snaps.get(ids[0]) if len(ids) == 1 else None
    argv, env = worker_command(settings, ids, slot=slot, queues=list(queues), device=device, snapshot=snapshot)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


@main.command()
@click.argument("experiment", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--group", "--category", "groups", multiple=True, help="Only this group (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: total, done, queued, running, failed, by_group.")
@click.option("--failed", "show_failed", is_flag=True,
              help="Also the failures: how many of each error type, then each failed sample with its error.")
@click.option("--export", "export_csv", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the failures to this CSV (seed 002's failure lists, one file for the fleet).")
@click.pass_context
@handles_errors
def status(ctx: click.Context, experiment: Path | None, groups: tuple[str, ...], as_json: bool,
           show_failed: bool, export_csv: Path | None) -> None:
    """Done / queued / running / failed, per group and in total."""
    from fleet.broker import connect
    from fleet.status import experiment_status, experiments_overview, failures, global_status

    settings = settings_of(ctx)
    client = connect(settings)
    if experiment is not None:
        from fleet.experiment import load_experiment

        exp = load_experiment(experiment, settings.output_dir, settings.kinds)
        st = experiment_status(client, settings.namespace, exp, list(groups) or None, settings.kinds)
    else:
        st = global_status(client, settings.namespace)
    d = st.as_dict()
    if experiment is None:
        d["experiments"] = experiments_overview(client, settings.namespace)  # one row per experiment enqueued
    d.update(_control_status(client, settings.namespace, exp if experiment is not None else None))  # paused, priority
    from fleet.failure_lists import by_type, write_csv

    failed = failures(client, settings.namespace, st.sample_ids) if show_failed or export_csv else []
    if export_csv is not None:
        write_csv(export_csv, failed)
    if as_json and show_failed:
        d["failures"] = [f.model_dump(by_alias=True) for f in failed]
        d["failures_by_type"] = by_type(failed)
    if as_json:
        click.echo(json.dumps(d, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="fleet status" + (f": {escape(str(experiment))}" if experiment else ""))
    for col in ("group", "total", "done", "queued", "running", "failed"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for cat, row in d["by_group"].items():
        t.add_row(escape(cat), *(str(row[k]) for k in ("total", "done", "queued", "running", "failed")))
    t.add_row("[b]all[/b]", *(f"[b]{d[k]}[/b]" for k in ("total", "done", "queued", "running", "failed")))
    console = Console()
    if d.get("experiments"):
        from fleet.status import overview_table

        console.print(overview_table(d["experiments"]))
    console.print(t)
    if d.get("paused") or d.get("paused_experiments"):
        console.print(_paused_line(d), highlight=False)
    if show_failed and failed:
        for error_type, n in by_type(failed).items():
            example = next(f for f in failed if f.error_type == error_type)
            first = (example.message.splitlines() or [""])[0][:160]
            console.print(f"[red]{n} x {escape(error_type)}[/red], e.g. {escape(example.label)}: {escape(first)}",
                          highlight=False)
    if export_csv is not None:
        console.print(f"wrote {len(failed)} failures to {escape(str(export_csv))}", highlight=False)
    for f in failed if show_failed else []:
        console.print(f"[red]failed[/red] {f.sample_id} {escape(f.group)} {escape(f.label)} attempt {f.attempt} on {escape(f.worker)}: "
                      f"{f.error_type}: {escape(f.message)}", highlight=False)


@main.command()
@click.argument("experiment", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--interval-s", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON line per refresh: t, total, done, failed, queued, running, rate_per_min, eta_s, groups, workers.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N refreshes.")
@click.pass_context
@handles_errors
def watch(ctx: click.Context, experiment: Path | None, interval_s: float, as_json: bool, count: int | None) -> None:
    """A live view: a bar per group with rate and ETA, a row per worker (its sample, progress,
    rate, GPU use). Ends by itself when nothing is queued, running or pending, or on Ctrl-C."""
    from fleet.broker import connect
    from fleet.watch import Watcher
    from fleet.watch_view import run_watch

    settings = settings_of(ctx)
    exp = None
    if experiment is not None:
        from fleet.experiment import load_experiment

        exp = load_experiment(experiment, settings.output_dir, settings.kinds)
    watcher = Watcher(connect(settings), settings.namespace, exp, settings.kinds, settings.heartbeat_s)
    run_watch(watcher, exp.name if exp is not None else f"namespace {settings.namespace}", interval_s, as_json, count)


@main.command()
@click.option("--gpus", "gpu_list", help="GPU pool: 'all' or indices, e.g. 0,2,3.")
@click.option("--exclude", help="Never use these GPUs, e.g. 3 or 1,3.")
@click.option("--min-free-mib", type=int, help="Free memory a GPU needs.")
@click.option("--reserve", type=int, help="GPUs to leave for colleagues (seed 003 §5.2 rule).")
@click.option("--exclusive/--shared", default=None, help="Exclusive: only idle GPUs (util 0 %, memory < 3 %).")
@click.option("--slots-per-gpu", type=int, help="Workers per GPU (fixed slots).")
@click.option("--packed-mib", type=int, help="Pack slots by declared memory: floor(free / this) per GPU.")
@click.option("--max-slots", type=int, help="Cap on packed slots per GPU.")
@click.option("--cpu-workers", type=int, help="Start this many CPU workers instead of GPU workers.")
@click.option("--allow-commands", is_flag=True, help="Its workers run shell commands (kind commands); off by default.")
@click.pass_context
@handles_errors
def up(ctx: click.Context, gpu_list: str | None, exclude: str | None, min_free_mib: int | None, reserve: int | None,
       exclusive: bool | None, slots_per_gpu: int | None, packed_mib: int | None, max_slots: int | None,
       cpu_workers: int | None, allow_commands: bool) -> None:
    """Start Redis (embedded unless configured), one worker per usable GPU, and Flower."""
    from fleet.launcher import launch_of
    from fleet.launcher import up as do_up
    from fleet.placement import PlacementPolicy

    settings = settings_of(ctx, **({"allow_commands": True} if allow_commands else {}))
    change: dict[str, Any] = {}
    if gpu_list is not None:
        change["gpus"] = "all" if gpu_list.strip() == "all" else _indices("--gpus", gpu_list)
    if exclude is not None:
        change["exclude_gpus"] = _indices("--exclude", exclude)
    for key, value in (("min_free_mib", min_free_mib), ("reserve", reserve), ("slots_per_gpu", slots_per_gpu),
                       ("max_slots_per_gpu", max_slots)):
        if value is not None:
            change[key] = value
    if exclusive is not None:
        change["mode"] = "exclusive" if exclusive else "shared"
    if packed_mib is not None:
        change.update(slots="packed", slot_memory_mib=packed_mib)
    if change:
        policy = PlacementPolicy.load({**settings.placement.model_dump(), **change}, "fleet up")
        settings = settings.model_copy(update={"placement": policy})
    # What the flags asked for, as the running fleet's state names it (a fleet already up with
    # other values is an error: silently keeping it would look like the flags took effect).
    launch = launch_of(settings, cpu_workers)
    requested = {k: launch[k] for k in change}
    if cpu_workers is not None:
        requested["cpu_workers"] = launch["cpu_workers"]
    if allow_commands:
        requested["allow_commands"] = True
    info = do_up(settings, cpu_workers=cpu_workers, requested=requested)
    click.echo(info.describe())


def _indices(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PlacementError(f"{flag} {text!r}: give GPU indices separated by commas, e.g. 0,2") from None


@main.command()
@click.option("--grace-s", type=float, default=60.0, show_default=True,
              help="Seconds workers get to finish their sample before they are killed (it then runs again elsewhere).")
@click.pass_context
@handles_errors
def down(ctx: click.Context, grace_s: float) -> None:
    """Stop exactly what `fleet up` started on this machine."""
    from fleet.launcher import down as do_down

    click.echo(do_down(settings_of(ctx), grace_s=grace_s))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Snapshots and fleet workers as JSON (--watch: a line a refresh).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C, with each GPU's utilisation of the last minutes.")
@click.option("--interval-s", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="--watch: seconds between refreshes.")
@click.option("--count", type=click.IntRange(min=1), help="--watch: stop after this many refreshes.")
@click.pass_context
@handles_errors
def gpus(ctx: click.Context, as_json: bool, watch: bool, interval_s: float, count: int | None) -> None:
    """The GPUs (memory, utilisation, power, temperature, processes) and the fleet workers on each."""
    from fleet.broker import connect
    from fleet.errors import BrokerUnavailable
    from fleet.gpu_inventory import inventory_from_env
    from fleet.gpu_view import as_json as to_json
    from fleet.gpu_view import live_workers, table

    settings = settings_of(ctx)
    with inventory_from_env() as inv:
        snaps = inv.snapshot()
    try:
        client = connect(settings, timeout_s=1.0)
    except BrokerUnavailable:
        client = None  # the GPUs are worth showing without a fleet
    if watch:
        from fleet.gpu_watch import Watch
        from fleet.gpu_watch import run as run_watch

        with inventory_from_env() as inv:
            run_watch(Watch(inv, client, settings.namespace, settings.heartbeat_s, settings.gpu_series_bucket_s),
                      interval_s, count, as_json)
        return
    workers = live_workers(client, settings.namespace, settings.heartbeat_s)
    if as_json:
        click.echo(to_json(snaps, workers))
        return
    from rich.console import Console

    console = Console()
    if not snaps:
        console.print("no GPU found (NVML not available or no NVIDIA GPU)")
    else:
        console.print(table(snaps, workers))
    cpu = [w.name for w in workers if not w.gpus]
    if cpu:
        console.print("CPU workers: " + ", ".join(cpu))
    if client is None:
        from fleet.credentials import mask_url

        console.print(f"(no fleet reachable at {mask_url(settings.effective_broker_url)}: workers not shown)")


@main.command()
@click.pass_context
@handles_errors
def metrics(ctx: click.Context) -> None:
    """Serve Prometheus /metrics on 127.0.0.1 (port: setting metrics_port) behind Flower's login:
    samples per experiment, group and state, workers, GPUs. `fleet up` starts it."""
    from fleet.metrics_server import serve

    serve(settings_of(ctx))


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(["video", "image"]), default="video", show_default=True,
              help="video: Wan2.1 text-to-video; image: Z-Image text-to-image.")
@click.option("--preset", type=click.Choice(["tiny", "bench"]), default="tiny", show_default=True,
              help="tiny (tests, demos) or bench (a realistic DiT width with few layers, bf16; for GPUs).")
@handles_errors
def make_tiny_model(directory: Path, kind: str, preset: str) -> None:
    """Write a tiny random-weight model (DiT, text encoder, VAE, tokenizer) to DIRECTORY."""
    # The builder needs torch and diffsynth; it runs in its own process so that this
    # package never imports them.
    rc = subprocess.call([sys.executable, "-m", "workers.tiny_model", str(directory), "--kind", kind, "--preset", preset])
    if rc:
        sys.exit(rc)  # the builder said why, in one line


@main.command("make-tabular-data")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rows", type=int, default=50_000, show_default=True, help="Rows in all.")
@click.option("--parts", type=int, default=4, show_default=True, help="Shards: interactions_part1.csv ... partK.")
@click.option("--seed", type=int, default=0, show_default=True)
@handles_errors
def make_tabular_data(directory: Path, rows: int, parts: int, seed: int) -> None:
    """Write a synthetic sharded click table (seed 004's shape, a learnable signal) to DIRECTORY."""
    from fleet.kinds.train.synthetic_data import write_tabular_data

    for path in write_tabular_data(directory, rows, parts, seed):
        click.echo(path)


@main.command()
@click.argument("kind", type=click.Choice(["video", "image", "train"]), default="video", required=False)
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work folder (default fleet-demo, or fleet-demo-image); the experiment is left at DIR/experiment.yaml.")
@click.option("--workers", "n_workers", type=int, default=2, show_default=True, help="CPU workers when no GPU is found.")
@click.pass_context
@handles_errors
def demo(ctx: click.Context, kind: str, directory: Path | None, n_workers: int) -> None:
    """Build a tiny model and a small experiment of KIND (video: seed 001's shape; image: a
    prompts CSV as seed 002's), run it on a local fleet, stop it."""
    from fleet.demo import run_demo

    directory = directory or Path("fleet-demo" if kind == "video" else f"fleet-demo-{kind}")
    run_demo(settings_of(ctx), directory, n_workers, kind)


@main.command("export")
@click.argument("experiment")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write this file (atomically); default stdout (csv, jsonl). Parquet needs it.")
@click.pass_context
@handles_errors
def export_cmd(ctx: click.Context, experiment: str, fmt: str, out: Path | None) -> None:
    """One row per finished sample of EXPERIMENT (its file or its name): the record (id, group,
    label, output, duration, worker, host, GPUs, finish time), metric_* and param_* columns."""
    from fleet.broker import connect
    from fleet.export import finished_rows, output_root_of, write

    settings = settings_of(ctx)
    name, exp = _experiment_ref(settings, experiment)
    client = connect(settings)
    root = exp.output if exp is not None else output_root_of(client, settings.namespace, name)
    rows = finished_rows(client, settings.namespace, name, root)
    write(rows, fmt, out)
    if out is not None:
        click.echo(f"wrote {len(rows)} finished samples of {name} to {out}")


@main.command()
@click.argument("target")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("-n", "--lines", "last", type=click.IntRange(min=0), help="Only the last LINES lines (then follow).")
@click.pass_context
@handles_errors
def logs(ctx: click.Context, target: str, follow: bool, last: int | None) -> None:
    """TARGET's log lines, rotated files included, oldest first: a worker (cpu0, gpu1, gpu1@host;
    also supervisor, flower, redis) or a sample (every worker's lines naming its id, or 8+
    characters of it)."""
    from fleet.log_view import show

    try:
        show(settings_of(ctx).logs, target, last, follow, click.echo)
    except KeyboardInterrupt:  # the end of -f
        return


# ---- control: cancel, pause, resume, retry (fleet.control) ------------------------------------------
def _experiment_ref(settings: FleetSettings, arg: str, need_file: bool = False) -> tuple[str, Any]:
    """(name, loaded experiment or None) of an EXPERIMENT argument: an experiment file, or
    (unless ``need_file``) the experiment's name as enqueue recorded it."""
    from fleet.errors import InputError

    p = Path(arg).expanduser()
    if p.is_file():
        from fleet.experiment import load_experiment

        exp = load_experiment(p, settings.output_dir, settings.kinds)
        return exp.name, exp
    if need_file or p.suffix.lower() in (".yaml", ".yml", ".json") or "/" in arg:
        raise InputError(f"{arg}: experiment file not found")
    return arg, None


def _control_status(client: Any, namespace: str, exp: Any) -> dict[str, Any]:
    """What `fleet status --json` says of pauses (and of the experiment's priority)."""
    from fleet import control
    from fleet.priority import experiment_step, name_of

    paused = control.paused(client, namespace)
    if exp is not None:
        return {"paused": exp.name in paused or control.ALL in paused, "priority": name_of(experiment_step(exp))}
    return {"paused": control.ALL in paused, "paused_experiments": sorted(p for p in paused if p != control.ALL)}


def _paused_line(d: dict[str, Any]) -> str:
    if "paused_experiments" not in d:
        return "paused: workers take none of its samples until `fleet resume`"
    if d["paused"]:
        return "paused: the whole fleet (workers take no samples until `fleet resume`)"
    return "paused experiments: " + ", ".join(d["paused_experiments"])


@main.command()
@click.argument("experiment")
@click.option("--group", "--category", "groups", multiple=True, help="Only this group (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: cancelled, running, messages_removed.")
@click.pass_context
@handles_errors
def cancel(ctx: click.Context, experiment: str, groups: tuple[str, ...], as_json: bool) -> None:
    """Remove EXPERIMENT's queued samples for good (an experiment file or its name).

    Running samples are asked to stop (a job that ignores it finishes) and are never
    published again; `fleet enqueue` publishes the experiment anew.
    """
    from fleet.broker import connect
    from fleet.control import cancel as do_cancel

    settings = settings_of(ctx)
    name, _ = _experiment_ref(settings, experiment)
    res = do_cancel(connect(settings), settings.namespace, name, list(groups) or None)
    if as_json:
        click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        return
    which = f" (groups {', '.join(groups)})" if groups else ""
    click.echo(f"cancelled {res.cancelled} queued samples of {name}{which} ({res.running} running will finish)")


@main.command()
@click.argument("experiment", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: parked, running, paused.")
@click.pass_context
@handles_errors
def pause(ctx: click.Context, experiment: str | None, as_json: bool) -> None:
    """Workers take none of EXPERIMENT's samples (none at all without one) until `fleet resume`;
    running samples finish."""
    from fleet.broker import connect
    from fleet.control import pause as do_pause

    settings = settings_of(ctx)
    name = _experiment_ref(settings, experiment)[0] if experiment is not None else None
    res = do_pause(connect(settings), settings.namespace, name)
    if as_json:
        click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        return
    what = name if name is not None else f"the whole fleet (namespace {settings.namespace})"
    click.echo(f"paused {what}: {res.parked} queued samples parked ({res.running} running will finish)")


@main.command()
@click.argument("experiment", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: unparked, paused (what stays paused).")
@click.pass_context
@handles_errors
def resume(ctx: click.Context, experiment: str | None, as_json: bool) -> None:
    """Undo `fleet pause`: EXPERIMENT's parked samples go back to the front of their queues.
    Without EXPERIMENT everything resumes, experiments paused by name too."""
    from fleet.broker import connect
    from fleet.control import ALL
    from fleet.control import resume as do_resume

    settings = settings_of(ctx)
    name = _experiment_ref(settings, experiment)[0] if experiment is not None else None
    res = do_resume(connect(settings), settings.namespace, name)
    if as_json:
        click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        return
    what = name if name is not None else f"the whole fleet (namespace {settings.namespace})"
    line = f"resumed {what}: {res.unparked} parked samples back at the front of their queues"
    if name is not None and ALL in res.paused:
        line += f"; {name} stays paused while the whole fleet is (`fleet resume` with no experiment)"
    click.echo(line)


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--group", "--category", "groups", multiple=True, help="Only this group (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: retried, failed, not_planned.")
@click.pass_context
@handles_errors
def retry(ctx: click.Context, experiment: Path, groups: tuple[str, ...], as_json: bool) -> None:
    """Publish again, first in their queues, EXPERIMENT's samples that failed for good."""
    from fleet.broker import connect
    from fleet.control import retry as do_retry

    settings = settings_of(ctx)
    _, exp = _experiment_ref(settings, str(experiment), need_file=True)
    res = do_retry(connect(settings), settings.namespace, exp, list(groups) or None, policy=settings.placement,
                   memory_classes_mib=settings.memory_classes_mib, kinds=settings.kinds)
    if as_json:
        click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        return
    line = f"retried {res.retried} failed samples of {exp.name}"
    if res.not_planned:
        line += f" ({res.not_planned} failed samples are no longer in its plan)"
    click.echo(line)



@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html and report.json (default: the experiment's output folder/report).")
@click.option("--gallery-max", type=click.IntRange(min=0), default=200, show_default=True,
              help="Thumbnails at most in the gallery.")
@click.pass_context
@handles_errors
def report(ctx: click.Context, experiment: Path, out_dir: Path | None, gallery_max: int) -> None:
    """Write a self-contained HTML report of EXPERIMENT (groups, throughput, timeline, GPUs,
    failures, gallery) and report.json with its figures; works from the manifest without Redis."""
    from fleet.broker import connect
    from fleet.errors import BrokerUnavailable
    from fleet.experiment import load_experiment
    from fleet.report_writer import write_report

    settings = settings_of(ctx)
    exp = load_experiment(experiment, settings.output_dir, settings.kinds)
    try:
        client = connect(settings, timeout_s=2.0)
    except BrokerUnavailable as e:
        click.echo(f"fleet: warning: {e}; reporting from {exp.output}/fleet-manifest.jsonl only", err=True)
        client = None
    html_path, json_path, fig = write_report(client, settings.namespace, exp, out_dir, settings.kinds, gallery_max)
    t = fig["totals"]
    click.echo(f"{exp.name}: {t['done']} done, {t['failed']} failed of {t['planned']} planned; "
               f"wrote {html_path} and {json_path}")


if __name__ == "__main__":
    main()
