"""`fleet` commands that steer queued work: cancel, pause, resume, retry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fleet.cli_context import handles_errors, settings_of
from fleet.settings import FleetSettings


def experiment_ref(settings: FleetSettings, arg: str, need_file: bool = False) -> tuple[str, Any]:
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


def require_known(client: Any, namespace: str, name: str, exp: Any, or_paused: bool = False) -> None:
    """InputError when EXPERIMENT was given as a name (``exp`` None) that no enqueue of the
    namespace recorded (``or_paused``: nor a pause): a typo must not act on nothing, say so
    with exit status 0, and leave the real experiment running."""
    if exp is not None:
        return
    from fleet import control, experiment_index
    from fleet.contract import Keys
    from fleet.errors import InputError

    if experiment_index.entry(client, Keys(namespace), name) is not None:
        return
    if or_paused and name in control.paused(client, namespace):
        return
    raise InputError(f"{name}: no experiment of that name in namespace {namespace!r} "
                     "(`fleet status` lists them; or give the experiment file)")


def control_status(client: Any, namespace: str, exp: Any) -> dict[str, Any]:
    """What `fleet status --json` says of pauses (and of the experiment's priority)."""
    from fleet import control
    from fleet.priority import experiment_step, name_of

    paused = control.paused(client, namespace)
    if exp is not None:
        return {"paused": exp.name in paused or control.ALL in paused, "priority": name_of(experiment_step(exp))}
    return {"paused": control.ALL in paused, "paused_experiments": sorted(p for p in paused if p != control.ALL)}


def paused_line(d: dict[str, Any]) -> str:
    if "paused_experiments" not in d:
        return "paused: workers take none of its samples until `fleet resume`"
    if d["paused"]:
        return "paused: the whole fleet (workers take no samples until `fleet resume`)"
    return "paused experiments: " + ", ".join(d["paused_experiments"])


@click.command()
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
    name, exp = experiment_ref(settings, experiment)
    client = connect(settings)
    require_known(client, settings.namespace, name, exp)
    res = do_cancel(client, settings.namespace, name, list(groups) or None)
    if as_json:
        click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        return
    which = f" (groups {', '.join(groups)})" if groups else ""
    click.echo(f"cancelled {res.cancelled} queued samples of {name}{which} ({res.running} running asked to stop)")


@click.command()
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
    name, exp = experiment_ref(settings, experiment) if experiment is not None else (None, None)
    client = connect(settings)
    if name is not None:
        require_known(client, settings.namespace, name, exp)
    res = do_pause(client, settings.namespace, name)
    if as_json:
        click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        return
    what = name if name is not None else f"the whole fleet (namespace {settings.namespace})"
    click.echo(f"paused {what}: {res.parked} queued samples parked ({res.running} running will finish)")


@click.command()
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
    name, exp = experiment_ref(settings, experiment) if experiment is not None else (None, None)
    client = connect(settings)
    if name is not None:
        require_known(client, settings.namespace, name, exp, or_paused=True)
    res = do_resume(client, settings.namespace, name)
    if as_json:
        click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        return
    what = name if name is not None else f"the whole fleet (namespace {settings.namespace})"
    line = f"resumed {what}: {res.unparked} parked samples back at the front of their queues"
    if name is not None and ALL in res.paused:
        line += f"; {name} stays paused while the whole fleet is (`fleet resume` with no experiment)"
    click.echo(line)


@click.command()
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
    _, exp = experiment_ref(settings, str(experiment), need_file=True)
    res = do_retry(connect(settings), settings.namespace, exp, list(groups) or None, policy=settings.placement,
                   memory_classes_mib=settings.memory_classes_mib, kinds=settings.kinds)
    if as_json:
        click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        return
    line = f"retried {res.retried} failed samples of {exp.name}"
    if res.not_planned:
        line += f" ({res.not_planned} failed samples are no longer in its plan)"
    click.echo(line)
