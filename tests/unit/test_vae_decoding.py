"""The tiled VAE decode blended on the decoding device gives diffsynth's own result."""

from __future__ import annotations

import torch

from workers.tiny_model import VAE_KWARGS, TinyWanVideoVAE
from workers.vae_decoding import blend_on_device, tiled_decode_on_device


def test_same_frames_as_diffsynths_tiled_decode() -> None:
    torch.manual_seed(0)
    vae = TinyWanVideoVAE(**VAE_KWARGS).to(torch.bfloat16)
    latents = torch.randn(1, 16, 3, 10, 12, dtype=torch.bfloat16)
    stock = vae.tiled_decode(latents, "cpu", (6, 6), (4, 4))  # several tiles, overlapping both ways
    ours = tiled_decode_on_device(vae, latents, "cpu", (6, 6), (4, 4))
    assert ours.shape == stock.shape == (1, 3, 9, 80, 96)
    assert torch.equal(ours, stock)
    assert blend_on_device(vae)
    assert torch.equal(vae.decode([latents[0]], "cpu", tiled=True, tile_size=(6, 6), tile_stride=(4, 4))[0], stock[0])
    assert not blend_on_device(object())
