"""Sentence activations: the mean residual stream of each thinking sentence at each requested layer (METHOD.md 3).

One forward pass per batch of traces, hooks on every requested block at once, and the pass stops right after the
deepest one (no later blocks, no LM head). A sentence's vector is the mean of the block's output
(`blocks.L.hook_resid_post`) over the sentence's tokens; prompt/template and special tokens are never inside a
sentence span. Note: for the *last* block this is the pre-final-norm stream, while HF's `hidden_states[-1]` is
after the final norm; for every other block the two agree.

Layout of an activation folder (written shard by shard, so memory stays bounded; the forwards run on a window of
shards at a time with the traces sorted by length, and a crash loses at most that window):

    shards/shard-{b:05d}.safetensors   {"layer_{L}": [n_sentences_in_batch, d_model] for each layer L}
    index/shard-{b:05d}.jsonl          one record per sentence (trace id, sentence index, spans, text, label)
    meta.json                          written last: layers, d_model, dtype, counts, fingerprint, format

A batch is complete when its index shard exists (written after its tensors). Every layer of a shard is in one file
(FORMAT 2; format 1 had a file per layer): each file is fsynced before its rename, and with one file a shard makes
2 fsyncs instead of layers + 1 (at 3 layers they were 10-15% of the organism extractor's time on the CPU); reading
one layer still reads only that tensor (safetensors opens lazily).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from sae_reasoning.artifacts import (atomic_write_bytes, atomic_write_text, is_complete, read_jsonl, read_meta,
                                     write_meta)
from sae_reasoning.errors import DataError
from sae_reasoning.models import LoadedModel, TORCH_DTYPES, decoder_layers, resid_post_hook_name
from sae_reasoning.sentences import Sentence, attach_token_spans, split_sentences, thinking_span

LabelFn = Callable[[str], "str | None"]
FORMAT = 2  # the folder layout above (part of the pipeline's cache key: a format-1 cache is recomputed)


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
def resid_post(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
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


def _prepare(trace: dict, tok: Any, min_words: int, label_fn: LabelFn | None,
             max_positions: int | None) -> tuple[list[int], list[dict]]:
    """The token ids of one trace that its sentences need, and the index records of its sentences (token spans
    included). The ids stop at the end of the last sentence: under the causal mask later tokens (the answer after
    the thinking, ~11% of an organism trace) cannot change a sentence's values, so they are not run."""
    ids, sentences = trace_sentences(trace, tok, min_words)
    ids = ids[: max((s.token_end for s in sentences), default=0)]
    if max_positions is not None and len(ids) > max_positions:
        raise DataError(f"trace {trace['id']!r} needs {len(ids)} tokens, more than the model's context "
                        f"({max_positions}); lower data.max_new_tokens")
    records = [{"trace_id": trace["id"], "sentence_index": s.index, "char_start": s.char_start,
                "char_end": s.char_end, "token_start": s.token_start, "token_end": s.token_end,
                "text": s.text, "label": label_fn(s.text) if label_fn else None} for s in sentences]
    return ids, records


