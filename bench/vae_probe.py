"""Diagnostic: where the Wan VAE's tiled decode spends a bench-size sample, blended on the host
(diffsynth) or on the GPU (workers/vae_decoding.py), against an untiled decode and against
the tiles decoded 3 or 9 at a time along the batch (a probe only: fleet does not batch them).

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

    from workers.vae_decoding import tiled_decode_on_device, tiles

    def batched(n: int):
        """Tiles of one shape decoded ``n`` at a time along the batch (a probe, not fleet's decode)."""
        def decode(self, hidden_states, device, tile_size, tile_stride):
            _, _, t, h_lat, w_lat = hidden_states.shape
            (size_h, size_w), (stride_h, stride_w) = tile_size, tile_stride
            tasks = tiles(h_lat, w_lat, tile_size, tile_stride)
            up = self.upsampling_factor
            shape = (t * 4 - 3, h_lat * up, w_lat * up)
            weight = torch.zeros((1, 1, *shape), dtype=hidden_states.dtype, device=device)
            values = torch.zeros((1, 3, *shape), dtype=hidden_states.dtype, device=device)
            border = ((size_h - stride_h) * up, (size_w - stride_w) * up)
            for i in range(0, len(tasks), n):
                group = tasks[i:i + n]
                parts = [hidden_states[:, :, :, h:h_, w:w_] for h, h_, w, w_ in group]
                if len({x.shape for x in parts}) > 1:
                    decoded = [self.model.decode(x.to(device), self.scale) for x in parts]
                else:
                    decoded = list(self.model.decode(torch.cat(parts).to(device), self.scale).split(1))
                for (h, h_, w, w_), tile in zip(group, decoded):
                    mask = self.build_mask(tile, is_bound=(h == 0, h_ >= h_lat, w == 0, w_ >= w_lat),
                                           border_width=border).to(dtype=hidden_states.dtype, device=device)
                    th, tw = h * up, w * up
                    values[:, :, :, th:th + tile.shape[3], tw:tw + tile.shape[4]] += tile * mask
                    weight[:, :, :, th:th + tile.shape[3], tw:tw + tile.shape[4]] += mask
            return (values / weight).clamp_(-1, 1)
        return decode

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
        "tiled_batch3": lambda: vae.decode([lat], dev, tiled=True, tile_size=(30, 52), tile_stride=(15, 26)),
        "tiled_batch9": lambda: vae.decode([lat], dev, tiled=True, tile_size=(30, 52), tile_stride=(15, 26)),
    }
    special = {"tiled_host_blend": stock, "tiled_batch3": types.MethodType(batched(3), vae),
               "tiled_batch9": types.MethodType(batched(9), vae)}
    res: dict = {"frames": args.frames, "height": args.height, "width": args.width, "threads": torch.get_num_threads()}
    outs = {}
    for name, fn in ways.items():
        vae.tiled_decode = special.get(name) or types.MethodType(tiled_decode_on_device, vae)
        torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.no_grad():
            for _ in range(4):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        outs[name] = out.float().cpu()
        res[name] = {"median_s": round(statistics.median(times[1:]), 4), "runs_s": [round(x, 4) for x in times],
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(name, res[name], flush=True)
    res["gpu_vs_host_blend_same"] = bool(torch.equal(outs["tiled_host_blend"], outs["tiled_gpu_blend"]))
    res["gpu_vs_host_blend_max_abs"] = float((outs["tiled_host_blend"] - outs["tiled_gpu_blend"]).abs().max())
    for b in ("tiled_batch3", "tiled_batch9"):
        res[f"{b}_same"] = bool(torch.equal(outs[b], outs["tiled_gpu_blend"]))
        res[f"{b}_max_abs"] = float((outs[b] - outs["tiled_gpu_blend"]).abs().max())
    print(json.dumps(res), flush=True)
    Path(args.out or Path(os.environ.get("OUT", ".")) / "vae_probe.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
