"""``fleet demo [video|image]``: seed 001 or seed 002 in miniature, end to end on this machine.

video: a tiny random-weight Wan model, a dataset of 4 categories (ASCII and Chinese
names) with 2-3 short reference videos each, a prompts file and ``experiment.yaml``.
image: a tiny random-weight Z-Image model and a prompts CSV as spreadsheets write it
(BOM, CRLF, quoted commas, quotes and line breaks, Chinese ids).
Either way it starts the fleet (embedded Redis, workers, Flower), enqueues, shows
progress until every sample is done, prints where the outputs are, and stops the fleet.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from fleet.errors import FleetError
from fleet.settings import FleetSettings

CATEGORIES = {
    "camera_motion": ["镜头仰角旋转", "dolly zoom"],
    "single_object": ["red_ball", "旋转的杯子", "kite"],
    "multiple_objects": ["traffic", "鸟群"],
    "complex_human_motion": ["dance_01", "跑步"],
}
PROMPTS = [
    "a paper boat drifting on a calm lake at sunset",
    "一只猫在窗台上伸懒腰",
    "a robot walking through a neon city in the rain",
]

EXPERIMENT = """\
# A fleet experiment (kind: video). Relative paths resolve against this file's folder.
kind: video
name: demo
dataset: dataset            # <category>/<video>.mp4
prompts: prompts.json       # {"*": [...]} = these prompts for every video
seeds: [42, 142]
mode: motion                # motion transfer from each reference video (or t2v)
denoising_strength: 0.7
width: 64                   # multiples of 16
height: 64
frames: 9                   # 4k+1
fps: 8
steps: 2
cfg_scale: 1.0
model:
  dir: model                # written by `fleet make-tiny-model`
output: results
"""


IMAGE_EXPERIMENT = """\
# A fleet experiment (kind: image). Relative paths resolve against this file's folder.
kind: image
name: demo-image
prompts: prompts.csv        # columns image_id, prompt (optional negative_prompt)
seed_start: 42              # row i gets seed 42 + i: the same files on 1 GPU or 8
width: 64                   # multiples of 16
height: 64
steps: 4
cfg_scale: 4.0
cfg_truncation_step: 2      # steps 2 and 3 without the unconditional pass
dtype: fp32                 # bf16, fp16 or fp32
model:
  dir: model                # written by `fleet make-tiny-model --kind image`
output: results             # results/<image_id>_seed<seed>.png
"""

IMAGE_ROWS = [
    ("000001", "a paper boat drifting on a calm lake at sunset"),
    ("000002", 'a sign that reads "open", seen through rain'),
    ("000003", "a robot walking through a neon city,\nat night"),
    ("猫_01", "一只猫在窗台上伸懒腰"),
    ("000005", "a bowl of ramen, steam rising, top view"),
    ("000006", "a lighthouse on a cliff, storm clouds"),
]


def write_video(path: Path, frames: int, width: int, height: int, fps: int = 8, seed: int = 0) -> Path:
    """A small synthetic H.264 mp4 (moving gradient), written atomically."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(tmp), mode="w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.thread_count = 1
        for i in range(frames):
            img = np.stack([(xs * 4 + 9 * i + 31 * seed) % 256, (ys * 4 + 5 * i) % 256,
                            np.full_like(xs, (17 * seed + 12 * i) % 256)], axis=-1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.replace(path)
    return path


def _build_model(directory: Path, kind: str) -> None:
    if not (directory / "model" / "model.json").exists():
        rc = subprocess.call([sys.executable, "-m", "workers.tiny_model", str(directory / "model"), "--kind", kind],
                             stdout=subprocess.DEVNULL)
        if rc:
            raise FleetError(f"{directory / 'model'}: building the tiny model failed (exit {rc})")


def build_image_demo(directory: Path) -> Path:
    """Write the tiny Z-Image model, prompts.csv and experiment.yaml into ``directory``."""
    import csv

    directory.mkdir(parents=True, exist_ok=True)
    _build_model(directory, "image")
    prompts = directory / "prompts.csv"
    if not prompts.exists():
        tmp = prompts.with_name(".prompts.csv.tmp")
        with open(tmp, "w", encoding="utf-8-sig", newline="") as f:  # as a spreadsheet saves it
            w = csv.writer(f, lineterminator="\r\n")
            w.writerow(["image_id", "prompt", "source"])
            w.writerows([(i, p, "demo") for i, p in IMAGE_ROWS])
        tmp.replace(prompts)
    exp = directory / "experiment.yaml"
    if not exp.exists():
        exp.write_text(IMAGE_EXPERIMENT.replace("name: demo-image\n", f"name: {demo_name('demo-image', directory)}\n"),
                       encoding="utf-8")
    return exp


def build_train_demo(directory: Path) -> Path:
    """Write a synthetic sharded click table and a training experiment (a grid of two runs)."""
    from fleet.kinds.train.synthetic_data import EXPERIMENT as TRAIN_EXPERIMENT
    from fleet.kinds.train.synthetic_data import write_tabular_data

    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "data").exists():
        write_tabular_data(directory / "data", rows=40_000, parts=4)
    exp = directory / "experiment.yaml"
    if not exp.exists():
        exp.write_text(TRAIN_EXPERIMENT.format(name=demo_name("demo-train", directory), epochs=3, use_amp="false"),
                       encoding="utf-8")
    return exp


