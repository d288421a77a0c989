"""A tiny random-weight Wan2.1 text-to-video model, for tests and the demo.

``build_tiny_model(dir)`` writes a folder that loads through diffsynth's normal path
(``WanVideoPipeline.from_pretrained`` with local ``ModelConfig(path=...)``) once
``register_tiny_models()`` has told diffsynth about the tiny architectures; its model.json
says ``architectures: [fleet-tiny]``, which makes the worker's loader do that for this
model only (workers/wan_model.py):

    dir/dit.safetensors            WanModel, dim 64, 2 layers
    dir/text_encoder.safetensors   WanTextEncoder (T5 encoder), dim 32, vocab 384
    dir/vae.safetensors            TinyWanVideoVAE: Wan's VAE with base width 8 instead of 96
    dir/tokenizer/                 byte-level tokenizer (pad 0, </s> 1, <unk> 2, like umt5)
    dir/model.json                 the ModelSpec fields, file names relative to dir

A 2-step 64x64x9-frame sample takes a fraction of a second on one CPU thread. The
weights come from a fixed seed, so two builds give byte-identical files.

Preset ``bench`` (``build_tiny_model(dir, preset="bench")``) is the benchmark model of
docs/BENCHMARKS.md: a DiT of realistic width (dim 1536, 12 heads, ffn 8960, as
Wan2.1-T2V-1.3B) with 4 layers, the same tiny text encoder (so the DiT's text_dim is 32),
and the real-architecture Wan2.1 VAE (random weights; it has the official key hash, so
diffsynth recognises it without an entry). Weights are stored in bfloat16 (about 0.6 GB)
and model.json says ``dtype: bfloat16``. On one H100 an 832x480x81 sample with 10 steps
takes about 9 s; it is far too slow for CPU tests beyond a 1-step 64x64 sample.

Run as ``python -m workers.tiny_model DIR [--preset tiny|bench]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

from fleet.errors import InputError
from fleet.kinds.video.spec import ModelSpec

SEED = 1234  # fixed: identical files on every build, so tests and demos are reproducible

# DiT: head_dim = 64 / 2 = 32, and Wan's 3-axis RoPE needs head_dim // 3 even (32 // 3 = 10).
DIT_KWARGS: dict[str, Any] = {
    "has_image_input": False, "patch_size": [1, 2, 2], "in_dim": 16, "dim": 64, "ffn_dim": 128,
    "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2, "eps": 1e-6,
}
# text_encoder dim must equal the DiT's text_dim; vocab covers the tokenizer's 259 ids.
TEXT_ENCODER_KWARGS: dict[str, Any] = {
    "vocab": 384, "dim": 32, "dim_attn": 32, "dim_ffn": 64, "num_heads": 2, "num_layers": 2,
}
# The real VAE has dim 96 and 2 residual blocks per level (3.6 s per tiny sample on CPU);
# width 8 with 1 block keeps the same 8x spatial / 4x temporal compression at ~1/100 the cost.
VAE_KWARGS: dict[str, Any] = {"z_dim": 16, "dim": 8, "num_res_blocks": 1}

MODEL_JSON = {
    "name": "wan-tiny",
    "dit": ["dit.safetensors"],
    "text_encoder": "text_encoder.safetensors",
    "vae": "vae.safetensors",
    "tokenizer": "tokenizer",
    "dtype": "float32",
    "architectures": ["fleet-tiny"],
}

# Preset "bench": Wan2.1-T2V-1.3B's DiT width (dim 1536, 12 heads: head_dim 128, 128 // 3 = 42
# even; ffn 8960, freq_dim 256) with 4 of its 30 layers; text_dim matches the tiny text encoder.
BENCH_DIT_KWARGS: dict[str, Any] = {
    "has_image_input": False, "patch_size": [1, 2, 2], "in_dim": 16, "dim": 1536, "ffn_dim": 8960,
    "freq_dim": 256, "text_dim": TEXT_ENCODER_KWARGS["dim"], "out_dim": 16, "num_heads": 12, "num_layers": 4,
    "eps": 1e-6,
}
BENCH_MODEL_JSON = {**MODEL_JSON, "name": "wan-bench", "dtype": "bfloat16"}

PRESETS = ("tiny", "bench")

_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in Wan's umt5 tokenizer


class TinyWanVideoVAE(WanVideoVAE):
    """Wan2.1's video VAE with a narrow base width; same interface and compression factors.

    Latent normalisation is the identity (mean 0, std 1): the weights are random, so the
    official statistics would mean nothing.
    """

    def __init__(self, z_dim: int = 16, dim: int = 8, num_res_blocks: int = 1) -> None:
        # Skip WanVideoVAE.__init__: it would first build the full-width VAE only to discard it.
        torch.nn.Module.__init__(self)
        self.mean = torch.zeros(z_dim)
        self.std = torch.ones(z_dim)
        self.scale = [self.mean, 1.0 / self.std]
        self.model = VideoVAE_(dim=dim, z_dim=z_dim, num_res_blocks=num_res_blocks).eval().requires_grad_(False)
        self.upsampling_factor = 8  # three 2x spatial downsamples, as in the real VAE
        self.z_dim = z_dim


# ---- diffsynth registration ----------------------------------------------------------------
_ENTRIES: list[dict[str, Any]] | None = None


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise InputError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")


def _build_modules(preset: str = "tiny") -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """The three modules of ``preset`` with fresh (current RNG) weights: DiT, text encoder, VAE."""
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    _check_preset(preset)
    if preset == "bench":
        return WanModel(**BENCH_DIT_KWARGS), WanTextEncoder(**TEXT_ENCODER_KWARGS), WanVideoVAE()
    return WanModel(**DIT_KWARGS), WanTextEncoder(**TEXT_ENCODER_KWARGS), TinyWanVideoVAE(**VAE_KWARGS)


def _file_state_dicts(
    dit: torch.nn.Module, text_encoder: torch.nn.Module, vae: WanVideoVAE
) -> dict[str, dict[str, torch.Tensor]]:
    """What each weight file holds. The VAE is stored without the ``model.`` prefix, like the
    official Wan2.1_VAE file, so diffsynth's own VAE state-dict converter applies unchanged."""
    return {"dit": dit.state_dict(), "text_encoder": text_encoder.state_dict(), "vae": vae.model.state_dict()}


