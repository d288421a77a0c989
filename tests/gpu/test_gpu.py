"""On a real NVIDIA GPU: the inventory, a worker on GPU 0 generating on CUDA, two packed slots.

Run on a GPU host: ``python3 -m pytest -m gpu tests/gpu -p no:cacheprovider``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.gpu.conftest import GpuFleet
from tests.media import read_frames

pytestmark = pytest.mark.gpu


def test_fleet_gpus_shows_the_card(gpu_fleet: GpuFleet) -> None:
    view = json.loads(gpu_fleet.fleet("gpus", "--json").stdout)
    gpus = view["gpus"]
    assert gpus, "NVML found no GPU"
    for g in gpus:
        assert "NVIDIA" in g["name"], g
        assert g["memory_total_mib"] > 0 and g["memory_used_mib"] is not None and g["memory_free_mib"] is not None, g
        assert g["utilization_pct"] is not None, g
        assert g["temperature_c"] is not None, g
        assert g["fleet_workers"] == []  # none started yet


def test_worker_on_gpu0_generates_on_cuda(gpu_fleet: GpuFleet, tiny_experiment) -> None:
    exp = tiny_experiment(n_videos=1)
    gpu_fleet.start_worker("--gpu", "0")
    assert json.loads(gpu_fleet.fleet("enqueue", str(exp), "--json").stdout)["enqueued"] == 1
    (rec,) = gpu_fleet.wait_done(1, timeout_s=240)
    assert rec.gpus == [0]
    assert rec.worker == f"gpu0@{socket.gethostname()}"
    assert rec.model_loaded
    frames = read_frames(Path(rec.output_path))
    assert frames.shape == (9, 128, 128, 3)
    log = gpu_fleet.log_tails()
    device = "cpu" if os.environ.get("FLEET_FAKE_GPUS") else "cuda"  # a fake inventory: debugging without a GPU
    assert f"ready on GPUs 0 ({device})" in log, log  # the worker computes on CUDA, not on a CPU fallback
    # The worker shows on its GPU in `fleet gpus`.
    view = json.loads(gpu_fleet.fleet("gpus", "--json").stdout)
    on0 = next(g for g in view["gpus"] if g["index"] == 0)
    assert [w["name"] for w in on0["fleet_workers"]] == [rec.worker]


def test_two_packed_slots_on_one_gpu_both_generate(gpu_fleet: GpuFleet, tiny_experiment) -> None:
    exp = tiny_experiment(n_videos=4, seeds=[42, 142])
    gpu_fleet.start_worker("--gpu", "0", "--slot", "0")
    gpu_fleet.start_worker("--gpu", "0", "--slot", "1")
    assert json.loads(gpu_fleet.fleet("enqueue", str(exp), "--json").stdout)["enqueued"] == 8
    recs = gpu_fleet.wait_done(8, timeout_s=300)
    host = socket.gethostname()
    assert {tuple(r.gpus) for r in recs} == {(0,)}
    assert {r.worker for r in recs} == {f"gpu0@{host}", f"gpu0s1@{host}"}, [(r.worker, r.gpus) for r in recs]
    for r in recs:
        assert read_frames(Path(r.output_path)).shape == (9, 128, 128, 3)


def test_image_worker_on_gpu0_makes_the_bare_pipelines_image(gpu_fleet: GpuFleet, tiny_image_model_dir: Path,
                                                              tmp_path: Path) -> None:
    """The image kind on CUDA in bf16: names and seeds, and the worker's PNG is the one a bare
    loop in this process makes for the row's seed."""
    import numpy as np
    import yaml
    from PIL import Image

    (tmp_path / "prompts.csv").write_text('image_id,prompt\r\n0001,"a cat, on a mat"\r\n0002,一只猫\r\n', encoding="utf-8")
    exp = tmp_path / "image.yaml"
    exp.write_text(yaml.safe_dump({"kind": "image", "prompts": "prompts.csv", "seed_start": 7, "width": 128,
                                   "height": 128, "steps": 4, "cfg_scale": 4.0, "cfg_truncation_step": 2,
                                   "dtype": "bf16", "model": {"dir": str(tiny_image_model_dir)}, "output": "out"}))
    gpu_fleet.start_worker("--gpu", "0")
    assert json.loads(gpu_fleet.fleet("enqueue", str(exp), "--json").stdout)["enqueued"] == 2
    recs = gpu_fleet.wait_done(2, timeout_s=240)
    assert sorted(Path(r.output_path).name for r in recs) == ["0001_seed7.png", "0002_seed8.png"]
    assert all(r.gpus == [0] for r in recs)
    import threading

    from fleet.contract import TaskPayload
    from fleet.experiment import load_experiment
    from fleet.planner import payloads, plan_experiment
    from workers.jobs.base import JobContext
    from workers.jobs.image import run as run_image
    from workers.model_cache import ModelCache

    plan = plan_experiment(load_experiment(exp))
    task = TaskPayload.model_validate_json(next(p for _, _, p in payloads(plan, plan.samples[:1], lambda s: "q")))
    bare = tmp_path / "bare" / "0001_seed7.png"
    task = task.model_copy(update={"output_path": str(bare), "output_root": str(bare.parent)})
    run_image(task, JobContext(gpus=(0,), device="cuda", models=ModelCache(), work_dir=tmp_path / "w",
                               stopping=threading.Event()))
    with Image.open(bare) as a, Image.open(tmp_path / "out" / "0001_seed7.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
