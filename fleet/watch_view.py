"""`fleet watch`'s output: a rich Live view of the frames fleet.watch computes, or one JSON
line per frame (``--json``). Ctrl-C ends either quietly (exit 0)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

from fleet.watch import Watcher
from fleet.watch import frames as make_frames


def duration(s: float | None) -> str:
    """``s`` seconds as 12s, 3m05s, 2h07m; '-' for None."""
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(x: float | int | None, fmt: str = "{:.0f}", unit: str = "") -> str:
    return "-" if x is None else fmt.format(x) + unit


def _bar(done: int, failed: int, total: int, width: int = 16) -> str:
    """A text bar (plain characters: it reads in a log file too): done green, failed red."""
    if total <= 0:
        return "[dim]" + "░" * width + "[/dim]"
    d = round(width * done / total)
    f = min(width - d, round(width * failed / total))
    return f"[green]{'█' * d}[/green][red]{'█' * f}[/red][dim]{'░' * (width - d - f)}[/dim] {100 * (done + failed) / total:3.0f}%"


def render(frame: dict, title: str):  # -> rich.console.RenderableType
    """The groups' bars (and the total's), then one row per live worker."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    g = Table(title=f"{escape(title)}", title_justify="left", expand=False)
    for col in ("group", "progress", "done/total", "failed", "queued", "running", "/min", "ETA"):
        g.add_column(col, justify="left" if col in ("group", "progress") else "right", no_wrap=True,
                     min_width=min(40, max(map(len, ["all", *frame["groups"]]))) if col == "group" else None)

    def row(name: str, r: dict, bold: bool = False) -> None:
        bar = _bar(r["done"], r["failed"], r["total"])
        b = (lambda s: f"[b]{s}[/b]") if bold else (lambda s: s)
        g.add_row(b(name), bar, b(f"{r['done']} / {r['total']}"), f"[red]{r['failed']}[/red]" if r["failed"] else "0",
                  str(r["queued"]), str(r["running"]), f"{r['rate_per_min']:.1f}", duration(r["eta_s"]))

    for name, r in frame["groups"].items():
        row(escape(name), r)
    row("all", frame, bold=True)

    w = Table(title="workers", title_justify="left", expand=False,
              caption=None if frame["workers"] else "no live worker", caption_justify="left")
    for col in ("worker", "GPU", "sample", "for", "prog", "done", "fail", "/min", "util", "mem MiB"):
        w.add_column(col, justify="left" if col in ("worker", "GPU", "sample") else "right")
    for r in frame["workers"]:
        w.add_row(escape(r["name"]), ",".join(map(str, r["gpus"])) or "cpu",
                  escape(r["label"] or r["sample_id"] or "") if r["sample_id"] else "[dim]idle[/dim]",
                  duration(r["running_s"]), _num(None if r["progress"] is None else 100 * r["progress"], unit=" %"),
                  str(r["done"]), str(r["failed"]), f"{r['rate_per_min']:.1f}", _num(r["util_pct"], unit=" %"),
                  _num(r["mem_used_mib"]))
    return Group(g, w)


def run_watch(watcher: Watcher, title: str, interval_s: float, as_json: bool, count: int | None) -> None:
    """Print frames until the work is done, ``count`` frames, or Ctrl-C (returns normally)."""
    it = make_frames(watcher, interval_s, count)
    try:
        if as_json:
            _print_json(it)
        else:
            _live(it, title)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `fleet watch --json | head -1`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _print_json(it: Iterator[dict]) -> None:
    for frame in it:
        sys.stdout.write(json.dumps(frame, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def _live(it: Iterator[dict], title: str) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not console.is_terminal:  # a file or a pipe: each frame printed once, no cursor movement, 120 wide
        console = Console(width=max(console.width, 120))
        for frame in it:
            console.print(render(frame, title))
        return
    with Live(console=console, auto_refresh=False, screen=False) as live:
        for frame in it:
            live.update(render(frame, title), refresh=True)
