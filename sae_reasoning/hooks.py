"""The one steering hook: add a vector to the residual stream *output* of one decoder block.

Steering-vector training (steering.py) and generation (hybrid.py) both go through `add_to_resid_post`, so the
vector is trained exactly where it is applied: `blocks.{layer}.hook_resid_post` (the reference code trained at the
input of block L and applied at its output — an off-by-one we must not repeat).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Union

import torch
from torch import Tensor

from sae_reasoning.models import decoder_layers

# A delta broadcastable to the block output [batch, pos, d_model], or a function of that output returning one
# (or None for "nothing this forward").
Delta = Union[Tensor, Callable[[Tensor], "Tensor | None"]]


@contextmanager
def add_to_resid_post(model: Any, layer: int, delta: Delta) -> Iterator[None]:
    """Within the block, every forward of `model` adds `delta` to the output of decoder block `layer`.

    A tensor delta must broadcast to [batch, pos, d_model] of *that forward* (during cached decoding pos is the
    number of new tokens, usually 1). Positions to leave alone get zeros (e.g. `vector * mask[..., None]`).
    """
    block = decoder_layers(model)[layer]

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        d = delta(hidden) if callable(delta) else delta
        if d is None:
            return output
        hidden = hidden + d.to(device=hidden.device, dtype=hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def positions_delta(vectors: Tensor, mask: Tensor) -> Tensor:
    """[batch, pos, d] delta that adds `vectors` ([d] or [batch, d]) where `mask` [batch, pos] is true."""
    if vectors.dim() == 1:
        vectors = vectors.expand(mask.shape[0], -1)
    return mask.to(vectors.dtype)[..., None] * vectors[:, None, :]


@torch.no_grad()
def capture_resid_post(model: Any, layer: int, **forward_kwargs: Any) -> Tensor:
    """Run `model(**forward_kwargs)` and return the output of block `layer` (for tests and diagnostics)."""
    captured = {}
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        model(**forward_kwargs)
    finally:
        handle.remove()
    return captured["h"]
