"""A tiny random-weight Z-Image text-to-image model, for tests and ``fleet demo image``.

Z-Image (Tongyi-MAI) runs through diffsynth's ``ZImagePipeline``: a single-stream DiT, a
Qwen3 text encoder (its second-to-last hidden state) with a chat-template tokenizer, and
the Flux VAE decoder. The tiny build keeps every one of those parts, narrowed:

    dir/dit.safetensors            ZImageDiT, dim 64, 2 heads, 2 layers, 1 refiner layer
    dir/text_encoder.safetensors   TinyZImageTextEncoder: Qwen3, hidden 32, 2 layers
    dir/vae.safetensors            TinyFluxVAEDecoder: the Flux VAE decoder at width 32
    dir/tokenizer/                 byte-level tokenizer with Qwen's chat markers and template
    dir/model.json                 the ImageModelSpec fields, names relative to dir

They load through diffsynth's normal path once ``register_tiny_image_models()`` has told
its model registry about the tiny shapes (model.json says ``architectures: [fleet-tiny]``,
workers/image_model.py). A 2-step 64x64 image takes a fraction of a second on one CPU
thread; the weights come from a fixed seed, so two builds give byte-identical files.

Preset ``bench``: the DiT at Z-Image-Turbo's width (dim 3840, 30 heads, head_dim 128) with
4 of its 30 layers, the tiny text encoder (cap_feat_dim 32), and the full-width Flux VAE
decoder, stored in bfloat16: the image model of docs/BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffsynth.models.flux_vae import FluxVAEDecoder, ResnetBlock, UpSampler, VAEAttentionBlock
from diffsynth.models.z_image_text_encoder import ZImageTextEncoder

DIT_KWARGS: dict[str, Any] = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 64, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32,
    "axes_dims": [8, 12, 12], "axes_lens": [1024, 512, 512],  # sum = head_dim 32
}
BENCH_DIT_KWARGS: dict[str, Any] = {
    **DIT_KWARGS, "dim": 3840, "n_layers": 4, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30,
    "axes_dims": [32, 48, 48],  # Z-Image's own: head_dim 128
}
TEXT_ENCODER_KWARGS: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 16, "intermediate_size": 64, "vocab_size": 384,
}
VAE_KWARGS: dict[str, Any] = {"channels": 32}  # GroupNorm's 32 groups: the narrowest width

MODEL_JSON: dict[str, Any] = {
    "name": "z-image-tiny",
    "pipeline": "z-image",
    "dit": ["dit.safetensors"],
    "text_encoder": "text_encoder.safetensors",
    "vae": "vae.safetensors",
    "tokenizer": "tokenizer",
    "dtype": "float32",
    "architectures": ["fleet-tiny"],
}
BENCH_MODEL_JSON: dict[str, Any] = {**MODEL_JSON, "name": "z-image-bench", "dtype": "bfloat16"}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, and Qwen's chat markers
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TinyZImageTextEncoder(ZImageTextEncoder):
    """Z-Image's Qwen3 text encoder at a tiny size (the real one picks among fixed 0.6B-8B configs)."""

    def __init__(self, **config: Any) -> None:
        from transformers import Qwen3Config, Qwen3Model

        torch.nn.Module.__init__(self)
        cfg = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000, "max_position_embeddings": 4096,
               "attention_bias": False, "tie_word_embeddings": True, "use_sliding_window": False, **config}
        self.model = Qwen3Model(Qwen3Config(**cfg))


class TinyFluxVAEDecoder(FluxVAEDecoder):
    """The Flux VAE decoder (8x upsampling, 16 latent channels) at one narrow width."""

    def __init__(self, channels: int = 32, use_conv_attention: bool = False) -> None:
        torch.nn.Module.__init__(self)
        c = channels
        self.scaling_factor = 0.3611
        self.shift_factor = 0.1159
        self.conv_in = torch.nn.Conv2d(16, c, kernel_size=3, padding=1)
        self.blocks = torch.nn.ModuleList([
            ResnetBlock(c, c, eps=1e-6),
            VAEAttentionBlock(1, c, c, 1, eps=1e-6, use_conv_attention=use_conv_attention),
            ResnetBlock(c, c, eps=1e-6),
            UpSampler(c), ResnetBlock(c, c, eps=1e-6),
            UpSampler(c), ResnetBlock(c, c, eps=1e-6),
            UpSampler(c), ResnetBlock(c, c, eps=1e-6),
        ])
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=c, num_groups=32, eps=1e-6)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(c, 3, kernel_size=3, padding=1)


