"""GrowingLayer / growing_cache (kv_cache.py): the same tensors as transformers' DynamicLayer under every operation
the hybrid decoder uses, appends that do not copy the cache, and the same logits in a real model."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sae_reasoning.kv_cache import MIN_CAPACITY, GrowingLayer, growing_cache
from sae_reasoning.models import load_model


def kv(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 3, generator=g)  # values: another head dim


def same(a, b):
    assert a.get_seq_length() == b.get_seq_length()
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_growing_layer_equals_dynamic_layer_under_every_operation():
    ref, grow = DynamicLayer(), GrowingLayer()
    for layer in (ref, grow):
        layer.update(*kv(3, 5, 0))  # a prompt
    same(ref, grow)
    buf = grow._kbuf
    for step in range(1, 2 * MIN_CAPACITY):  # one token a step, past the first capacity
        out_r, out_g = ref.update(*kv(3, 1, step)), grow.update(*kv(3, 1, step))
        assert all(torch.equal(x, y) for x, y in zip(out_r, out_g))
        if grow.get_seq_length() <= MIN_CAPACITY:
            assert grow._kbuf is buf  # appended in place: no new buffer, no copy of the cache
    same(ref, grow)
    assert grow._kbuf is not buf and grow._kbuf.shape[-2] >= grow.get_seq_length()  # it grew once full
    for layer in (ref, grow):  # candidate mode: K entries appended, one kept in place, the rest cropped
        layer.update(*kv(3, 3, 99))
        for t in (layer.keys, layer.values):
            t[:, :, -3] = t[:, :, -1]
        layer.crop(-2)
        layer.update(*kv(3, 1, 100))  # overwrites the cropped entries of the buffer
    same(ref, grow)
    # a draft: a shallow copy restricted to some rows appends without touching the original
    before_k = grow.keys.clone()
    draft_r, draft_g = copy.copy(ref), copy.copy(grow)
    for layer in (draft_r, draft_g):
        layer.batch_select_indices(torch.tensor([2, 0]))
        for i in range(3):
            layer.update(*kv(2, 1, 200 + i))
    same(draft_r, draft_g)
    assert torch.equal(grow.keys, before_k)
    same(ref, grow)
    # dropping finished rows, then decoding on
    for layer in (ref, grow):
        layer.batch_select_indices(torch.tensor([1, 2]))
        layer.update(*kv(2, 1, 300))
    same(ref, grow)
    grow.crop(-4)  # the token draft's roll-back
    ref.crop(-4)
    same(ref, grow)


def test_growing_cache_gives_dynamic_cache_logits(stories_path):
    lm = load_model(str(stories_path), dtype="float32", device="cpu")
    cfg = lm.model.config
    caches = growing_cache(cfg), DynamicCache(config=cfg)
    assert all(type(layer) is GrowingLayer for layer in caches[0].layers)
    ids = torch.tensor([[1, 45, 67, 89, 23], [1, 300, 12, 7, 9]])
    outs = [lm.model(input_ids=ids, past_key_values=c, use_cache=True).logits[:, -1] for c in caches]
    for _ in range(20):  # greedy, one token at a time
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
        nxt = outs[1].argmax(-1, keepdim=True)
        outs = [lm.model(input_ids=nxt, past_key_values=c, use_cache=True).logits[:, -1] for c in caches]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
