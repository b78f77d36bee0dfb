"""Sentence activations: the mean residual stream of each thinking sentence at each requested layer (METHOD.md 3).

One forward pass per batch of traces, hooks on every requested block at once, and the pass stops right after the
deepest one (no later blocks, no LM head). A sentence's vector is the mean of the block's output
(`blocks.L.hook_resid_post`) over the sentence's tokens; prompt/template and special tokens are never inside a
sentence span. Note: for the *last* block this is the pre-final-norm stream, while HF's `hidden_states[-1]` is
after the final norm; for every other block the two agree.

Layout of an activation folder (written batch by batch, so memory stays bounded and a crash loses one batch):

    layer_{L}/shard-{b:05d}.safetensors   {"activations": [n_sentences_in_batch, d_model]}
    index/shard-{b:05d}.jsonl             one record per sentence (trace id, sentence index, spans, text, label)
    meta.json                             written last: layers, d_model, dtype, counts, fingerprint

A batch is complete when its index shard exists (written after its tensors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sae_reasoning.artifacts import atomic_write_text, is_complete, read_jsonl, read_meta, write_meta
from sae_reasoning.errors import DataError
from sae_reasoning.models import LoadedModel, TORCH_DTYPES, decoder_layers, resid_post_hook_name
from sae_reasoning.sentences import Sentence, attach_token_spans, split_sentences, thinking_span

LabelFn = Callable[[str], "str | None"]


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block: nothing after it needs computing."""


def trace_text(trace: dict) -> str:
    return trace["prompt"] + trace["completion"]


def trace_sentences(trace: dict, tokenizer: Any, min_words: int) -> tuple[list[int], list[Sentence]]:
    """Token ids of the full trace text and its thinking sentences with char and token spans."""
    text = trace_text(trace)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start, end = thinking_span(text)
    sentences = split_sentences(text, start, end, min_words=min_words)
    return enc["input_ids"], attach_token_spans(sentences, enc["offset_mapping"])


