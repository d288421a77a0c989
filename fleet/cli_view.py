"""`fleet` commands that look at a fleet: status, watch, report, export, logs, gpus, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fleet.cli_context import handles_errors, settings_of, skips_teardown
from fleet.cli_control import control_status, experiment_ref, paused_line


@click.command()
@click.argument("experiment", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--group", "--category", "groups", multiple=True, help="Only this group (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: total, done, queued, running, failed, by_group.")
@click.option("--failed", "show_failed", is_flag=True,
              help="Also the failures: how many of each error type, then each failed sample with its error.")
@click.option("--export", "export_csv", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the failures to this CSV (seed 002's failure lists, one file for the fleet).")
@click.option("--verify-outputs", is_flag=True,
              help="With EXPERIMENT: stat every done output, also in folders unchanged since they were verified.")
@click.pass_context
@skips_teardown
@handles_errors
def status(ctx: click.Context, experiment: Path | None, groups: tuple[str, ...], as_json: bool,
           show_failed: bool, export_csv: Path | None, verify_outputs: bool) -> None:
    """Done / queued / running / failed, per group and in total."""
    from fleet.broker import connect
    from fleet.status import experiment_status, experiments_overview, failures, global_status

    settings = settings_of(ctx)
    client = connect(settings)
    if experiment is not None:
        from fleet.experiment import load_experiment

        exp = load_experiment(experiment, settings.output_dir, settings.kinds)
        st = experiment_status(client, settings.namespace, exp, list(groups) or None, settings.kinds,
                               verify_outputs=verify_outputs)
    else:
        st = global_status(client, settings.namespace)
    d = st.as_dict()
    if experiment is None:
        d["experiments"] = experiments_overview(client, settings.namespace)  # one row per experiment enqueued
    d.update(control_status(client, settings.namespace, exp if experiment is not None else None))  # paused, priority
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
    cols = ("total", "done", "queued", "running", "failed") + (("pending",) if d.get("pending") else ())
    for col in ("group", *cols):
        t.add_column(col, justify="left" if col == "group" else "right")
    for cat, row in d["by_group"].items():
        t.add_row(escape(cat), *(str(row[k]) for k in cols))
    t.add_row("[b]all[/b]", *(f"[b]{d[k]}[/b]" for k in cols))
    console = Console()
    if d.get("experiments"):
        from fleet.status import overview_table

        console.print(overview_table(d["experiments"]))
    console.print(t)
    if d.get("paused") or d.get("paused_experiments"):
        console.print(paused_line(d), highlight=False)
    if show_failed and failed:
        for error_type, n in by_type(failed).items():
            example = next(f for f in failed if f.error_type == error_type)
            first = (example.message.splitlines() or [""])[0][:160]
            console.print(f"[red]{n} x {shown(error_type)}[/red], e.g. {shown(example.label)}: {shown(first)}",
                          highlight=False)
    if export_csv is not None:
        console.print(f"wrote {len(failed)} failures to {escape(str(export_csv))}", highlight=False)
    for f in failed if show_failed else []:
        console.print(f"[red]failed[/red] {f.sample_id} {shown(f.group)} {shown(f.label)} attempt {f.attempt} on {shown(f.worker)}: "
                      f"{shown(f.error_type)}: {shown(f.message)}", highlight=False)


def shown(text: str) -> str:
    """``text`` for the terminal: rich markup escaped, and every control character but the
    newline and tab written as an escape (``\\x1b``): a failed command's last output lines
    may hold terminal control sequences or binary bytes."""
    from rich.markup import escape

    return escape("".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text))


@click.command()
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



@click.command()
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
    from fleet.launcher import run_dir
    from fleet.slot_plans import PLAN_FILE, read_plans

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
    plans = read_plans(run_dir(settings) / PLAN_FILE)  # the supervisor's slots per GPU and why
    if as_json:
        click.echo(to_json(snaps, workers, plans))
        return
    from rich.console import Console

    console = Console()
    if not snaps:
        console.print("no GPU found (NVML not available or no NVIDIA GPU)")
    else:
        console.print(table(snaps, workers, plans))
    cpu = [w.name for w in workers if not w.gpus]
    if cpu:
        console.print("CPU workers: " + ", ".join(cpu))
    if client is None:
        from fleet.credentials import mask_url

        console.print(f"(no fleet reachable at {mask_url(settings.effective_broker_url)}: workers not shown)")


@click.command()
@click.pass_context
@handles_errors
def metrics(ctx: click.Context) -> None:
    """Serve Prometheus /metrics on 127.0.0.1 (port: setting metrics_port) behind Flower's login:
    samples per experiment, group and state, workers, GPUs. `fleet up` starts it."""
    from fleet.metrics_server import serve

    serve(settings_of(ctx))



@click.command("export")
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
    name, exp = experiment_ref(settings, experiment)
    client = connect(settings)
    root = exp.output if exp is not None else output_root_of(client, settings.namespace, name)
    rows = finished_rows(client, settings.namespace, name, root)
    write(rows, fmt, out)
    if out is not None:
        click.echo(f"wrote {len(rows)} finished samples of {name} to {out}")


@click.command()
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

@click.command()
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
