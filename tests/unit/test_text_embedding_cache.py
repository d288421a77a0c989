"""The per-worker text-embedding cache (workers/text_embedding_cache.py) and the one-pending
finisher (workers/finisher.py), on stand-ins: no torch, no model. The real pipelines'
cached samples are compared with uncached ones in test_video_job.py, test_image_job.py and
tests/integration/test_overlapped_finish.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from workers import stage_clock
from workers.finisher import Finisher
from workers.text_embedding_cache import EmbeddingCache, install


class Tensor:
    """A stand-in with ``clone``, like a torch tensor."""

    def __init__(self, text: str) -> None:
        self.text = text

    def clone(self) -> Tensor:
        return Tensor(self.text)


class PromptEmbedder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def process(self, pipe: Any, prompt: str, **others: Any) -> dict:
        self.calls.append((prompt, others))
        return {"context": Tensor(f"emb:{prompt}"), "list": [Tensor(prompt)]}


class Pipe:
    def __init__(self, dtype: str = "bf16", device: str = "cuda") -> None:
        self.torch_dtype, self.device = dtype, device
        self.units = [object(), PromptEmbedder()]

    def encode(self, **inputs: Any) -> dict:
        """What diffsynth's PipelineUnitRunner does: ``unit.process(pipe, **inputs)``."""
        return self.units[1].process(self, **inputs)


def test_lru_keeps_the_most_recently_used_within_its_bound() -> None:
    c = EmbeddingCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert (c.get("b"), c.get("a"), c.get("c"), len(c)) == (None, 1, 3, 2)
    c.resize(1)
    assert len(c) == 1 and c.get("c") == 3
    off = EmbeddingCache(0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


def test_a_prompt_is_encoded_once_per_model_text_dtype_and_device() -> None:
    pipe = Pipe()
    unit = pipe.units[1]
    cache = install(pipe, "model-a", "PromptEmbedder", ignored=frozenset({"positive"}), capacity=8)
    with stage_clock.StageClock() as clock:
        first = pipe.encode(prompt="a cat", positive=True)
        again = pipe.encode(prompt="a cat", positive=False)  # the flag is not read by the encoder: one key
        other = pipe.encode(prompt="a dog", positive=True)
    assert [c[0] for c in unit.calls] == ["a cat", "a dog"]
    assert (cache.hits, cache.misses, clock.counts) == (1, 2, {"text_encodes": 2, "text_cache_hits": 1})
    assert "stage_text_s" in clock.metrics()
    assert again["context"].text == "emb:a cat" and other["context"].text == "emb:a dog"
    # A hit is a copy: changing what a sample got leaves the cache as it was.
    again["context"].text = "changed"
    again["list"].append("x")
    third = pipe.encode(prompt="a cat", positive=True)
    assert third["context"].text == "emb:a cat" and len(third["list"]) == 1 and third["context"] is not first["context"]
    # Another argument with a value (Z-Image's edit image) is not cached.
    pipe.encode(prompt="a cat", positive=True, edit_image="img")
    pipe.encode(prompt="a cat", positive=True, edit_image="img")
    assert len(unit.calls) == 4
    # Installing again wraps once and takes the new bound.
    assert install(pipe, "model-a", "PromptEmbedder", capacity=1) is cache and len(cache) == 1


@pytest.mark.parametrize("other", [("model-b", "bf16", "cuda"), ("model-a", "fp32", "cuda"), ("model-a", "bf16", "cpu")])
def test_the_key_holds_model_dtype_and_device(other: tuple[str, str, str]) -> None:
    a, b = Pipe(), Pipe(other[1], other[2])
    install(a, "model-a", "PromptEmbedder", capacity=8)
    cache_b = install(b, other[0], "PromptEmbedder", capacity=8)
    a.encode(prompt="p")
    b.encode(prompt="p")
    assert cache_b.misses == 1 and len(b.units[1].calls) == 1  # one cache per pipeline, its own key


def test_capacity_zero_encodes_every_time() -> None:
    pipe = Pipe()
    install(pipe, "m", "PromptEmbedder", capacity=0)
    for _ in range(3):
        pipe.encode(prompt="same")
    assert len(pipe.units[1].calls) == 3


def test_a_pipeline_without_the_unit_is_refused() -> None:
    with pytest.raises(RuntimeError, match="0 units Missing"):
        install(Pipe(), "m", "Missing", capacity=1)


def test_the_finisher_runs_one_finish_at_a_time() -> None:
    f = Finisher()
    gate, ran = threading.Event(), []
    f.start("s1", lambda: (gate.wait(10), ran.append(threading.current_thread().name)))
    assert f.pending and not f.wait(0.05)
    with pytest.raises(RuntimeError, match="already pending"):
        f.start("s2", lambda: None)
    gate.set()
    assert f.wait(10) and not f.pending and ran == ["fleet-finish-s1"]
    f.start("s3", lambda: 1 / 0)  # a fault in the work is logged; the finisher is free again
    assert f.wait(10) and not f.pending