def _tiny_entries() -> list[dict[str, Any]]:
    """MODEL_CONFIGS entries for the tiny models; hashes computed from shapes on the meta device."""
    global _ENTRIES
    if _ENTRIES is None:
        from diffsynth.core.loader.file import hash_state_dict_keys
        from diffsynth.models.wan_video_dit import WanModel

        # Meta tensors carry shapes without memory: the hash only needs key names and shapes.
        # The bench preset's text encoder is the tiny one and its VAE has the official hash,
        # so only its DiT needs an entry.
        with torch.device("meta"):
            sds = _file_state_dicts(*_build_modules())
            bench_dit = WanModel(**BENCH_DIT_KWARGS).state_dict()
        _ENTRIES = [
            {
                "model_hash": hash_state_dict_keys(sds["dit"]),
                "model_name": "wan_video_dit",
                "model_class": "diffsynth.models.wan_video_dit.WanModel",
                "extra_kwargs": dict(DIT_KWARGS),
            },
            {
                "model_hash": hash_state_dict_keys(sds["text_encoder"]),
                "model_name": "wan_video_text_encoder",
                "model_class": "diffsynth.models.wan_video_text_encoder.WanTextEncoder",
                "extra_kwargs": dict(TEXT_ENCODER_KWARGS),
            },
            {
                "model_hash": hash_state_dict_keys(sds["vae"]),
                "model_name": "wan_video_vae",
                # Literal module path: __name__ is "__main__" under `python -m`.
                "model_class": "workers.tiny_model.TinyWanVideoVAE",
                "extra_kwargs": dict(VAE_KWARGS),
                "state_dict_converter": "diffsynth.utils.state_dict_converters.wan_video_vae.WanVideoVAEStateDictConverter",
            },
            {
                "model_hash": hash_state_dict_keys(bench_dit),
                "model_name": "wan_video_dit",
                "model_class": "diffsynth.models.wan_video_dit.WanModel",
                "extra_kwargs": dict(BENCH_DIT_KWARGS),
            },
        ]
    return _ENTRIES


def register_tiny_models() -> None:
    """Append the tiny models (and the bench preset's DiT) to diffsynth's MODEL_CONFIGS, once.

    Idempotent on purpose: diffsynth loads a file once per matching entry, so a duplicate
    entry would load the DiT twice (as dit and dit2) instead of failing loudly.
    """
    from diffsynth.configs import MODEL_CONFIGS  # the same list object the model loader scans

    known = {c["model_hash"] for c in MODEL_CONFIGS}
    for entry in _tiny_entries():
        if entry["model_hash"] not in known:
            MODEL_CONFIGS.append(entry)


# ---- building -------------------------------------------------------------------------------
def _save_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer shaped like umt5's: pad 0, </s> 1 appended to every sequence, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols: any UTF-8 prompt encodes
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.save_pretrained(str(folder))


KINDS = ("video", "image")


