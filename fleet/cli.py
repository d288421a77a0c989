"""The ``fleet`` command line. Loads the settings at the edge and passes them down.

Every FleetError becomes one line on stderr and exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from fleet.cli_context import handles_errors, settings_of, skips_teardown
from fleet.errors import PlacementError
from fleet.settings import CONFIG_ENV


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
@click.option("--verify-outputs", is_flag=True,
              help="Stat every done output, also in folders unchanged since they were verified (catches a file "
              "truncated or overwritten in place).")
@click.pass_context
@skips_teardown
@handles_errors
def enqueue(ctx: click.Context, experiment: Path, groups: tuple[str, ...], dry_run: bool, as_json: bool,
            rerun: bool, verify_outputs: bool) -> None:
    """Publish every sample of EXPERIMENT that is not done, queued or running."""
    from fleet.broker import connect
    from fleet.enqueue import enqueue as do_enqueue
    from fleet.experiment import load_experiment

    settings = settings_of(ctx)
    exp = load_experiment(experiment, settings.output_dir, settings.kinds)
    client = connect(settings)
    res = do_enqueue(client, settings.namespace, exp, list(groups) or None, dry_run=dry_run,
                     policy=settings.placement, memory_classes_mib=settings.memory_classes_mib, kinds=settings.kinds,
                     rerun=rerun, verify_outputs=verify_outputs,
                     allowed_roots=(settings.allowed_output_roots()
                                    if settings.output_roots or settings.output_dir is not None else None))
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
    # a hand-started worker assumes one worker per GPU of the host for its share of the CPUs
    argv, env = worker_command(settings, ids, slot=slot, queues=list(queues), device=device, snapshot=snapshot,
                               host_workers=max(1, len(snaps)) if ids else 1)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


@main.command()
@click.option("--gpus", "gpu_list", help="GPU pool: 'all' or indices, e.g. 0,2,3.")
@click.option("--exclude", help="Never use these GPUs, e.g. 3 or 1,3.")
@click.option("--min-free-mib", type=click.IntRange(min=0), help="Free memory a GPU needs.")
@click.option("--reserve", type=click.IntRange(min=0), help="GPUs to leave for colleagues (seed 003 §5.2 rule).")
@click.option("--exclusive/--shared", default=None, help="Exclusive: only idle GPUs (util 0 %, memory < 3 %).")
@click.option("--slots-per-gpu", type=click.IntRange(min=1), help="Workers per GPU (fixed slots).")
@click.option("--packed-mib", type=click.IntRange(min=1), help="Pack slots by declared memory: floor(free / this) per GPU.")
@click.option("--slots", "slots_mode", type=click.Choice(["fixed", "auto"]),
              help="auto: one worker per GPU measures its samples' peak memory, then as many as fit with a margin "
              "(placement.slot_margin_pct, 10 % of the GPU) are started, re-checked as colleagues come and go.")
@click.option("--max-slots", type=int, help="Cap on packed and auto slots per GPU.")
@click.option("--cpu-workers", type=click.IntRange(min=0), help="Start this many CPU workers instead of GPU workers.")
@click.option("--allow-commands", is_flag=True, help="Its workers run shell commands (kind commands); off by default.")
@click.option("--foreground", is_flag=True, help="Run the supervisor in this process, for systemd or Slurm: no "
              "daemon, SIGTERM stops the workers gracefully, exit status 1 on failure.")
@click.option("--flower", "with_flower", is_flag=True, help="With --foreground: run Flower and /metrics too.")
@click.option("--grace-s", type=click.FloatRange(min=0), default=None, help="With --foreground: seconds workers get to finish their "
              "sample after SIGTERM before they give it back (default 60).")
@click.pass_context
@handles_errors
def up(ctx: click.Context, gpu_list: str | None, exclude: str | None, min_free_mib: int | None, reserve: int | None,
       exclusive: bool | None, slots_per_gpu: int | None, packed_mib: int | None, slots_mode: str | None,
       max_slots: int | None, cpu_workers: int | None, allow_commands: bool, foreground: bool, with_flower: bool,
       grace_s: float | None) -> None:
    """Start Redis (embedded unless configured), one worker per usable GPU, and Flower."""
    if slots_mode is not None and packed_mib is not None:
        raise click.UsageError("--packed-mib packs by declared memory; it does not go with --slots")
    if slots_per_gpu is not None and (packed_mib is not None or slots_mode == "auto"):
        raise click.UsageError("--slots-per-gpu is a fixed count; it does not go with --packed-mib or --slots auto")
    if not foreground and (with_flower or grace_s is not None):
        raise click.UsageError("--flower and --grace-s go with --foreground (`fleet up` always starts Flower; "
                               "`fleet down --grace-s` stops it)")
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
    if slots_mode is not None:
        change["slots"] = slots_mode
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
    if foreground:
        from fleet.foreground import run_foreground

        sys.exit(run_foreground(settings, cpu_workers, with_flower, 60.0 if grace_s is None else grace_s))
    info = do_up(settings, cpu_workers=cpu_workers, requested=requested)
    click.echo(info.describe())


def _indices(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PlacementError(f"{flag} {text!r}: give GPU indices separated by commas, e.g. 0,2") from None


@main.command()
@click.option("--grace-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds workers get to finish their sample before they are killed (it then runs again elsewhere).")
@click.pass_context
@handles_errors
def down(ctx: click.Context, grace_s: float) -> None:
    """Stop exactly what `fleet up` started on this machine."""
    from fleet.launcher import down as do_down

    click.echo(do_down(settings_of(ctx), grace_s=grace_s))


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
@click.option("--rows", type=click.IntRange(min=1), default=50_000, show_default=True, help="Rows in all.")
@click.option("--parts", type=click.IntRange(min=1), default=4, show_default=True, help="Shards: interactions_part1.csv ... partK.")
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
              help="Work folder (default fleet-demo, fleet-demo-image or fleet-demo-train); the experiment is left at "
              "DIR/experiment.yaml.")
@click.option("--workers", "n_workers", type=click.IntRange(min=1), default=2, show_default=True, help="CPU workers when no GPU is found.")
@click.pass_context
@handles_errors
def demo(ctx: click.Context, kind: str, directory: Path | None, n_workers: int) -> None:
    """Build a tiny model and a small experiment of KIND (video: seed 001's shape; image: a
    prompts CSV as seed 002's; train: a grid of two runs on a synthetic click table, as seed
    004's), run it on a local fleet, stop it."""
    from fleet.demo import run_demo

    directory = directory or Path("fleet-demo" if kind == "video" else f"fleet-demo-{kind}")
    run_demo(settings_of(ctx), directory, n_workers, kind)


from fleet import cli_control, cli_view  # noqa: E402 - the commands' modules need nothing of this one

for _cmd in (cli_view.status, cli_view.watch, cli_view.gpus, cli_view.metrics, cli_view.export_cmd, cli_view.logs,
             cli_view.report, cli_control.cancel, cli_control.pause, cli_control.resume, cli_control.retry):
    main.add_command(_cmd)

if __name__ == "__main__":
    main()
