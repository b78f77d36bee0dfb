"""Optional vLLM backend (GPU users): the thinking traces of train.py (`data.backend=vllm`) and the answers of
eval.py's base and thinking methods (`eval.backend=vllm`; the hybrid methods steer the models through hooks, so they
stay on the Hugging Face backend), behind the same interfaces.

- **A child process.** vLLM takes `data.vllm_gpu_memory_utilization` (0.9) of each GPU for its weights and KV
  cache and does not reliably give it back in-process. So each model's generations run in a spawned child process,
  before the pipeline loads a Hugging Face model (for the activations, or the pair for the hybrid methods); the
  child's exit frees the GPU. The parent never imports vLLM.
- **Prompts go in as token ids** (their special tokens are already in the chat-template text), so vLLM adds no
  second BOS; the prompts and records are those of the Hugging Face backend.
- **The same shards.** `traces.generate_traces` (traces) and `evaluate.run_sharded` (answers) write them: each
  batch of questions has its own seed, so a rerun after a crash or kill regenerates only the missing shards.
- **What vLLM is told:** the model's revision, `trust_remote_code` and dtype; `max_model_len` is the longest
  prompt + the token budget (`data.max_new_tokens`, or eval.py's budget), capped at the model's context, unless
  `data.vllm_max_model_len` says otherwise. With the model's whole context (131,072 tokens for the R1 distills),
  vLLM would refuse to start on a GPU whose free memory cannot hold one such sequence's KV cache.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Sequence

from sae_reasoning.artifacts import is_complete
from sae_reasoning.data import Question
from sae_reasoning.errors import UserError
from sae_reasoning.models import ROLE_PROMPTS, LoadedModel, load_model
from sae_reasoning.traces import check_context, generate_traces

INSTALL_HINT = ("the vllm backend (data.backend=vllm, eval.backend=vllm) needs vLLM: pip install vllm (GPU machines "
                "only), or use the hf backend")


def vllm_generate_fn(lm: LoadedModel, *, max_new_tokens: int, temperature: float, top_p: float,
                     max_model_len: int, revision: str | None = None, trust_remote_code: bool = False,
                     tensor_parallel_size: int = 1, dtype: str = "auto", gpu_memory_utilization: float = 0.9):
    """A `traces.GenerateFn` backed by one `vllm.LLM` of `lm.source` (its weights are loaded here, by vLLM)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    tokenizer = lm.tokenizer
    eos = getattr(lm.config, "eos_token_id", None)  # vLLM also stops at the eos ids of the model's config
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])} - {None}
    llm = LLM(model=lm.source, revision=revision, trust_remote_code=trust_remote_code,
              tensor_parallel_size=tensor_parallel_size, dtype=dtype, max_model_len=max_model_len,
              gpu_memory_utilization=gpu_memory_utilization)

    def generate(prompts: Sequence[str], seed: int) -> list[dict]:
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        inputs = [TokensPrompt(prompt_token_ids=tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        records = []
        for out in llm.generate(inputs, params, use_tqdm=False):
            gen = out.outputs[0]
            ids = list(gen.token_ids)
            if gen.finish_reason == "stop" and ids and ids[-1] in stop_ids:  # as the HF backend: the eos that
                ids = ids[:-1]  # ended the trace is not part of it
            records.append({"completion": tokenizer.decode(ids, skip_special_tokens=False), "completion_ids": ids,
                            "n_new_tokens": len(ids), "truncated": gen.finish_reason == "length"})
        return records

    return generate


def _settings(cfg: Any, role: str, **generation: Any) -> dict[str, Any]:
    """What the child needs of `cfg` to run vLLM on the `role` ("thinking" or "base") model: plain values only."""
    spec, d = getattr(cfg.model, role), cfg.data
    return {"role": role, "path": spec.path, "revision": spec.revision,
            "trust_remote_code": bool(cfg.model.trust_remote_code), "dtype": cfg.model.dtype,
            "tensor_parallel_size": d.tensor_parallel_size,
            "gpu_memory_utilization": float(d.vllm_gpu_memory_utilization), "max_model_len": d.vllm_max_model_len,
            "progress": bool(cfg.progress), **generation}


def _open(settings: dict[str, Any], questions: Sequence[Question]) -> tuple[LoadedModel, Any]:
    """In the child: the model's tokenizer and config (vLLM loads the weights) and a vLLM `GenerateFn` whose KV
    cache is planned for these questions' prompts."""
    role = settings["role"]
    lm = load_model(settings["path"], revision=settings["revision"], field=f"model.{role}.path",
                    trust_remote_code=settings["trust_remote_code"], weights=False)
    prompts = [ROLE_PROMPTS[role](lm.tokenizer, q.question) for q in questions]
    lengths = [len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    check_context(lm, lengths, prompts)  # one clear line for a prompt that cannot fit, before vLLM starts
    max_model_len = settings["max_model_len"] or max(lengths, default=0) + settings["max_new_tokens"]
    if lm.context_length is not None and settings["max_model_len"] is None:
        max_model_len = min(max_model_len, lm.context_length)
    fn = vllm_generate_fn(lm, max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                          top_p=settings["top_p"], max_model_len=max_model_len, revision=settings["revision"],
                          trust_remote_code=settings["trust_remote_code"],
                          tensor_parallel_size=settings["tensor_parallel_size"], dtype=settings["dtype"],
                          gpu_memory_utilization=settings["gpu_memory_utilization"])
    return lm, fn


def _traces_child(settings: dict[str, Any], questions: list[Question], folder: str, fingerprint: str) -> str:
    lm, fn = _open(settings, questions)
    return str(generate_traces(lm, questions, folder, batch_size=settings["batch_size"],
                               max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                               top_p=settings["top_p"], seed=settings["seed"], progress=settings["progress"],
                               fingerprint=fingerprint, generate_fn=fn))


def _answers_child(settings: dict[str, Any], questions: list[Question], folder: str, key: str, desc: str) -> None:
    from sae_reasoning.evaluate import run_sharded

    lm, fn = _open(settings, questions)
    prompt_fn = ROLE_PROMPTS[settings["role"]]
    run_sharded(Path(folder), questions, settings["batch_size"],
                lambda batch, b: fn([prompt_fn(lm.tokenizer, q.question) for q in batch], settings["seed"] + b),
                desc, settings["progress"], key=key)


def _in_child(target: Any, folder: Path, *args: Any) -> Any:
    """`target(*args)` in a spawned child process (module doc), its errors raised here."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(INSTALL_HINT)
    # spawn, not fork: a forked child would inherit the parent's CUDA state (and threads), which vLLM cannot use
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(target, *args).result()
        except BrokenProcessPool:
            raise UserError(f"the vLLM process died (killed, or out of memory; see above); the finished shards in "
                            f"{folder} are kept: rerun the same command to resume") from None


def generate_traces_vllm(cfg: Any, questions: Sequence[Question], folder: str | Path, fingerprint: str = "") -> Path:
    """The traces of `questions` from the thinking model of `cfg.model`, by vLLM in a child process (module doc).
    Returns the folder; a complete folder is returned as it is."""
    folder = Path(folder)
    if is_complete(folder):
        return folder
    d = cfg.data
    settings = _settings(cfg, "thinking", max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                         seed=d.seed, batch_size=d.batch_size)
    return Path(_in_child(_traces_child, folder, settings, list(questions), str(folder), fingerprint))


def generate_answers_vllm(cfg: Any, role: str, questions: Sequence[Question], folder: str | Path, *,
                          batch_size: int, max_new_tokens: int, seed: int, key: str, desc: str) -> None:
    """eval.py's plain `role` method ("base" or "thinking": its own prompt, greedy) by vLLM in a child process,
    written as `evaluate.run_sharded` shards under `key` into `folder` (batch b gets seed `seed + b`), so that the
    caller's `run_sharded` with the same key finds every shard done. Nothing starts when they are done already."""
    from sae_reasoning.evaluate import sharded_done

    if sharded_done(Path(folder), questions, batch_size, key):
        return
    settings = _settings(cfg, role, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=seed,
                         batch_size=batch_size)
    _in_child(_answers_child, Path(folder), settings, list(questions), str(folder), key, desc)
