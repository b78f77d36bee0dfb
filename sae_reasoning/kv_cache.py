"""A KV cache that appends without copying itself (the hybrid decoder's caches).

transformers' `DynamicLayer.update` grows the keys and values with ``torch.cat``: every decoding step copies the
whole cache of every layer, so a step costs O(length) memory traffic on top of the attention itself (a third of
the hybrid's time at batch 16 and 512 tokens on CPU, `benchmarks/README.md`). `GrowingLayer` keeps them in a
buffer with spare room (its capacity doubles when full) and hands out views of the filled part: an append writes
only the new entries. Everything else `DynamicLayer` offers works unchanged on the views (``crop`` shortens the
view, in-place writes go to the buffer); an operation that replaces the tensors (``batch_select_indices``, a
copy of the layer) gives up the buffer, and the next append starts a new one from the current tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 64


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` with amortised O(new tokens) appends (see the module doc)."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def _owns(self) -> bool:
        # the current tensors are the views handed out by the last append or crop (not replaced from outside)
        return self._kbuf is not None and self.keys is getattr(self, "_kview", None) \
            and self.values is getattr(self, "_vview", None)

    def _set_views(self, n: int) -> None:
        self.keys = self._kview = self._kbuf[..., :n, :]
        self.values = self._vview = self._vbuf[..., :n, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if not self._owns() or n + new > self._kbuf.shape[-2]:
            capacity = max(MIN_CAPACITY, 2 * (n + new))
            kbuf = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
            vbuf = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
            if n:
                kbuf[..., :n, :] = self.keys
                vbuf[..., :n, :] = self.values
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[..., n: n + new, :] = key_states
        self._vbuf[..., n: n + new, :] = value_states
        self._set_views(n + new)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        owned = self._owns()
        super().crop(tokens_to_remove)
        if owned:  # still views of the buffer: keep appending into it (stale entries get overwritten)
            self._kview, self._vview = self.keys, self.values

    def __copy__(self) -> "GrowingLayer":
        # a shallow copy must never append into the original's buffer
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        new._kbuf = new._vbuf = new._kview = new._vview = None
        return new


def growing_cache(config: Any) -> DynamicCache:
    """`DynamicCache(config=config)` whose plain full-attention layers are `GrowingLayer`s (sliding-window and other
    special layers are left as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


__all__ = ["GrowingLayer", "growing_cache"]
