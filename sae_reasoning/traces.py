"""Thinking traces: the thinking model answers a question set through its chat template (METHOD.md step 1).

Output: a folder of JSONL shards, one per fixed batch of questions (`shard-00000.jsonl`, …), plus `meta.json`
once every shard exists. Batches are fixed by question order and each batch has its own seed, so a rerun after a
crash regenerates exactly the missing shards and the result equals an uninterrupted run (no duplicated or lost
traces). Each record: id, question, gold, prompt, completion, completion_ids, n_new_tokens, truncated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from sae_reasoning.artifacts import fill_shards, is_complete, read_jsonl, write_meta
from sae_reasoning.data import Question
from sae_reasoning.errors import DataError
from sae_reasoning.models import LoadedModel, thinking_prompt


GenerateFn = Callable[[Sequence[str], int], list[dict]]


def check_context(lm: LoadedModel, lengths: Sequence[int], prompts: Sequence[str]) -> None:
    """A prompt that does not fit the model's context cannot be answered: say which, instead of generating garbage."""
    limit = lm.context_length
    for n, prompt in zip(lengths, prompts):
        if limit is not None and n >= limit:
            raise DataError(f"a prompt has {n} tokens but {lm.source} has a context of {limit} "
                            f"({prompt[-60:]!r}); drop that question (data.limit / a filtered file) or use a "
                            "longer-context model")


@torch.no_grad()
def generate_batch(lm: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """Generate from text prompts (special tokens already in the text) with left padding; one dict per prompt."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    check_context(lm, [int(n) for n in enc["attention_mask"].sum(1)], prompts)
    sampling = temperature > 0
    torch.manual_seed(seed)
    out = lm.model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
        top_p=top_p if sampling else None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    records = []
    for ids in new:
        finished = tok.eos_token_id in ids
        ids = ids[: ids.index(tok.eos_token_id)] if finished else ids
        records.append({
            "completion": tok.decode(ids, skip_special_tokens=False),
            "completion_ids": ids,
            "n_new_tokens": len(ids),
            "truncated": not finished,
        })
    return records


def generate_traces(lm: LoadedModel, questions: Sequence[Question], folder: str | Path, *, batch_size: int,
                    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    progress: bool = True, fingerprint: str = "", generate_fn: GenerateFn | None = None,
                    prompt_fn: Callable[[str], str] | None = None, desc: str = "traces") -> Path:
    """Generate (or finish generating) the traces of `questions` into `folder`. Returns the folder.

    `prompt_fn(question)` builds the prompt text (default: the model's chat template, i.e. a thinking trace);
    `generate_fn(prompts, seed)` replaces the Hugging Face backend (e.g. vLLM); `lm` still provides the tokenizer
    and the source (its weights need not be loaded: `load_model(..., weights=False)`).
    """
    prompt_fn = prompt_fn or (lambda question: thinking_prompt(lm.tokenizer, question))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_complete(folder):
        return folder
    def make_lines(batch: Sequence[Question], b: int) -> list[str]:
        prompts = [prompt_fn(q.question) for q in batch]
        batch_seed = seed * 1_000_003 + b
        gens = generate_fn(prompts, batch_seed) if generate_fn else generate_batch(
            lm, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=batch_seed)
        return [json.dumps({"id": q.id, "question": q.question, "gold": q.gold, "kind": q.kind, "prompt": prompt,
                            **gen}, ensure_ascii=False) + "\n" for q, prompt, gen in zip(batch, prompts, gens)]

    stamp = {"fingerprint": fingerprint, "model": lm.source, "max_new_tokens": max_new_tokens,
             "temperature": temperature, "top_p": top_p, "seed": seed}
    shards = fill_shards(folder, questions, batch_size, make_lines, stamp=stamp, desc=desc, progress=progress)
    n_truncated = sum(r["truncated"] for r in iter_traces(folder))
    write_meta(folder, kind="traces", fingerprint=fingerprint, n_traces=len(questions), n_shards=len(shards),
               n_truncated=n_truncated, model=lm.source, max_new_tokens=max_new_tokens, temperature=temperature,
               top_p=top_p, seed=seed, batch_size=batch_size)
    return folder


def iter_traces(folder: str | Path) -> Iterator[dict[str, Any]]:
    """All traces of a folder in question order."""
    for path in sorted(Path(folder).glob("shard-*.jsonl")):
        yield from read_jsonl(path)
