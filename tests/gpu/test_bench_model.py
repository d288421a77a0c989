"""The ``bench`` model preset (workers.tiny_model): builds, loads through the model cache, makes a sample.

Marked ``gpu`` to keep it out of the default suite (about 40 s on 2 CPU cores). It runs
on CUDA where there is one, else on the CPU, so it also runs by hand on a CPU machine:
``python -m pytest -m gpu tests/gpu/test_bench_model.py``. The sample runs in a child
process, so this test process never touches CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, torch
from workers.model_cache import ModelCache
from workers.tiny_model import build_tiny_model, spec_from_dir
from workers.wan_model import load_pipeline
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cpu":
    torch.set_num_threads(2)
desc = build_tiny_model(sys.argv[1], preset="bench")
spec = spec_from_dir(sys.argv[1])
cache = ModelCache()
pipe, loaded, load_s = cache.get("video", spec.model_dump_json(), device, lambda: load_pipeline(spec, device))
frames = pipe(prompt="a red kite", seed=1, num_inference_steps=1, height=64, width=64, num_frames=5, cfg_scale=1.0,
              tiled=False, progress_bar_cmd=lambda x: x)
print(json.dumps({"device": device, "loaded": loaded, "desc": desc, "architectures": spec.architectures,
                  "dit": type(pipe.dit).__name__,
                  "layers": len(pipe.dit.blocks), "dim": pipe.dit.dim, "vae": type(pipe.vae).__name__,
                  "dtype": str(next(pipe.dit.parameters()).dtype), "frames": len(frames), "size": list(frames[0].size)}))
"""


def test_bench_preset_builds_loads_and_samples(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="2", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(REPO)])
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "bench")], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["loaded"] and out["desc"]["name"] == "wan-bench" and out["desc"]["dtype"] == "bfloat16"
    assert out["dit"] == "WanModel" and out["layers"] == 4 and out["dim"] == 1536
    assert out["vae"] == "WanVideoVAE"  # the real architecture, recognised by its official hash
    assert out["dtype"] == "torch.bfloat16"
    assert out["frames"] == 5 and out["size"] == [64, 64]
    assert out["architectures"] == ["fleet-tiny"]  # model.json -> spec_from_dir -> the loader registers the tiny VAE
    model_json = json.loads((tmp_path / "bench" / "model.json").read_text())
    assert model_json["dtype"] == "bfloat16" and model_json["architectures"] == ["fleet-tiny"]