def _forward_means(lm: LoadedModel, rows: Sequence[list[int]], records: Sequence[Sequence[dict]],
                   layers: Sequence[int]) -> list[dict[int, torch.Tensor]]:
    """One right-padded forward over `rows` (token ids of traces); per trace, {layer: [its sentences, d_model]}."""
    n_sent = sum(len(r) for r in records)
    if n_sent == 0:
        return [{layer: torch.zeros(0, lm.d_model) for layer in layers} for _ in rows]
    tok = lm.tokenizer
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
    # RIGHT padding and no padding mask: under the causal mask a real token only attends to earlier real tokens and
    # keeps its positions 0..len-1, so its values are those of the trace alone; only pad positions (never pooled)
    # see garbage. Without an explicit mask, SDPA takes its faster is_causal path.
    hidden = resid_post(lm, input_ids.to(lm.device), None, layers)
    # Segment id of every (row, pos): the sentence it belongs to, or n_sent for "none" (dropped afterwards).
    seg = torch.full((len(rows), width), n_sent, dtype=torch.long)
    j = 0
    for r, recs in enumerate(records):
        for rec in recs:
            seg[r, rec["token_start"]:rec["token_end"]] = j
            j += 1
    counts = torch.bincount(seg.flatten(), minlength=n_sent + 1)[:n_sent].clamp(min=1).unsqueeze(1).float()
    sizes = [len(r) for r in records]
    out: list[dict[int, torch.Tensor]] = [{} for _ in rows]
    for layer in layers:
        h = hidden[layer].float().cpu().reshape(-1, lm.d_model)
        means = torch.zeros(n_sent + 1, lm.d_model).index_add_(0, seg.flatten(), h)[:n_sent] / counts
        if not torch.isfinite(means).all():
            bad = [rec for recs in records for rec in recs][int((~torch.isfinite(means)).any(1).nonzero()[0])]
            raise DataError(f"non-finite activation at layer {layer} in trace {bad['trace_id']!r} sentence "
                            f"{bad['sentence_index']}; use model.dtype=float32 or bfloat16 (float16 overflows)")
        for r, part in enumerate(means.split(sizes)):
            out[r][layer] = part
    return out


def _window_means(lm: LoadedModel, traces: Sequence[dict], layers: Sequence[int], min_words: int,
                  label_fn: LabelFn | None, max_positions: int | None, batch_size: int
                  ) -> list[tuple[dict[int, torch.Tensor], list[dict]]]:
    """Per trace (in the given order): ({layer: sentence means}, index records). The forwards run on batches of
    traces of similar token length (sorted, stable), so right padding wastes little; each trace's values do not
    depend on which traces share its batch (right padding, causal attention: equal up to float rounding)."""
    prepared = [_prepare(t, lm.tokenizer, min_words, label_fn, max_positions) for t in traces]
    order = sorted(range(len(traces)), key=lambda i: len(prepared[i][0]))
    out: list = [None] * len(traces)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        means = _forward_means(lm, [prepared[i][0] for i in idx], [prepared[i][1] for i in idx], layers)
        for i, m in zip(idx, means):
            out[i] = (m, prepared[i][1])
    return out


def extract_activations(lm: LoadedModel, traces: Sequence[dict], layers: Sequence[int], folder: str | Path, *,
                        batch_size: int = 8, min_words: int = 3, dtype: str = "float32",
                        label_fn: LabelFn | None = None, progress: bool = True, fingerprint: str = "",
                        sort_window: int = 8) -> Path:
    """Write the sentence activations of `traces` at `layers` into `folder` (resumable). Returns the folder.

    Shard b holds traces [b * batch_size, (b + 1) * batch_size) in their order, whatever the batching. The forwards
    run on `sort_window` shards at a time, their traces sorted by token length into batches of `batch_size` (less
    padding: traces of a thinking model vary several-fold in length); a crash loses at most one window."""
    folder = Path(folder)
    _refuse_old_format(folder)
    if is_complete(folder):
        return folder
    if sort_window < 1:
        raise DataError(f"sort_window={sort_window}: must be >= 1 (1 = no sorting across shards)")
    layers = sorted(set(int(x) for x in layers))
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad:
        raise DataError(f"layers {bad} do not exist: the model has {lm.n_layers} layers (0..{lm.n_layers - 1})")
    store_dtype = TORCH_DTYPES[dtype]
    max_positions = getattr(lm.model.config, "max_position_embeddings", None)
    # a kill while a shard was being written leaves its temporary file (".shard-....tmp*"); one process writes a
    # folder, so any temporary file found at the start is such debris
    for stray in folder.glob("**/.*.tmp*"):
        if stray.is_file():
            stray.unlink(missing_ok=True)
    batches = [traces[i: i + batch_size] for i in range(0, len(traces), batch_size)]
    index_dir = folder / "index"
    index_dir.mkdir(parents=True, exist_ok=True)
    todo = [b for b in range(len(batches)) if not (index_dir / f"shard-{b:05d}.jsonl").exists()]
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), desc="activations", unit="batch",
               disable=not progress)
    for w in range(0, len(todo), sort_window):
        window = todo[w: w + sort_window]
        per_trace = _window_means(lm, [t for b in window for t in batches[b]], layers, min_words, label_fn,
                                  max_positions, batch_size)
        pos = 0
        for b in window:
            part, pos = per_trace[pos: pos + len(batches[b])], pos + len(batches[b])
            _write_shard(folder, b, layers, part, store_dtype, dtype)
            bar.update(1)
    bar.close()
    store = ActivationStore(folder, require_complete=False)
    index = store.index()
    if not index:
        raise DataError("no sentence was found in any trace: are the traces empty, or is data.min_words too high?")
    labelled = sum(r["label"] is not None for r in index)
    write_meta(folder, kind="activations", fingerprint=fingerprint, layers=layers, d_model=lm.d_model, dtype=dtype,
               n_traces=len(traces), n_sentences=len(index), n_labelled=labelled if label_fn else None,
               n_shards=len(batches), min_words=min_words, model=lm.source, format=FORMAT,
               hook_names=[resid_post_hook_name(layer) for layer in layers])
    return folder


