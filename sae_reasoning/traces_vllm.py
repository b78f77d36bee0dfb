"""Optional vLLM backend for trace generation (GPU users; `pip install -e .[vllm]`), behind the same interface.

Prompts go in as token ids (their special tokens are already in the chat-template text), so vLLM adds no second
BOS. The shards, resume logic and records are those of `traces.generate_traces`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sae_reasoning.data import Question
from sae_reasoning.errors import UserError
from sae_reasoning.models import LoadedModel
from sae_reasoning.traces import generate_traces


def vllm_generate_fn(model_path: str, tokenizer: Any, *, max_new_tokens: int, temperature: float, top_p: float,
                     tensor_parallel_size: int = 1, dtype: str = "auto"):
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError:
        raise UserError("data.backend=vllm needs vLLM: pip install -e '.[vllm]' (GPU machines only)") from None
    llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype)

    def generate(prompts: Sequence[str], seed: int) -> list[dict]:
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        inputs = [TokensPrompt(prompt_token_ids=tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        records = []
        for out in llm.generate(inputs, params, use_tqdm=False):
            gen = out.outputs[0]
            ids = [t for t in gen.token_ids if t != tokenizer.eos_token_id]
            records.append({"completion": tokenizer.decode(ids, skip_special_tokens=False), "completion_ids": ids,
                            "n_new_tokens": len(ids), "truncated": gen.finish_reason == "length"})
        return records

    return generate


def generate_traces_vllm(cfg: Any, lm: LoadedModel, questions: Sequence[Question], folder: Path,
                         fingerprint: str = "") -> Path:
    d = cfg.data
    fn = vllm_generate_fn(lm.source, lm.tokenizer, max_new_tokens=d.max_new_tokens, temperature=d.temperature,
                          top_p=d.top_p, tensor_parallel_size=d.tensor_parallel_size, dtype=cfg.model.dtype)
    return generate_traces(lm, questions, folder, batch_size=d.batch_size, max_new_tokens=d.max_new_tokens,
                           temperature=d.temperature, top_p=d.top_p, seed=d.seed, progress=cfg.progress,
                           fingerprint=fingerprint, generate_fn=fn)
