"""The built-in ``tabular`` trainer (seed 004's recommender shape): an embedding per
categorical column and the standardised numeric columns, through an MLP, to a click logit;
binary cross-entropy, AUC and log-loss on a held-out split.

Seed 004's data-loading and GPU settings are the run's own: DataLoader processes
(``num_workers``), pinned memory, persistent workers, AMP in bf16 or fp16 (with a gradient
scaler), the batch size. The table is converted to tensors once; a batch is one indexing
of them (no per-row Python).

Checkpoints (``checkpoint.pt``, written atomically) hold the model, optimiser, scaler, the
epoch and the batch reached, the loss sums and every finished epoch's metrics, so a run
resumes on any worker where the last checkpoint left it: an epoch's batch order comes from
(seed, epoch), and a resumed epoch skips the batches already done. ``metrics.jsonl`` is
rewritten from the checkpoint's list at each epoch's end, so no epoch appears twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleet.errors import InputError, Preempted
from workers.atomic_output import write_atomically
from workers.train_step import TrainStep, graphs_possible, keep_capturable, optimizer_for


@dataclass
class TableData:
    cat: torch.Tensor  # [N, C] int64 codes, 0 = unseen
    num: torch.Tensor  # [N, F] float32
    y: torch.Tensor  # [N] float32 0/1
    cardinalities: list[int]


def load_table(shards: list[str], label: str, categorical: list[str], numeric: list[str]) -> TableData:
    """Read the shards in order as one table and encode it; InputError naming file and column."""
    import pandas as pd

    frames = []
    for p in shards:
        try:
            frames.append(pd.read_csv(p, usecols=[*categorical, *numeric, label], dtype={c: str for c in categorical}))
        except (OSError, ValueError) as e:
            raise InputError(f"{p}: cannot read the table: {str(e).splitlines()[0]}") from None
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise InputError(f"{shards[0]}: the table has no rows")
    y = pd.to_numeric(df[label], errors="coerce")
    if y.isna().any() or not set(y.unique()) <= {0, 1}:
        raise InputError(f"{shards[0]}: label {label!r} must be 0 or 1 in every row")
    cats, cards = [], []
    for c in categorical:
        codes, uniques = pd.factorize(df[c].fillna(""), sort=True)
        cats.append(torch.from_numpy(codes.astype("int64") + 1))
        cards.append(len(uniques))
    nums = []
    for c in numeric:
        col = pd.to_numeric(df[c], errors="coerce")
        if col.isna().any():
            raise InputError(f"{shards[0]}: numeric column {c!r} holds a value that is not a number "
                             f"(row {int(col.isna().to_numpy().argmax()) + 1})")
        nums.append(torch.from_numpy(col.to_numpy(dtype="float32")))
    n = len(df)
    return TableData(torch.stack(cats, 1) if cats else torch.zeros(n, 0, dtype=torch.int64),
                     torch.stack(nums, 1) if nums else torch.zeros(n, 0), torch.from_numpy(y.to_numpy("float32")), cards)


class TabularNet(nn.Module):
    def __init__(self, cardinalities: list[int], n_numeric: int, dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c + 1, dim) for c in cardinalities)
        width = len(cardinalities) * dim + n_numeric
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        parts = [e(cat[:, i]) for i, e in enumerate(self.embeddings)] + [num]
        return self.mlp(torch.cat(parts, 1)).squeeze(1)


class Batches(torch.utils.data.Dataset):
    """A batch is one index tensor into the pre-converted table (DataLoader with batch_size=None)."""

    def __init__(self, cat: torch.Tensor, num: torch.Tensor, y: torch.Tensor) -> None:
        self.cat, self.num, self.y = cat, num, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.cat[idx], self.num[idx], self.y[idx]


class EpochOrder(torch.utils.data.Sampler):
    """Batches of ``rows`` in an order fixed by (seed, epoch), from batch ``skip`` on."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return max(0, -(-len(self.rows) // self.batch_size) - self.skip)

    def order(self) -> torch.Tensor:
        """This epoch's rows in their order (all of them; ``skip`` is the caller's)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return self.rows[torch.randperm(len(self.rows), generator=g)]

    def __iter__(self):
        order = self.order()
        for start in range(self.skip * self.batch_size, len(order), self.batch_size):
            yield order[start : start + self.batch_size]


def auc_score(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by ranks (Mann-Whitney U), ties given their mean rank."""
    pos = labels.sum().item()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s = scores[order].double()
    ranks = torch.empty_like(s)
    ranks[:] = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    if len(counts) < len(s):  # average the ranks of ties
        ends = torch.cumsum(counts, 0).double()
        ranks = ((ends - (counts.double() - 1) / 2))[inverse]
    ranked = torch.empty_like(ranks)
    ranked[order] = ranks
    return float((ranked[labels > 0.5].sum() - pos * (pos + 1) / 2) / (pos * neg))