def build_modules(preset: str = "tiny") -> dict[str, torch.nn.Module]:
    """The preset's modules with fresh weights from the current RNG: dit, text_encoder, vae."""
    from diffsynth.models.z_image_dit import ZImageDiT

    dit = ZImageDiT(**(BENCH_DIT_KWARGS if preset == "bench" else DIT_KWARGS))
    # ZImageDiT leaves its pad tokens as torch.empty: uninitialised memory would make the
    # file differ from build to build (and may hold NaNs).
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith("pad_token"):
                p.normal_(std=0.02)
    vae = FluxVAEDecoder(use_conv_attention=False) if preset == "bench" else TinyFluxVAEDecoder(**VAE_KWARGS)
    return {"dit": dit, "text_encoder": TinyZImageTextEncoder(**TEXT_ENCODER_KWARGS), "vae": vae}


def model_json(preset: str) -> dict[str, Any]:
    return BENCH_MODEL_JSON if preset == "bench" else MODEL_JSON


def is_tiny_image_model(desc: dict[str, Any]) -> bool:
    return desc.get("name") in (MODEL_JSON["name"], BENCH_MODEL_JSON["name"])


# ---- diffsynth registration ----------------------------------------------------------------
_ENTRIES: list[dict[str, Any]] | None = None


def _entries() -> list[dict[str, Any]]:
    """Model registry entries for the tiny parts and the bench preset; hashes from meta-device shapes."""
    global _ENTRIES
    if _ENTRIES is None:
        from diffsynth.core.loader.file import hash_state_dict_keys

        with torch.device("meta"):
            tiny, bench = build_modules("tiny"), build_modules("bench")
        dit = {"model_name": "z_image_dit", "model_class": "diffsynth.models.z_image_dit.ZImageDiT"}
        _ENTRIES = [
            {**dit, "model_hash": hash_state_dict_keys(tiny["dit"].state_dict()), "extra_kwargs": dict(DIT_KWARGS)},
            {**dit, "model_hash": hash_state_dict_keys(bench["dit"].state_dict()), "extra_kwargs": dict(BENCH_DIT_KWARGS)},
            {
                "model_hash": hash_state_dict_keys(tiny["text_encoder"].state_dict()),
                "model_name": "z_image_text_encoder",
                # Literal module path: __name__ is "__main__" under `python -m`.
                "model_class": "workers.tiny_image_model.TinyZImageTextEncoder",
                "extra_kwargs": dict(TEXT_ENCODER_KWARGS),
            },
            {
                "model_hash": hash_state_dict_keys(tiny["vae"].state_dict()),
                "model_name": "flux_vae_decoder",
                "model_class": "workers.tiny_image_model.TinyFluxVAEDecoder",
                "extra_kwargs": dict(VAE_KWARGS),
            },
            {
                # The full-width decoder stored in diffsynth's own key layout (no converter).
                "model_hash": hash_state_dict_keys(bench["vae"].state_dict()),
                "model_name": "flux_vae_decoder",
                "model_class": "diffsynth.models.flux_vae.FluxVAEDecoder",
                "extra_kwargs": {"use_conv_attention": False},
            },
        ]
    return _ENTRIES


def register_tiny_image_models() -> None:
    """Append the tiny Z-Image parts to diffsynth's MODEL_CONFIGS, once (a duplicate entry
    would load a file twice)."""
    from diffsynth.configs import MODEL_CONFIGS

    known = {(c["model_hash"], c["model_name"]) for c in MODEL_CONFIGS}
    for entry in _entries():
        if (entry["model_hash"], entry["model_name"]) not in known:
            MODEL_CONFIGS.append(entry)


# ---- building -------------------------------------------------------------------------------
def save_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer with Qwen's chat markers as special tokens and a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols: any UTF-8 prompt encodes
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def state_dicts(preset: str) -> dict[str, dict[str, torch.Tensor]]:
    """What each weight file holds (the caller seeds the RNG)."""
    return {name: m.state_dict() for name, m in build_modules(preset).items()}