@torch.no_grad()
def resid_post(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Outputs of the requested decoder blocks, [batch, pos, d_model] each, stopping after the deepest one."""
    blocks = decoder_layers(lm.model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def fn(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward
        return fn

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in sorted(set(layers))]
    try:
        lm.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def _batch_means(lm: LoadedModel, traces: Sequence[dict], layers: Sequence[int], min_words: int,
                 label_fn: LabelFn | None, max_positions: int | None) -> tuple[dict[int, torch.Tensor], list[dict]]:
    """Sentence means of one batch of traces: {layer: [n_sentences, d_model] float32} and the index records."""
    tok = lm.tokenizer
    rows, records, seg_rows, seg_starts, seg_ends = [], [], [], [], []
    for trace in traces:
        ids, sentences = trace_sentences(trace, tok, min_words)
        if max_positions is not None and len(ids) > max_positions:
            raise DataError(f"trace {trace['id']!r} has {len(ids)} tokens, more than the model's context "
                            f"({max_positions}); lower data.max_new_tokens")
        for s in sentences:
            seg_rows.append(len(rows))
            seg_starts.append(s.token_start)
            seg_ends.append(s.token_end)
            records.append({"trace_id": trace["id"], "sentence_index": s.index, "char_start": s.char_start,
                            "char_end": s.char_end, "token_start": s.token_start, "token_end": s.token_end,
                            "text": s.text, "label": label_fn(s.text) if label_fn else None})
        rows.append(ids)
    n_sent = len(records)
    if n_sent == 0:
        return {layer: torch.zeros(0, lm.d_model) for layer in layers}, records
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):  # right padding: positions of real tokens are unchanged by the batch
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    hidden = resid_post(lm, input_ids.to(lm.device), attention.to(lm.device), layers)
    # Segment id of every (row, pos): the sentence it belongs to, or n_sent for "none" (dropped afterwards).
    seg = torch.full((len(rows), width), n_sent, dtype=torch.long)
    for j, (r, a, b) in enumerate(zip(seg_rows, seg_starts, seg_ends)):
        seg[r, a:b] = j
    counts = torch.bincount(seg.flatten(), minlength=n_sent + 1)[:n_sent].clamp(min=1).unsqueeze(1).float()
    means = {}
    for layer in layers:
        h = hidden[layer].float().cpu().reshape(-1, lm.d_model)
        sums = torch.zeros(n_sent + 1, lm.d_model).index_add_(0, seg.flatten(), h)
        means[layer] = sums[:n_sent] / counts
        if not torch.isfinite(means[layer]).all():
            bad = records[int((~torch.isfinite(means[layer])).any(1).nonzero()[0])]
            raise DataError(f"non-finite activation at layer {layer} in trace {bad['trace_id']!r} sentence "
                            f"{bad['sentence_index']}; use model.dtype=float32 or bfloat16 (float16 overflows)")
    return means, records


def extract_activations(lm: LoadedModel, traces: Sequence[dict], layers: Sequence[int], folder: str | Path, *,
                        batch_size: int = 8, min_words: int = 3, dtype: str = "float32",
                        label_fn: LabelFn | None = None, progress: bool = True, fingerprint: str = "") -> Path:
    """Write the sentence activations of `traces` at `layers` into `folder` (resumable). Returns the folder."""
    folder = Path(folder)
    if is_complete(folder):
        return folder
    layers = sorted(set(int(x) for x in layers))
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad:
        raise DataError(f"layers {bad} do not exist: the model has {lm.n_layers} layers (0..{lm.n_layers - 1})")
    store_dtype = TORCH_DTYPES[dtype]
    max_positions = getattr(lm.model.config, "max_position_embeddings", None)
    batches = [traces[i: i + batch_size] for i in range(0, len(traces), batch_size)]
    index_dir = folder / "index"
    index_dir.mkdir(parents=True, exist_ok=True)
    todo = [b for b in range(len(batches)) if not (index_dir / f"shard-{b:05d}.jsonl").exists()]
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), desc="activations", unit="batch",
               disable=not progress)
    for b in todo:
        means, records = _batch_means(lm, batches[b], layers, min_words, label_fn, max_positions)
        for layer in layers:
            tensor = means[layer].to(store_dtype).contiguous()
            if not torch.isfinite(tensor).all():  # e.g. float16 overflows above 65504
                raise DataError(f"activations at layer {layer} overflow data.activation_dtype={dtype}; use "
                                "data.activation_dtype=float32 or bfloat16")
            path = folder / f"layer_{layer}" / f"shard-{b:05d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"activations": tensor}, str(tmp))
            os.replace(tmp, path)
        atomic_write_text(index_dir / f"shard-{b:05d}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        bar.update(1)
    bar.close()
    store = ActivationStore(folder, require_complete=False)
    index = store.index()
    if not index:
        raise DataError("no sentence was found in any trace: are the traces empty, or is data.min_words too high?")
    labelled = sum(r["label"] is not None for r in index)
    write_meta(folder, kind="activations", fingerprint=fingerprint, layers=layers, d_model=lm.d_model, dtype=dtype,
               n_traces=len(traces), n_sentences=len(index), n_labelled=labelled if label_fn else None,
               n_shards=len(batches), min_words=min_words, model=lm.source,
               hook_names=[resid_post_hook_name(layer) for layer in layers])
    return folder


class ActivationStore:
    """Read access to an activation folder: the sentence index and per-layer tensors (shard by shard)."""

    def __init__(self, folder: str | Path, require_complete: bool = True):
        self.folder = Path(folder)
        if require_complete and not is_complete(self.folder):
            raise DataError(f"{self.folder} is not a complete activation folder (no meta.json): rerun train.py "
                            "to finish it")
        self.meta = read_meta(self.folder) if is_complete(self.folder) else {}

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def _shards(self, sub: str, pattern: str) -> list[Path]:
        return sorted((self.folder / sub).glob(pattern))

    def index(self) -> list[dict]:
        return [r for p in self._shards("index", "shard-*.jsonl") for r in read_jsonl(p)]

    def labels(self) -> list[str | None]:
        return [r["label"] for r in self.index()]

    def iter_layer(self, layer: int) -> Iterator[torch.Tensor]:
        """The layer's activations shard by shard, as float32 (bounded memory for huge sets)."""
        for path in self._shards(f"layer_{layer}", "shard-*.safetensors"):
            with safe_open(str(path), framework="pt") as fh:
                yield fh.get_tensor("activations").float()

    def load(self, layer: int) -> torch.Tensor:
        """All sentence vectors of a layer, [n_sentences, d_model] float32."""
        if self.meta and layer not in self.meta["layers"]:
            raise DataError(f"layer {layer} was not extracted (have {self.meta['layers']})")
        parts = list(self.iter_layer(layer))
        return torch.cat(parts) if parts else torch.zeros(0, self.meta.get("d_model", 0))