def _model_json(preset: str, kind: str = "video") -> dict[str, Any]:
    if kind == "image":
        from workers.tiny_image_model import model_json

        return model_json(preset)
    return BENCH_MODEL_JSON if preset == "bench" else MODEL_JSON


def _state_dicts(preset: str, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    if kind == "image":
        from workers.tiny_image_model import state_dicts

        return state_dicts(preset)
    return _file_state_dicts(*_build_modules(preset))


def _write_files(folder: Path, preset: str = "tiny", kind: str = "video") -> None:
    """Write every file of the model into ``folder`` (which is still private to the builder)."""
    from safetensors.torch import save_file

    desc = _model_json(preset, kind)
    # Stored in the dtype the model runs in: half the bytes to write and load for bench.
    store = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[desc["dtype"]]
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        sds = _state_dicts(preset, kind)
    for name, sd in sds.items():
        # clone: safetensors refuses tensors that share storage; contiguous for the same reason.
        tensors = {}
        for k, v in sd.items():
            v = v.detach()
            if store is not None and v.is_floating_point():
                v = v.to(store)
            tensors[k] = v.contiguous().clone()
        save_file(tensors, str(folder / f"{name}.safetensors"))
    if kind == "image":
        from workers.tiny_image_model import save_tokenizer

        save_tokenizer(folder / desc["tokenizer"])
    else:
        _save_tokenizer(folder / desc["tokenizer"])
    # model.json last: its presence marks a complete model.
    (folder / "model.json").write_text(json.dumps(desc, indent=2) + "\n", encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk before it is renamed into view."""
    for root, _dirs, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build_tiny_model(dir: Path, preset: str = "tiny", kind: str = "video") -> dict[str, Any]:
    """Write the tiny model of ``kind`` (video: Wan, see the module docstring; image: Z-Image,
    workers/tiny_image_model.py), or its ``bench`` preset, into ``dir`` atomically; return
    model.json's content (relative names).

    The files are built in a hidden temporary folder next to ``dir`` and renamed into place,
    so a killed build leaves at most a ``.<name>.*.tmp`` folder, never a half-written ``dir``.
    An existing ``dir`` (empty, or an earlier build) is replaced.
    """
    _check_preset(preset)
    if kind not in KINDS:
        raise InputError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    dir = Path(dir).absolute()
    if dir.exists() and (not dir.is_dir() or (any(dir.iterdir()) and not _is_tiny_model(dir))):
        # Never replace a user's folder: only an empty one or an earlier tiny build.
        raise InputError(f"{dir}: exists and is not a tiny model folder; name a new or empty folder")
    dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = dir.parent / f".{dir.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        _write_files(tmp, preset, kind)
        _fsync_tree(tmp)
        if dir.exists() and any(dir.iterdir()):
            # A folder can't be renamed over a non-empty one: move the old one aside first.
            old = dir.parent / f".{dir.name}.{secrets.token_hex(4)}.old"
            os.rename(dir, old)
            os.rename(tmp, dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dir)  # POSIX rename replaces an empty directory atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(_model_json(preset, kind))


def _is_tiny_model(dir: Path) -> bool:
    from workers.tiny_image_model import is_tiny_image_model

    try:
        desc = json.loads((dir / "model.json").read_text(encoding="utf-8"))
        return desc.get("name") in (MODEL_JSON["name"], BENCH_MODEL_JSON["name"]) or is_tiny_image_model(desc)
    except (OSError, ValueError, AttributeError):
        return False


def spec_from_dir(dir: Path) -> ModelSpec:
    """The ModelSpec of a model folder with a model.json, with absolute paths."""
    dir = Path(dir).absolute()
    desc = json.loads((dir / "model.json").read_text(encoding="utf-8"))
    return ModelSpec(
        name=desc["name"],
        dit=[str(dir / p) for p in desc["dit"]],
        text_encoder=str(dir / desc["text_encoder"]),
        vae=str(dir / desc["vae"]),
        tokenizer=str(dir / desc["tokenizer"]),
        dtype=desc["dtype"],
        architectures=desc.get("architectures", []),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="new or empty folder (or an earlier tiny build, replaced)")
    parser.add_argument("--preset", choices=PRESETS, default="tiny",
                        help="tiny (tests, demo) or bench (realistic DiT width and the real VAE, bf16)")
    parser.add_argument("--kind", choices=KINDS, default="video",
                        help="video (Wan2.1 text-to-video) or image (Z-Image text-to-image)")
    args = parser.parse_args(argv)
    try:
        build_tiny_model(args.dir, args.preset, args.kind)
    except InputError as e:
        print(f"fleet: error: {e}", file=sys.stderr)
        return 1
    print(args.dir.absolute())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
