"""Diagnostic: where the Wan VAE's tiled decode spends a bench-size sample, blended on the host
(diffsynth) or on the GPU (workers/vae_decoding.py), against an untiled decode.

    python3 bench/vae_probe.py [--frames 33 --height 480 --width 832] [--out $OUT/vae_probe.json]

The real-architecture Wan2.1 VAE with random weights (what the bench model uses), bf16 on
GPU 0, diffsynth's pipeline tiling (tile 30x52, stride 15x26 latents), median of 3 after a
warm-up; torch's default CPU threads unless --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/vae_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import torch
    from diffsynth.models.wan_video_vae import WanVideoVAE

    from workers.vae_decoding import tiled_decode_on_device

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda"
    vae = WanVideoVAE().to(dev, torch.bfloat16)
    lat = torch.randn(16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8, dtype=torch.bfloat16, device=dev)
    stock = types.MethodType(WanVideoVAE.tiled_decode, vae)
    ways = {
        "tiled_host_blend": lambda: vae.decode([lat], dev, tiled=True, tile_size=(30, 52), tile_stride=(15, 26)),
        "tiled_gpu_blend": lambda: vae.decode([lat], dev, tiled=True, tile_size=(30, 52), tile_stride=(15, 26)),
        "untiled": lambda: vae.decode([lat], dev, tiled=False),
    }
    res: dict = {"frames": args.frames, "height": args.height, "width": args.width, "threads": torch.get_num_threads()}
    outs = {}
    for name, fn in ways.items():
        vae.tiled_decode = stock if name == "tiled_host_blend" else types.MethodType(tiled_decode_on_device, vae)
        times = []
        with torch.no_grad():
            for _ in range(4):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        outs[name] = out.float().cpu()
        res[name] = {"median_s": round(statistics.median(times[1:]), 4), "runs_s": [round(x, 4) for x in times]}
        print(name, res[name], flush=True)
    res["gpu_vs_host_blend_same"] = bool(torch.equal(outs["tiled_host_blend"], outs["tiled_gpu_blend"]))
    res["gpu_vs_host_blend_max_abs"] = float((outs["tiled_host_blend"] - outs["tiled_gpu_blend"]).abs().max())
    print(json.dumps(res), flush=True)
    Path(args.out or Path(os.environ.get("OUT", ".")) / "vae_probe.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
