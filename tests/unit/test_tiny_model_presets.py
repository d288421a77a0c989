"""workers.tiny_model presets: the bench DiT is registered, its VAE is the official architecture."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from diffsynth.configs import MODEL_CONFIGS  # noqa: E402
from diffsynth.core.loader.file import hash_state_dict_keys  # noqa: E402

from fleet.errors import InputError  # noqa: E402
from workers import tiny_model  # noqa: E402

OFFICIAL_WAN21_VAE_HASH = "ccc42284ea13e1ad04693284c7a09be6"


def _hashes(preset: str) -> dict[str, str]:
    with torch.device("meta"):
        sds = tiny_model._file_state_dicts(*tiny_model._build_modules(preset))
    return {k: hash_state_dict_keys(v) for k, v in sds.items()}


def test_bench_preset_is_registered_and_its_vae_is_the_official_one() -> None:
    tiny_model.register_tiny_models()
    tiny_model.register_tiny_models()  # idempotent
    by_hash = {}
    for c in MODEL_CONFIGS:
        by_hash.setdefault(c["model_hash"], []).append(c)
    bench = _hashes("bench")
    (dit,) = by_hash[bench["dit"]]
    assert dit["extra_kwargs"]["dim"] == 1536 and dit["extra_kwargs"]["num_layers"] == 4
    assert dit["extra_kwargs"]["text_dim"] == tiny_model.TEXT_ENCODER_KWARGS["dim"]
    assert bench["text_encoder"] == _hashes("tiny")["text_encoder"]  # the same tiny text encoder
    assert bench["vae"] == OFFICIAL_WAN21_VAE_HASH
    assert [c["model_class"] for c in by_hash[bench["vae"]]] == ["diffsynth.models.wan_video_vae.WanVideoVAE"]
    assert tiny_model.BENCH_MODEL_JSON["dtype"] == "bfloat16"


def test_unknown_preset_is_refused(tmp_path) -> None:
    with pytest.raises(InputError, match="unknown model preset"):
        tiny_model.build_tiny_model(tmp_path / "m", preset="huge")
