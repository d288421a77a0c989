"""A video sample's VAE decode run beside the next sample's denoising, on a CUDA stream of its own.

With the overlapped finish (workers/finisher.py) a video sample's CPU tail is hidden, and
what is left on the worker's path is the GPU part: denoising, then the VAE decode. At the
bench shape the tiled decode is most of it (1.75 s of a 2.3 s GPU stretch, and compute
bound), while the denoising of a small DiT is bound by kernel launches and leaves the GPU
half idle. So the decode of sample N runs in a thread of its own (one per device), on a
stream of its own, while the worker's thread denoises sample N + 1 (docs/ARCHITECTURE.md,
"Overlapped finish").

How a job uses it: ``install(pipe)`` wraps the pipeline's ``vae.decode`` once. Inside
``with capturing():`` the wrapped decode does no work and returns a ``PendingDecode`` (the
latents and the decode's arguments), which diffsynth's pipeline hands back as its output
(``output_type="floatpoint"`` returns the decode's value untouched). ``submit`` queues it on
the device's decoder and returns a Future of ``(frames, stage seconds)``; the job's finish
waits for it before encoding. Outside ``capturing()`` the wrapped decode decodes in place, as
before, so a bare loop and the sequential worker are unchanged.

The frames are the in-place decode's, bit for bit: the same function on the same latents,
only on another stream; the stream waits on an event recorded after the latents were made.
Three things are per thread in torch and are set in the decoder's thread: grad mode (off,
as in the pipeline's own ``__call__``), the current device, and the current stream. The
Wan VAE keeps its causal convolution caches on the model and ``clear_cache`` resets the
encoder's with the decoder's, so a motion sample's input-video encoding (the worker's
thread) and a decode (the decoder's) take the VAE's lock in turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fleet.contract import MetricValue
from workers.stage_clock import StageClock

ATTRIBUTE = "fleet_deferred_decode"  # the VAE attribute holding its wrapping (install is idempotent)

_local = threading.local()
_decoders: dict[str, Decoder] = {}
_decoders_lock = threading.Lock()


@dataclass
class PendingDecode:
    """What the wrapped ``vae.decode`` returns inside ``capturing()``: a decode not yet done."""

    vae: Any
    latents: Any
    kwargs: dict[str, Any]


class _Wrapping:
    """The VAE's own ``decode`` and ``encode``, the lock that makes them take turns, and
    whether decodes may still be deferred (``stop_deferring``)."""

    def __init__(self, vae: Any) -> None:
        self.lock = threading.Lock()
        self.decode = vae.decode
        self.encode = vae.encode
        self.deferring = True


def install(pipe: Any) -> bool:
    """Wrap ``pipe.vae``'s decode (captured inside ``capturing()``) and encode (locked). True
    when the pipeline's decodes may be deferred; False when it has no such VAE (nothing
    changed) or ``stop_deferring`` was called for it."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not callable(getattr(vae, "decode", None)) or not callable(getattr(vae, "encode", None)):
        return False
    found: _Wrapping | None = getattr(vae, ATTRIBUTE, None)
    if found is not None:
        return found.deferring
    w = _Wrapping(vae)

    def decode(latents: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "capturing", False) and not args:
            return PendingDecode(vae, latents, kwargs)
        with w.lock:
            return w.decode(latents, *args, **kwargs)

    def encode(*args: Any, **kwargs: Any) -> Any:
        with w.lock:
            return w.encode(*args, **kwargs)

    vae.decode, vae.encode = decode, encode
    setattr(vae, ATTRIBUTE, w)
    return True


def stop_deferring(pipe: Any) -> bool:
    """Decode ``pipe``'s samples in place from now on: a decode beside the next denoising
    needs both at once in GPU memory, and after running out of it the worker trades the
    overlap for the memory. True when it was deferring until now."""
    w: _Wrapping | None = getattr(getattr(pipe, "vae", None), ATTRIBUTE, None)
    if w is None or not w.deferring:
        return False
    w.deferring = False
    return True


@contextmanager
def capturing() -> Iterator[None]:
    """Within the block, this thread's calls of a wrapped ``vae.decode`` return a PendingDecode."""
    before = getattr(_local, "capturing", False)
    _local.capturing = True
    try:
        yield
    finally:
        _local.capturing = before


Frames = Any  # what the convert function returns: for video a (T, H, W, 3) uint8 array on the host
Decoded = tuple[Frames, dict[str, MetricValue]]


class Decoder:
    """One thread and one CUDA stream (on CUDA) that decode a device's pending decodes in order."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-decode")
        self._stream: Any = None

    def submit(self, pending: PendingDecode, convert: Callable[[Any], Frames]) -> Future[Decoded]:
        """Queue ``pending``'s decode, then ``convert`` of its output (on the device too, e.g.
        the frames to the host). Call from the thread that made the latents: its stream is the
        one the decode waits on. The Future gives ``(frames, {"stage_vae_s", "stage_convert_s"})``."""
        ready = None
        if self.cuda:
            import torch

            ready = torch.cuda.Event()
            ready.record()  # on this thread's current stream, after the kernels that made the latents
        return self._pool.submit(self._run, pending, convert, ready)

    def _run(self, pending: PendingDecode, convert: Callable[[Any], Frames], ready: Any) -> Decoded:
        import torch

        with torch.no_grad(), self._on_stream(pending.latents, ready), StageClock(self.device) as clock:
            w: _Wrapping = getattr(pending.vae, ATTRIBUTE)
            with clock.timed("vae"), w.lock:
                video = w.decode(pending.latents, **pending.kwargs)
            with clock.timed("convert"):
                frames = convert(video)  # to the host: this stream's work is done when it returns
            # Only now: the latents' memory (allocated on the worker's stream) must not be handed
            # out again while this stream's queued kernels still read it.
            pending.latents = None
            del video
            return frames, clock.metrics()

    @contextmanager
    def _on_stream(self, latents: Any, ready: Any) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        import torch

        with torch.cuda.device(self.device):
            if self._stream is None:
                # High priority: the decode is the pipeline's longest stage, the denoising
                # beside it fills the SMs the decode leaves idle.
                self._stream = torch.cuda.Stream(self.device, priority=-1)
            self._stream.wait_event(ready)
            if isinstance(latents, torch.Tensor) and latents.is_cuda:
                # Tell the caching allocator this stream uses them too (made on another stream).
                latents.record_stream(self._stream)
            with torch.cuda.stream(self._stream):
                yield

    def drain(self, timeout_s: float | None = None) -> None:
        """Wait until the decodes queued so far are done (their errors are their finish's): the
        one thread takes them in order, so a no-op queued now ends after them."""
        try:
            self._pool.submit(lambda: None).result(timeout=timeout_s)
        except TimeoutError:
            return


def decoder(device: str) -> Decoder:
    """The decoder of ``device`` (created on first use; one per device per process)."""
    with _decoders_lock:
        found = _decoders.get(device)
        if found is None:
            found = _decoders[device] = Decoder(device)
        return found


def drain(device: str | None = None) -> None:
    """Wait for the pending decodes of ``device`` (all devices when None): before a model is
    dropped, so two models' work never shares the GPU's memory at once."""
    with _decoders_lock:
        found = [d for k, d in _decoders.items() if device is None or k == device]
    for d in found:
        d.drain()
