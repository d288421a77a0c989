"""The overlapped finish on CUDA (docs/ARCHITECTURE.md, "Overlapped finish"): the frames the
video job copies to the host are diffsynth's own, bit for bit, and a tiny-model sample whose
VAE decode runs on the decoder's stream and whose finish runs in a thread while the next one
computes (a motion sample's input-video encoding among them) is the sequential sample's file.

Marked ``gpu``; runs on CUDA where there is one, else on the CPU. The work runs in a child
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
import json, sys, threading
from pathlib import Path
import numpy as np, torch
from fleet.contract import TaskPayload
from workers.jobs import video as video_job
from workers.jobs.base import JobContext
from workers.model_cache import ModelCache
from workers.tiny_model import build_tiny_model, spec_from_dir
from workers.wan_model import load_pipeline
from tests.media import make_video

device = "cuda" if torch.cuda.is_available() else "cpu"
root = Path(sys.argv[1])
build_tiny_model(root / "m")
spec = spec_from_dir(root / "m")
cache = ModelCache()
pipe, _, _ = cache.get("video", spec.model_dump_json(), device, lambda: load_pipeline(spec, device))
same_frames = []
for dtype in (torch.bfloat16, torch.float32):
    x = (torch.randn(1, 3, 9, 64, 96, generator=torch.Generator().manual_seed(1)) * 1.3).to(device, dtype)
    theirs = np.stack([np.asarray(im) for im in pipe.vae_output_to_video(x)])
    same_frames.append(bool(np.array_equal(video_job.frames_from_vae(x), theirs)))

ref = make_video(root / "ref.mp4", 9, 96, 64)

def task(where, i, prompt, seed, mode):
    out = root / where / f"{i}.mp4"
    return TaskPayload(kind="video", sample_id=f"{where}{i}", experiment="e", group="g", label="l",
                       output_path=str(out), output_root=str(root), body=dict(
                           category="c", video="v", video_path=str(ref) if mode == "motion" else "", prompt=prompt,
                           prompt_index=0, negative_prompt="blurry", seed=seed, mode=mode,
                           denoising_strength=1.0 if mode == "t2v" else 0.7, width=96,
                           height=64, frames=9, fps=8, steps=3, cfg_scale=5.0, model=spec.model_dump()))

rows = [("a red kite", 1, "t2v"), ("a red kite", 2, "motion"), ("a boat", 1, "t2v"), ("a boat", 2, "motion")]
ctx = JobContext(gpus=(0,), device=device, models=cache, work_dir=root / "w", stopping=threading.Event(),
                 defer_finish=True, text_cache_entries=8)
pending, outs, extras = None, [], []
for i, (prompt, seed, mode) in enumerate(rows):
    out = video_job.run(task("overlap", i, prompt, seed, mode), ctx)
    outs.append(out)
    if pending is not None:
        pending.join()
    pending = threading.Thread(target=lambda o=out: extras.append(o.finish()))
    pending.start()
pending.join()
stages = [sorted(k for k in {**o.metrics, **e} if k.startswith("stage_")) for o, e in zip(outs, extras)]
plain = JobContext(gpus=(0,), device=device, models=cache, work_dir=root / "w", stopping=threading.Event())
same_files = []
for i, (prompt, seed, mode) in enumerate(rows):
    video_job.run(task("seq", i, prompt, seed, mode), plain)
    same_files.append((root / "overlap" / f"{i}.mp4").read_bytes() == (root / "seq" / f"{i}.mp4").read_bytes())
print(json.dumps({"device": device, "same_frames": same_frames, "same_files": same_files, "stages": stages}))
"""


def test_overlapped_frames_and_files_on_the_device(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="2", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(REPO)])
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["same_frames"] == [True, True], out
    assert out["same_files"] == [True, True, True, True], out
    stages = {"stage_text_s", "stage_denoise_s", "stage_vae_s", "stage_convert_s", "stage_decode_wait_s"}
    assert all(stages <= set(s) for s in out["stages"]), out["stages"]
