"""One optimisation step of the tabular trainer: eager, or replayed from a CUDA graph.

Why a graph: at seed 004's batch sizes a step of this model is some 60 kernel launches
through autocast, autograd and the optimiser, about 4 ms of CPU, against well under 1 ms of
GPU work, so an eager loop leaves the GPU idle most of the time whatever the data path
(docs/BENCHMARKS.md, "Training"). Captured once as a CUDA graph (forward, loss, backward,
the fused AdamW step and the loss sum), a step is one launch and a few input copies, and the
GPU stays busy.

The capture follows PyTorch's whole-network recipe: a few eager steps on a side stream
first (they are real training steps on real batches, not thrown away), gradients set to
None before capture so the graph allocates them in its own pool, and static input buffers
that each later full batch is copied into. A batch of another size (an epoch's last) runs
eagerly beside the graph. A gradient scaler (fp16 AMP) changes its scale from step to step
on the host, so fp16 runs stay eager; so do CPU runs. If capture fails, the step falls back
to eager and says why in ``mode``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps before capture: lets cuBLAS and the allocator settle, as the recipe asks


def graphs_possible(device: torch.device, use_scaler: bool, wanted: bool, data_on_gpu: bool) -> bool:
    """Whether a run's steps are captured: asked for, on CUDA, without a gradient scaler, and
    with the table on the GPU. Beside a DataLoader (its pin-memory thread calls CUDA while the
    capture runs) capture failed on an H200 in the default mode; thread_local mode should
    allow it but has not been run on a GPU yet, so DataLoader runs stay eager for now."""
    return wanted and device.type == "cuda" and not use_scaler and data_on_gpu


class TrainStep:
    """Runs steps on (cat, num, y) batches and sums the loss on the device (``take_loss_sum``)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 amp_dtype: torch.dtype | None, device: torch.device, batch_size: int, use_graph: bool) -> None:
        self.model, self.opt, self.scaler = model, opt, scaler
        self.amp_dtype, self.dev, self.batch_size = amp_dtype, device, batch_size
        self.lossf = nn.BCEWithLogitsLoss()
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.full_steps = 0
        self.use_graph = use_graph
        self.mode = "cuda_graph" if use_graph else "eager"

    def take_loss_sum(self) -> float:
        """The loss summed over rows since the last call (one device read)."""
        value = float(self.loss_sum.item())
        self.loss_sum.zero_()
        return value

    def __call__(self, cat: torch.Tensor, num: torch.Tensor, y: torch.Tensor) -> None:
        if not self.use_graph or len(y) != self.batch_size:
            self._eager(cat, num, y)
            return
        self.full_steps += 1
        if self.graph is not None:
            assert self.static is not None
            for dst, src in zip(self.static, (cat, num, y)):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
        elif self.full_steps <= WARMUP_STEPS:
            side = torch.cuda.Stream(self.dev)
            side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side):
                self._eager(cat, num, y)
            torch.cuda.current_stream(self.dev).wait_stream(side)
        else:
            self._capture(cat, num, y)

    def _forward_loss(self, cat: torch.Tensor, num: torch.Tensor, y: torch.Tensor, cache: bool = True) -> torch.Tensor:
        # Autocast's weight cache must be off while capturing (its casts would be captured
        # once and then go stale), as PyTorch's CUDA graph notes ask.
        with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=cache):
            return self.lossf(self.model(cat, num).float(), y)

    def _eager(self, cat: torch.Tensor, num: torch.Tensor, y: torch.Tensor) -> None:
        loss = self._forward_loss(cat, num, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.loss_sum += loss.detach().double() * len(y)

    def _capture(self, cat: torch.Tensor, num: torch.Tensor, y: torch.Tensor) -> None:
        static = tuple(t.clone() for t in (cat, num, y))
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.dev)
            self.opt.zero_grad(set_to_none=True)
            # thread_local: the DataLoader's pin-memory thread keeps pinning batches during the
            # capture; the default (global) mode makes its CUDA calls fail the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self._forward_loss(*static, cache=False)
                loss.backward()
                self.opt.step()
                self.loss_sum += loss.detach().double() * self.batch_size
        except Exception as exc:  # an op that cannot be captured: keep training, eagerly
            log.warning("training step: CUDA graph capture failed (%s: %s); running eagerly", type(exc).__name__, exc)
            self.use_graph, self.mode = False, f"eager (graph capture failed: {type(exc).__name__})"
            torch.cuda.synchronize(self.dev)
            self._eager(cat, num, y)
            return
        self.graph, self.static = graph, static  # type: ignore[assignment]
        graph.replay()  # capture records the step without running it


def optimizer_for(model: nn.Module, settings: dict[str, Any], device: torch.device, graphed: bool) -> torch.optim.Optimizer:
    """AdamW; fused on CUDA (one kernel for all parameters), capturable when steps are graphed."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"],
                             fused=cuda, capturable=cuda and graphed)


def keep_capturable(opt: torch.optim.Optimizer, graphed: bool) -> None:
    """A resumed optimizer takes its groups' flags from the checkpoint; a graphed run needs capturable."""
    if graphed:
        for group in opt.param_groups:
            group["capturable"] = True