class _GpuBatches:
    """Batches indexed on the GPU from a table held there, in the sampler's order."""

    def __init__(self, table: Batches, sampler: EpochOrder, dev: torch.device) -> None:
        self.table, self.sampler, self.dev = table, sampler, dev

    def __iter__(self):
        # The epoch's order copied to the device once: a copy per step from pageable memory
        # makes the host wait for the GPU's queue each step, so the GPU idled while the host
        # prepared the next step (32 % busy with graphed steps on an H200).
        order = self.sampler.order().to(self.dev)
        bs = self.sampler.batch_size
        for start in range(self.sampler.skip * bs, len(order), bs):
            yield self.table[order[start : start + bs]]


@dataclass
class TrainContext:
    device: str
    run_dir: Path
    sample_id: str
    stopping: Callable[[], bool]
    report: Callable[[float, dict[str, Any]], None]
    telemetry: Callable[[], dict[str, Any]]  # GPU figures since the last call (mean util, peak memory, ...)


def amp_setup(settings: dict[str, Any], device: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is used); InputError for a dtype the device lacks."""
    if not settings["use_amp"]:
        return None, False
    dt = settings["amp_dtype"]
    if device.startswith("cuda"):
        if dt == "bf16" and not torch.cuda.is_bf16_supported():
            raise InputError(f"amp_dtype bf16: {torch.cuda.get_device_name(0)} has no bfloat16; use fp16 or use_amp: false")
        return (torch.bfloat16, False) if dt == "bf16" else (torch.float16, True)
    if dt == "fp16":
        raise InputError("amp_dtype fp16: this worker computes on the CPU, which has no fp16 AMP "
                         "(fp16 needs a CUDA GPU); use bf16 or use_amp: false")
    return torch.bfloat16, False


def train(data: TableData, settings: dict[str, Any], tc: TrainContext) -> dict[str, Any]:
    """Train (or resume) one run; returns its final figures. Raises Preempted when stopped."""
    s = settings
    dev = torch.device(tc.device)
    amp_dtype, use_scaler = amp_setup(s, tc.device)
    torch.manual_seed(s["seed"])
    n = len(data.y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(s["seed"]))
    n_val = max(1, int(n * s["val_fraction"]))
    val_rows, train_rows = perm[:n_val], perm[n_val:]
    mean, std = data.num[train_rows].mean(0), data.num[train_rows].std(0).clamp_min(1e-6)
    num = (data.num - mean) / std
    model = TabularNet(data.cardinalities, num.shape[1], s["embedding_dim"], s["hidden"]).to(dev)
    graphed = graphs_possible(dev, use_scaler, s.get("cuda_graph", True), bool(s.get("data_on_gpu")))
    opt = optimizer_for(model, s, dev, graphed)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    ckpt_path = tc.run_dir / "checkpoint.pt"
    state = {"epoch": 0, "batch": 0, "loss_sum": 0.0, "loss_n": 0, "metrics": []}
    resumed = (0, 0)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck.get("sample_id") == tc.sample_id:  # a checkpoint of other data or settings is not resumed
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            keep_capturable(opt, graphed)
            state = ck["state"]
            resumed = (state["epoch"], state["batch"])

    def save() -> None:
        blob = {"sample_id": tc.sample_id, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "state": state, "settings": s}
        write_atomically(ckpt_path, lambda tmp: torch.save(blob, tmp))

    sampler = EpochOrder(train_rows, s["batch_size"], s["seed"])
    workers = s["num_workers"]
    loader: Any
    if s.get("data_on_gpu") and dev.type == "cuda":
        # The table once in GPU memory, a batch one indexing there: no worker processes, no
        # host-to-device copy per step (the GPU's own data path; workers and pinning unused).
        on_gpu = Batches(data.cat.to(dev), num.to(dev), data.y.to(dev))
        loader = _GpuBatches(on_gpu, sampler, dev)
    else:
        loader = torch.utils.data.DataLoader(
            Batches(data.cat, num, data.y), sampler=sampler, batch_size=None, num_workers=workers,
            pin_memory=s["pin_memory"] and dev.type == "cuda",
            persistent_workers=s["persistent_workers"] and workers > 0)
    batches_per_epoch = -(-len(train_rows) // s["batch_size"])
    step = TrainStep(model, opt, scaler, amp_dtype, dev, s["batch_size"], graphed)
    last_save = time.monotonic()
    try:
        while state["epoch"] < s["epochs"]:
            epoch = state["epoch"]
            sampler.epoch, sampler.skip = epoch, state["batch"]
            t0, seen, started_at = time.monotonic(), 0, time.time()
            tc.telemetry()  # start this epoch's window
            model.train()
            # The loss is summed on the device (TrainStep): reading it every step (.item()) would
            # wait for the GPU each time and leave it idle while Python fetches the next batch.

            def flush_loss() -> None:
                state["loss_sum"] += step.take_loss_sum()

            for cat, x, y in loader:
                cat, x, y = (t.to(dev, non_blocking=True) for t in (cat, x, y))
                step(cat, x, y)
                state["batch"] += 1
                state["loss_n"] += len(y)
                seen += len(y)
                if tc.stopping():
                    flush_loss()
                    save()
                    raise Preempted(f"stopped at epoch {epoch + 1}, batch {state['batch']}: checkpoint saved")
                if time.monotonic() - last_save >= s["checkpoint_every_s"]:
                    flush_loss()
                    save()
                    last_save = time.monotonic()
                if state["batch"] % 20 == 0:
                    tc.report((epoch + state["batch"] / batches_per_epoch) / s["epochs"], {})
            flush_loss()
            wall = time.monotonic() - t0
            gpu = tc.telemetry()  # the training steps' window, evaluation left out
            val = evaluate(model, data.cat[val_rows], num[val_rows], data.y[val_rows], dev, amp_dtype)
            line = {"epoch": epoch + 1, "loss": round(state["loss_sum"] / max(1, state["loss_n"]), 6), **val,
                    "samples_per_s": round(seen / wall, 1) if wall > 0 else None, "epoch_s": round(wall, 3),
                    "started_at": round(started_at, 3), "step_mode": step.mode, **gpu}
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_n=0)
            state["metrics"].append(line)
            save()
            last_save = time.monotonic()
            text = "".join(json.dumps(m) + "\n" for m in state["metrics"])
            write_atomically(tc.run_dir / "metrics.jsonl", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    finally:
        del loader  # ends persistent DataLoader processes now, not at garbage collection
    return {**state["metrics"][-1], "resumed_from_epoch": resumed[0], "resumed_from_batch": resumed[1]}


@torch.no_grad()
def evaluate(model: nn.Module, cat: torch.Tensor, num: torch.Tensor, y: torch.Tensor, dev: torch.device,
             amp_dtype: torch.dtype | None) -> dict[str, float]:
    model.eval()
    logits = []
    for start in range(0, len(y), 65536):
        c, x = cat[start : start + 65536].to(dev), num[start : start + 65536].to(dev)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits.append(model(c, x).float())
    z, y = torch.cat(logits), y.to(dev)  # AUC's sort on the device: the CPU's took longer than an epoch's steps
    logloss = nn.functional.binary_cross_entropy_with_logits(z, y).item()
    return {"val_logloss": round(logloss, 6), "val_auc": round(auc_score(z, y), 6)}
