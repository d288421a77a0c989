"""The Wan VAE's tiled decoding with the tiles blended where they were decoded.

diffsynth's ``WanVideoVAE.tiled_decode`` decodes each spatial tile on the GPU, copies it to
the host and blends it into a host tensor (``data_device = "cpu"``), in the pipeline's dtype:
bf16 arithmetic on the CPU, a copy per tile, the GPU idle meanwhile, and CPU threads taken
from the overlapped encoding of the previous sample. Blended on the decoding device instead,
the frame stack costs GPU memory of 3 + 1 channels at output size (about 0.26 GB for
832x480x81 in bf16). Measured on an H200 (bench/vae_probe.py, real-architecture VAE,
832x480x33): 1.84 s host-blended, 1.75 s GPU-blended, the same frames bit for bit; the rest
is the tiles' own decoding (an untiled decode takes 0.68 s), which ``tiled: false`` in an
experiment avoids where the GPU has the memory (docs/BENCHMARKS.md, "Overlapped finish and
the stage profile").

``blend_on_device(vae)`` rebinds that one method on a loaded VAE; the arithmetic is
diffsynth's (same tiles, masks, order and dtype), only the device of the accumulators
differs. A VAE without diffsynth's tiling parts is left as it is.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def tiles(h_lat: int, w_lat: int, tile_size: tuple[int, int], tile_stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """diffsynth's tiles of a (h_lat, w_lat) latent, in its order: (h0, h1, w0, w1), ends past
    the latent's edge where the last tile overhangs it."""
    (size_h, size_w), (stride_h, stride_w) = tile_size, tile_stride
    out = []
    for h in range(0, h_lat, stride_h):
        if h - stride_h >= 0 and h - stride_h + size_h >= h_lat:
            continue
        for w in range(0, w_lat, stride_w):
            if w - stride_w >= 0 and w - stride_w + size_w >= w_lat:
                continue
            out.append((h, h + size_h, w, w + size_w))
    return out


def tiled_decode_on_device(vae: Any, hidden_states: torch.Tensor, device: Any, tile_size: tuple[int, int],
                           tile_stride: tuple[int, int]) -> torch.Tensor:
    """diffsynth 2.1's ``WanVideoVAE.tiled_decode`` with ``data_device`` = the decoding device."""
    _, _, t, h_lat, w_lat = hidden_states.shape
    size_h, size_w = tile_size
    stride_h, stride_w = tile_stride
    tasks = tiles(h_lat, w_lat, tile_size, tile_stride)
    up = vae.upsampling_factor
    out_t = t * 4 - 3
    shape = (out_t, h_lat * up, w_lat * up)
    weight = torch.zeros((1, 1, *shape), dtype=hidden_states.dtype, device=device)
    values = torch.zeros((1, 3, *shape), dtype=hidden_states.dtype, device=device)
    border = ((size_h - stride_h) * up, (size_w - stride_w) * up)
    for h, h_, w, w_ in tasks:
        tile = vae.model.decode(hidden_states[:, :, :, h:h_, w:w_].to(device), vae.scale)
        mask = vae.build_mask(tile, is_bound=(h == 0, h_ >= h_lat, w == 0, w_ >= w_lat),
                              border_width=border).to(dtype=hidden_states.dtype, device=device)
        th, tw = h * up, w * up
        values[:, :, :, th:th + tile.shape[3], tw:tw + tile.shape[4]] += tile * mask
        weight[:, :, :, th:th + tile.shape[3], tw:tw + tile.shape[4]] += mask
    values = values / weight
    return values.clamp_(-1, 1)


def blend_on_device(vae: Any) -> bool:
    """Make ``vae.tiled_decode`` blend on the decoding device; False (nothing changed) when
    ``vae`` lacks the parts diffsynth's tiling uses (another VAE class or version)."""
    if not all(hasattr(vae, a) for a in ("tiled_decode", "build_mask", "model", "scale", "upsampling_factor")):
        return False
    vae.tiled_decode = types.MethodType(tiled_decode_on_device, vae)
    return True
