"""A stand-in for the part of vLLM that `sae_reasoning.traces_vllm` uses, for tests only.

vLLM needs a CUDA GPU, so it cannot run where the tests run. This package, put first on the path by
`tests/test_traces_vllm.py`, keeps vLLM's public names and semantics for what the backend calls (`LLM(...)` with
its keyword arguments, `LLM.generate(prompts, sampling_params, use_tqdm=...)` returning request outputs whose
`outputs[0]` has `token_ids` and `finish_reason`, `SamplingParams`, `inputs.TokensPrompt`): it generates with the
Hugging Face model of the same folder on the CPU, one prompt at a time, refuses prompts longer than
`max_model_len` as vLLM does, stops at the config's eos ids (the stopping token is part of `token_ids`) and reports
"stop" or "length". Every call is appended to the JSON-lines file named by $VLLM_STAND_IN_LOG, with the process id,
so that tests can check what vLLM was given and in which process it ran. With $VLLM_STAND_IN_KILL_AT=N the process
SIGKILLs itself at its N-th `generate` call (1-based), before generating: a crash in the middle of a job.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

__version__ = "0.0.0+stand-in"


def _log(event: dict[str, Any]) -> None:
    path = os.environ.get("VLLM_STAND_IN_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**event, "pid": os.getpid()}) + "\n")


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None


@dataclass
class CompletionOutput:
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model: str, *, revision: str | None = None, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, dtype: str = "auto", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, **kwargs: Any):
        from transformers import AutoModelForCausalLM

        _log({"event": "init", "model": model, "revision": revision, "trust_remote_code": trust_remote_code,
              "tensor_parallel_size": tensor_parallel_size, "dtype": dtype, "max_model_len": max_model_len,
              "gpu_memory_utilization": gpu_memory_utilization, "other": sorted(kwargs)})
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=torch.float32).eval()
        cfg = self.model.config
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        eos = cfg.eos_token_id
        self.eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self.n_calls = 0

    @torch.no_grad()
    def generate(self, prompts: list[dict], sampling_params: SamplingParams, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        p = sampling_params
        self.n_calls += 1
        if str(self.n_calls) == os.environ.get("VLLM_STAND_IN_KILL_AT"):
            os.kill(os.getpid(), signal.SIGKILL)
        _log({"event": "generate", "prompt_token_ids": [x["prompt_token_ids"] for x in prompts],
              "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": p.seed})
        outs = []
        for x in prompts:
            ids = list(x["prompt_token_ids"])
            if len(ids) >= self.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length "
                                 f"of {self.max_model_len}.")
            budget = min(p.max_tokens, self.max_model_len - len(ids))
            sample = p.temperature > 0
            if sample:
                torch.manual_seed(p.seed or 0)
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=budget, do_sample=sample,
                                      temperature=p.temperature if sample else None,
                                      top_p=p.top_p if sample else None, top_k=None,
                                      eos_token_id=sorted(self.eos), pad_token_id=sorted(self.eos)[0])
            new = out[0, len(ids):].tolist()
            finish = "stop" if new and new[-1] in self.eos else "length"
            outs.append(RequestOutput(prompt_token_ids=ids, outputs=[CompletionOutput(new, finish)]))
        return outs
