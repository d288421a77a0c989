"""``fleet make-tabular-data DIR``: a synthetic, sharded click table shaped like seed 004's
KuaiRand interactions (which cannot be downloaded here), with a learnable signal.

Columns: user_id, video_id, tab (categorical), hour, duration_s, watch_ratio_prev (numeric)
and is_click (the label). A click's log-odds are a per-user and a per-video bias plus
effects of the tab, the hour and the duration, plus noise, so a model that learns them
reaches an AUC well above 0.5. Written as ``interactions_part1.csv`` ... ``_partK.csv``
(each file complete or absent: written under a temporary name and renamed); the same
arguments give the same bytes. Plain Python: the producer needs no numpy or torch.
"""

from __future__ import annotations

import csv
import math
import os
import random
from pathlib import Path

from fleet.errors import InputError

COLUMNS = ["user_id", "video_id", "tab", "hour", "duration_s", "watch_ratio_prev", "is_click"]
CATEGORICAL = ["user_id", "video_id", "tab"]
NUMERIC = ["hour", "duration_s", "watch_ratio_prev"]
LABEL = "is_click"


def write_tabular_data(folder: Path, rows: int = 50_000, parts: int = 4, seed: int = 0, users: int = 500,
                       videos: int = 2000) -> list[Path]:
    """Write the table as ``parts`` shards into ``folder``; returns the files in order."""
    if rows < parts or parts < 1:
        raise InputError(f"make-tabular-data: need rows >= parts >= 1, got rows {rows}, parts {parts}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    user_bias = [rng.gauss(0, 1.0) for _ in range(users)]
    video_bias = [rng.gauss(0, 1.0) for _ in range(videos)]
    tab_effect = [0.0, 0.4, 0.9, -0.3, -0.8]
    out: list[Path] = []
    per = -(-rows // parts)
    done = 0
    for k in range(1, parts + 1):
        n = min(per, rows - done)
        path = folder / f"interactions_part{k}.csv"
        tmp = folder / f".{path.name}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for _ in range(n):
                u, v, tab, hour = rng.randrange(users), rng.randrange(videos), rng.randrange(5), rng.randrange(24)
                duration = round(rng.lognormvariate(3.0, 0.8), 2)
                prev = round(rng.random(), 4)
                logit = (user_bias[u] + video_bias[v] + tab_effect[tab] + 0.7 * math.sin(hour / 24 * 2 * math.pi)
                         - 0.6 * math.log1p(duration) / 3 + 1.5 * (prev - 0.5) + rng.gauss(0, 0.5) - 0.3)
                click = 1 if rng.random() < 1 / (1 + math.exp(-logit)) else 0
                w.writerow([u, v, tab, hour, duration, prev, click])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        out.append(path)
        done += n
    return out


EXPERIMENT = """\
# A fleet training experiment (kind: train) on the synthetic data next to it.
kind: train
name: {name}
data: data                  # interactions_part1.csv ... read as one table
label: is_click
categorical: [user_id, video_id, tab]
numeric: [hour, duration_s, watch_ratio_prev]
epochs: {epochs}
batch_size: 512
lr: 0.003
num_workers: 2              # DataLoader processes
pin_memory: true
persistent_workers: true
use_amp: {use_amp}
amp_dtype: bf16
checkpoint_every_s: 30
memory_mib: 2000
grid:
  embedding_dim: [8, 16]
output: runs                # runs/<run name>/: checkpoint.pt, metrics.jsonl, result.json
"""