def build_demo(directory: Path, kind: str = "video") -> Path:
    """Write model, inputs and experiment.yaml of ``kind`` into ``directory``; returns the experiment."""
    if kind == "image":
        return build_image_demo(directory)
    if kind == "train":
        return build_train_demo(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _build_model(directory, "video")
    for ci, (cat, videos) in enumerate(CATEGORIES.items()):
        for vi, name in enumerate(videos):
            target = directory / "dataset" / cat / f"{name}.mp4"
            if not target.exists():
                write_video(target, frames=6 + 2 * vi, width=96, height=72, seed=10 * ci + vi)
    prompts = directory / "prompts.json"
    if not prompts.exists():
        prompts.write_text(json.dumps({"*": PROMPTS}, ensure_ascii=False, indent=1), encoding="utf-8")
    exp = directory / "experiment.yaml"
    if not exp.exists():
        exp.write_text(EXPERIMENT.replace("name: demo\n", f"name: {demo_name('demo', directory)}\n"), encoding="utf-8")
    return exp


def demo_name(base: str, directory: Path) -> str:
    """The demo experiment's name: ``base`` and a digest of its folder, so that demos in two
    folders are two experiments (one name is one experiment, fleet.enqueue.check_name_free)."""
    return f"{base}-{hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:6]}"


def run_demo(settings: FleetSettings, directory: Path, n_workers: int, kind: str = "video") -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fleet.broker import connect
    from fleet.enqueue import enqueue
    from fleet.experiment import load_experiment
    from fleet.gpu_inventory import inventory_from_env
    from fleet.launcher import down, read_state, up
    from fleet.status import experiment_status

    directory = directory.resolve()
    user_settings = settings
    if not settings.output_roots and settings.output_dir is None:
        settings = settings.model_copy(update={"output_roots": [directory]})  # the workers may write the demo's outputs
    what = {"video": "a tiny model, 4 categories of reference videos", "image": "a tiny model, a prompts CSV of 6 rows",
            "train": "a sharded click table, a grid of 2 training runs"}[kind]
    click.echo(f"building the demo in {directory} ({what}) ...")
    exp_path = build_demo(directory, kind)
    exp = load_experiment(exp_path, settings.output_dir, settings.kinds)
    has_gpu = bool(inventory_from_env().snapshot())
    info = up(settings, cpu_workers=None if has_gpu else n_workers)
    click.echo(info.describe())
    if info.already:  # someone's fleet: use it, never stop it (and check its workers may write here)
        roots = (read_state(settings).get("launch") or {}).get("output_roots")
        if roots is not None and not any(exp.output.resolve().is_relative_to(r) for r in roots):
            raise FleetError(f"demo: the fleet that is up may write only under {', '.join(roots)}; run the demo "
                             "with --dir there, or `fleet down` first")
    try:
        client = connect(settings.model_copy(update={"broker_url": info.broker_url}))
        res = enqueue(client, settings.namespace, exp, policy=settings.placement, kinds=settings.kinds,
                      memory_classes_mib=settings.memory_classes_mib)
        click.echo(f"planned {res.planned}, done {res.done}, in flight {res.in_flight}, enqueued {res.enqueued}")
        cols = (TextColumn("[b]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[extra]}"),
                TimeElapsedColumn())
        deadline = time.monotonic() + 600
        with Progress(*cols) as bar:
            t = bar.add_task("samples", total=res.planned, extra="")
            while True:
                d = experiment_status(client, settings.namespace, exp, kinds=settings.kinds).as_dict()
                bar.update(t, completed=d["done"], extra=f"running {d['running']}  queued {d['queued']}  failed {d['failed']}")
                if d["done"] + d["failed"] >= d["total"]:
                    break
                if time.monotonic() > deadline:
                    raise FleetError(f"demo: not finished after 10 minutes; see the logs in {settings.logs}")
                time.sleep(0.5)
        pattern = {"video": "*.mp4", "image": "*.png", "train": "metrics.jsonl"}[kind]
        click.echo(f"outputs: {exp.output}  (e.g. {next(exp.output.rglob(pattern), 'none')})")
        if d["failed"]:
            raise FleetError(f"demo: {d['failed']} samples failed; see `fleet status` and {settings.logs}")
    finally:
        if not info.already:
            click.echo(down(settings))
    click.echo(closing_hints(user_settings, exp_path, info.already, None if has_gpu else n_workers))


def closing_hints(settings: FleetSettings, exp_path: Path, fleet_left_up: bool, cpu_workers: int | None) -> str:
    """What to run next, runnable as printed: the demo's own fleet is down again, so the hints
    start one whose workers may write the demo's outputs (output_roots), from any folder."""
    q = shlex.quote(str(exp_path))
    look = f"fleet status {q}; fleet report {q}"
    if fleet_left_up:
        return f"the fleet was up before the demo and is left up; look: {look}"
    roots = ([] if settings.output_roots or settings.output_dir is not None
             else [str(exp_path.parent.resolve())])
    env = f"FLEET_OUTPUT_ROOTS={shlex.quote(json.dumps(roots))} " if roots else ""
    cpu = f" --cpu-workers {cpu_workers}" if cpu_workers else ""
    return (f"go on with: {env}fleet up{cpu} && fleet enqueue {q}\n"
            f"  then: {look}; fleet down")
