"""A tiny random-weight Wan2.1 text-to-video model, for tests and the demo.

``build_tiny_model(dir)`` writes a folder that loads through diffsynth's normal path
(``WanVideoPipeline.from_pretrained`` with local ``ModelConfig(path=...)``) once
``register_tiny_models()`` has told diffsynth about the tiny architectures:

    dir/dit.safetensors            WanModel, dim 64, 2 layers
    dir/text_encoder.safetensors   WanTextEncoder (T5 encoder), dim 32, vocab 384
    dir/vae.safetensors            TinyWanVideoVAE: Wan's VAE with base width 8 instead of 96
    dir/tokenizer/                 byte-level tokenizer (pad 0, </s> 1, <unk> 2, like umt5)
    dir/model.json                 the ModelSpec fields, file names relative to dir

A 2-step 64x64x9-frame sample takes a fraction of a second on one CPU thread. The
weights come from a fixed seed, so two builds give byte-identical files.

Run as ``python -m workers.tiny_model DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

from fleet.contract import ModelSpec
from fleet.errors import InputError

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
}

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


def _build_modules() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """The three tiny modules with fresh (current RNG) weights: DiT, text encoder, VAE."""
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    return WanModel(**DIT_KWARGS), WanTextEncoder(**TEXT_ENCODER_KWARGS), TinyWanVideoVAE(**VAE_KWARGS)


def _file_state_dicts(
    dit: torch.nn.Module, text_encoder: torch.nn.Module, vae: TinyWanVideoVAE
) -> dict[str, dict[str, torch.Tensor]]:
    """What each weight file holds. The VAE is stored without the ``model.`` prefix, like the
    official Wan2.1_VAE file, so diffsynth's own VAE state-dict converter applies unchanged."""
    return {"dit": dit.state_dict(), "text_encoder": text_encoder.state_dict(), "vae": vae.model.state_dict()}


def _tiny_entries() -> list[dict[str, Any]]:
    """MODEL_CONFIGS entries for the tiny models; hashes computed from shapes on the meta device."""
    global _ENTRIES
    if _ENTRIES is None:
        from diffsynth.core.loader.file import hash_state_dict_keys

        # Meta tensors carry shapes without memory: the hash only needs key names and shapes.
        with torch.device("meta"):
            sds = _file_state_dicts(*_build_modules())
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
        ]
    return _ENTRIES


def register_tiny_models() -> None:
    """Append the tiny models to diffsynth's MODEL_CONFIGS, once.

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


def _write_files(folder: Path) -> None:
    """Write every file of the model into ``folder`` (which is still private to the builder)."""
    from safetensors.torch import save_file

    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        sds = _file_state_dicts(*_build_modules())
    for name, sd in sds.items():
        # clone: safetensors refuses tensors that share storage; contiguous for the same reason.
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(folder / f"{name}.safetensors"))
    _save_tokenizer(folder / MODEL_JSON["tokenizer"])
    # model.json last: its presence marks a complete model.
    (folder / "model.json").write_text(json.dumps(MODEL_JSON, indent=2) + "\n", encoding="utf-8")


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


def build_tiny_model(dir: Path) -> dict[str, Any]:
    """Write the tiny model into ``dir`` atomically; return model.json's content (relative names).

    The files are built in a hidden temporary folder next to ``dir`` and renamed into place,
    so a killed build leaves at most a ``.<name>.*.tmp`` folder, never a half-written ``dir``.
    An existing ``dir`` (empty, or an earlier build) is replaced.
    """
    dir = Path(dir).absolute()
    if dir.exists() and (not dir.is_dir() or (any(dir.iterdir()) and not _is_tiny_model(dir))):
        # Never replace a user's folder: only an empty one or an earlier tiny build.
        raise InputError(f"{dir}: exists and is not a tiny model folder; name a new or empty folder")
    dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = dir.parent / f".{dir.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        _write_files(tmp)
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
    return dict(MODEL_JSON)


def _is_tiny_model(dir: Path) -> bool:
    try:
        return json.loads((dir / "model.json").read_text(encoding="utf-8")).get("name") == MODEL_JSON["name"]
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
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="new or empty folder (or an earlier tiny build, replaced)")
    args = parser.parse_args(argv)
    try:
        build_tiny_model(args.dir)
    except InputError as e:
        print(f"fleet: error: {e}", file=sys.stderr)
        return 1
    print(args.dir.absolute())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
