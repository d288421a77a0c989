"""What every `fleet` command shares: errors as one line and an exit status, and the
settings loaded at the edge (the group's --config)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from fleet.errors import FleetError
from fleet.settings import FleetSettings, load_settings


def fail(msg: str) -> None:
    """One line on stderr, exit status 1."""
    click.echo(f"fleet: error: {msg}", err=True)
    sys.exit(1)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every FleetError becomes one line and exit 1; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FleetError as e:
            fail(str(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def skips_teardown(fn: Callable[..., Any]) -> Callable[..., Any]:
    """When the command succeeds, the process ends at once (``os._exit(0)``, its output
    flushed first) instead of through the interpreter's teardown: a status or re-run of a
    million samples leaves millions of objects that Python would free one by one, 0.2-0.4 s
    on 2 cores (docs/BENCHMARKS.md, "A million samples"). For commands that hold nothing to
    close (no child, no lock, no half-sent work) once they return; an error still takes
    click's normal path."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        fn(*args, **kwargs)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:  # the reader left (`| head`): what Python prints then is no use
            os._exit(0)
        logging.shutdown()
        os._exit(0)

    return wrapper


def settings_of(ctx: click.Context, **overrides: Any) -> FleetSettings:
    """The settings of this invocation (the group's --config, FLEET_* variables, ``overrides``)."""
    return load_settings(ctx.find_root().obj.get("config"), **overrides)
