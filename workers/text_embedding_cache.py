"""Text embeddings kept per worker: a prompt shared by several samples is encoded once.

diffsynth's pipelines encode the prompt and the negative prompt once per sample, each by
a call of their prompt-embedder unit (``WanVideoUnit_PromptEmbedder``,
``ZImageUnit_PromptEmbedder``). ``install`` wraps that unit of one loaded pipeline so a
call looks its text up first. The encoder sees one text per call, so the key is
everything that decides its output: the model's identity, the text, the dtype and the
device. A sample's prompt and negative prompt are two keys; a negative prompt shared by a
whole experiment is one entry. The cache lives on the pipeline it wraps, so it goes (GPU
memory and all) when the worker's model cache drops that pipeline.

Outputs are bit-identical to encoding afresh: the encoder is deterministic for a given
text, and a hit returns clones of the stored tensors (nothing downstream can change the
cached ones in place). Bounded LRU: ``capacity`` entries (0 turns it off); at Wan's real
size an entry is 512 x 4096 bf16, 4 MiB of GPU memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from workers import stage_clock

ATTRIBUTE = "fleet_text_cache"  # the pipeline attribute holding its cache


class EmbeddingCache:
    """A bounded LRU map key -> encoder output, with hit and miss counts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: Hashable, value: Any) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def resize(self, capacity: int) -> None:
        """A new bound (the worker's setting), dropping the least recently used beyond it."""
        self.capacity = capacity
        while len(self._items) > max(0, capacity):
            self._items.popitem(last=False)


def _clone(value: Any) -> Any:
    """A copy whose tensors are fresh (dicts, lists and tuples rebuilt around them)."""
    if hasattr(value, "clone") and callable(value.clone):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def install(pipe: Any, identity: str, unit_class: str, text_arg: str = "prompt",
            ignored: frozenset[str] = frozenset(), capacity: int = 0) -> EmbeddingCache:
    """Wrap ``pipe``'s unit of class name ``unit_class`` (its ``process(pipe, <text_arg>, ...)``)
    with a cache of ``capacity`` entries; returns the cache (``pipe.fleet_text_cache``).

    A call whose other arguments are all None or named in ``ignored`` (Wan's ``positive``
    flag, which its encoder does not read) is cached; any other (Z-Image with an edit
    image) goes to the encoder every time. Every call's time goes to the ``text`` stage of
    the current StageClock. Installing twice wraps once.
    """
    existing = getattr(pipe, ATTRIBUTE, None)
    if existing is not None:
        existing.resize(capacity)
        return existing
    units = [u for u in pipe.units if type(u).__name__ == unit_class]
    if len(units) != 1:
        raise RuntimeError(f"pipeline {type(pipe).__name__} has {len(units)} units {unit_class}; expected one")
    unit = units[0]
    cache = EmbeddingCache(capacity)
    encode: Callable[..., Any] = unit.process
    dtype, device = str(pipe.torch_dtype), str(pipe.device)

    def process(pipe_: Any, **kwargs: Any) -> Any:
        clock = stage_clock.current()
        start = clock.now() if clock is not None else time.perf_counter()
        text = kwargs.get(text_arg)
        cacheable = isinstance(text, str) and all(v is None for k, v in kwargs.items()
                                                  if k != text_arg and k not in ignored)
        key = (identity, text, dtype, device)
        found = cache.get(key) if cacheable else None
        if found is not None:
            cache.hits += 1
            out = _clone(found)
        else:
            cache.misses += 1
            out = encode(pipe_, **kwargs)
            if cacheable:
                cache.put(key, _clone(out))
        if clock is not None:
            clock.add("text", clock.now() - start)
            clock.count("text_cache_hits" if found is not None else "text_encodes")
        return out

    # The runner calls ``unit.process(pipe, **inputs)`` (diffsynth's PipelineUnitRunner): an
    # instance attribute shadows the class's method for this pipeline's unit only.
    unit.process = process
    setattr(pipe, ATTRIBUTE, cache)
    return cache
