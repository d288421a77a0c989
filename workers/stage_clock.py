"""Seconds per stage of one sample (text encoding, denoising, VAE decoding, ...), for its record.

A job opens a ``StageClock`` around its GPU part (``with StageClock(device) as clock:``);
code deeper down (the text-embedding cache, the denoising loop's progress iterable) finds
it with ``current()`` without being handed it: diffsynth's pipeline calls that code, and
fleet cannot add arguments on the way. The clock is per thread, so the finish of the
previous sample (another thread, workers/finisher.py) never charges this one.

On a CUDA device every boundary synchronises the thread's current stream first: kernels
run after the Python that queues them returns, and without a sync the denoising stage would
look short and the VAE stage would pay for it. A sync at a boundary costs only the launch
latency of the next stage (the stream is idle for microseconds), never a stage's own work.
The stream, not the whole device: the previous sample's VAE decode runs on a stream of its
own meanwhile (workers/deferred_decode.py), and a device-wide sync would wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from fleet.contract import MetricValue

_local = threading.local()


class StageClock:
    """Accumulates seconds per named stage; ``metrics()`` gives them as ``stage_<name>_s``.

    ``on_step(done, total)``: called after each denoising step (progress for the heartbeat).
    """

    def __init__(self, device: str = "cpu", on_step: Callable[[int, int], None] | None = None) -> None:
        self.cuda = device.startswith("cuda")
        self.on_step = on_step
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # e.g. text-encoder calls vs cache hits
        self.marks: dict[str, float] = {}  # time stamps: denoise_start, denoise_end

    def __enter__(self) -> StageClock:
        self._outer = getattr(_local, "clock", None)
        _local.clock = self
        return self

    def __exit__(self, *exc: object) -> None:
        _local.clock = self._outer

    def sync(self) -> None:
        """Wait for the work queued on this thread's current stream (CUDA only), so that a time
        taken now includes it."""
        if self.cuda:
            import torch

            torch.cuda.current_stream().synchronize()

    def now(self) -> float:
        """A synchronised time stamp (seconds, monotonic)."""
        self.sync()
        return time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + max(0.0, seconds)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Charge the block's time (device work included) to ``stage``."""
        start = self.now()
        try:
            yield
        finally:
            self.add(stage, self.now() - start)

    def progress(self, steps: Iterable[Any]) -> Iterator[Any]:
        """Stand-in for diffsynth's ``progress_bar_cmd``: the denoising loop iterates it, so its
        first and last item bound the ``denoise`` stage; each step also reports progress."""
        items = list(steps)
        start = self.marks["denoise_start"] = self.now()
        try:
            for i, item in enumerate(items):
                yield item
                if self.on_step is not None:
                    self.on_step(i + 1, len(items))
        finally:
            end = self.marks["denoise_end"] = self.now()
            self.add("denoise", end - start)

    def metrics(self) -> dict[str, MetricValue]:
        """``stage_<name>_s`` (seconds, 4 decimals) per stage, and ``<name>_count`` per count."""
        out: dict[str, MetricValue] = {f"stage_{k}_s": round(v, 4) for k, v in self.seconds.items()}
        out.update({f"{k}_count": v for k, v in self.counts.items()})
        return out


def current() -> StageClock | None:
    """The clock this thread's sample runs under, or None (a bare pipeline call)."""
    return getattr(_local, "clock", None)


def progress_or_plain(steps: Iterable[Any]) -> Iterable[Any]:
    """The current clock's progress iterable, or ``steps`` as they are (no tqdm on a worker's stderr)."""
    clock = current()
    return clock.progress(steps) if clock is not None else steps


@contextmanager
def ensure(device: str = "cpu") -> Iterator[StageClock]:
    """The current clock, or a fresh one for the block (a caller that keeps no profile)."""
    clock = current()
    if clock is not None:
        yield clock
        return
    with StageClock(device) as fresh:
        yield fresh


def timed_call(call: Callable[[Callable[[Iterable[Any]], Iterator[Any]]], Any]) -> Any:
    """``call(progress_bar_cmd)``, one diffsynth pipeline call, with its time split into stages:
    ``inputs`` (its units before denoising: noise, input-video encoding; the text encoding is
    charged to ``text`` by the text cache), ``denoise`` (the loop) and ``vae`` (from the
    loop's end to the return: decoding, and for an image its conversion to PIL)."""
    with ensure() as clock:
        text_before = clock.seconds.get("text", 0.0)
        clock.marks.clear()
        start = clock.now()
        out = call(clock.progress)
        end = clock.now()
        first, last = clock.marks.get("denoise_start", end), clock.marks.get("denoise_end", end)
        clock.add("inputs", first - start - (clock.seconds.get("text", 0.0) - text_before))
        clock.add("vae", end - last)
        return out