def _write_shard(folder: Path, b: int, layers: Sequence[int], per_trace: Sequence[tuple[dict, list[dict]]],
                 store_dtype: torch.dtype, dtype: str) -> None:
    """Shard b: its tensors first, then its index (the index marks the shard complete)."""
    records = [rec for _, recs in per_trace for rec in recs]
    tensors = {}
    for layer in layers:
        parts = [m[layer] for m, _ in per_trace]
        tensor = torch.cat(parts).to(store_dtype).contiguous()  # a shard has >= 1 trace
        if not torch.isfinite(tensor).all():  # e.g. float16 overflows above 65504
            raise DataError(f"activations at layer {layer} overflow data.activation_dtype={dtype}; use "
                            "data.activation_dtype=float32 or bfloat16")
        tensors[f"layer_{layer}"] = tensor
    atomic_write_bytes(folder / "shards" / f"shard-{b:05d}.safetensors", safetensors_save(tensors))
    atomic_write_text(folder / "index" / f"shard-{b:05d}.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _refuse_old_format(folder: Path) -> None:
    """One clear line for a folder written by an older version (format 1: one file per layer and shard)."""
    meta_format = read_meta(folder).get("format", 1) if is_complete(folder) else None
    if meta_format not in (None, FORMAT) or any(folder.glob("layer_*/shard-*.safetensors")):
        raise DataError(f"{folder} holds activations in an older layout (format {meta_format or 1}, one file per "
                        f"layer); this version reads format {FORMAT}: delete the folder (train.py recomputes it)")


class ActivationStore:
    """Read access to an activation folder: the sentence index and per-layer tensors (shard by shard)."""

    def __init__(self, folder: str | Path, require_complete: bool = True):
        self.folder = Path(folder)
        _refuse_old_format(self.folder)
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
        for path in self._shards("shards", "shard-*.safetensors"):
            with safe_open(str(path), framework="pt") as fh:
                yield fh.get_tensor(f"layer_{layer}").float()

    def load(self, layer: int) -> torch.Tensor:
        """All sentence vectors of a layer, [n_sentences, d_model] float32."""
        if self.meta and layer not in self.meta["layers"]:
            raise DataError(f"layer {layer} was not extracted (have {self.meta['layers']})")
        parts = list(self.iter_layer(layer))
        return torch.cat(parts) if parts else torch.zeros(0, self.meta.get("d_model", 0))
