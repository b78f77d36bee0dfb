"""Loading thinking/base models and the one definition of a layer's hook site.

This is the only module that knows the backend (Hugging Face transformers). The same code loads the organism's
local folders and the paper's hub models. Layers are named TransformerLens-style: ``blocks.L.hook_resid_post`` is
the output of decoder block L, i.e. HF ``hidden_states[L + 1]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from sae_reasoning.config import is_local_path, resolve_path
from sae_reasoning.errors import ModelLoadError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resid_post_hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream after block `layer` (what SAEs and steering use)."""
    return f"blocks.{layer}.hook_resid_post"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device!r} but no CUDA GPU is visible; use model.device=cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[dtype]


def _hub_source(repo_id: str, revision: str | None, field: str) -> tuple[str, bool]:
    """Decide how to load a hub id: from the local cache (offline) or the network. Fails fast with one line."""
    from huggingface_hub import model_info, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return repo_id, True
    fix = f"download it where the hub is reachable (`hf download {repo_id}`) or set {field} to a local copy"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelLoadError(f"{field}={repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                             f"{fix}")
    try:
        model_info(repo_id, revision=revision, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot fetch", reported in one line
        reason = type(exc).__name__
        if "Gated" in reason:
            fix = f"accept its licence on huggingface.co and run `hf auth login`, or set {field} to a local copy"
        raise ModelLoadError(
            f"{field}={repo_id!r} cannot be fetched from the Hugging Face hub ({reason}): {fix}") from None
    return repo_id, False


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    source: str  # local folder or hub id
    n_layers: int
    d_model: int
    config: Any = None  # the transformers config; the only model object when the weights were not loaded

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes (its config's max_position_embeddings), if it says."""
        cfg = self.config if self.config is not None else getattr(self.model, "config", None)
        return getattr(cfg, "max_position_embeddings", None)


def load_model(path: str, *, revision: str | None = None, dtype: str = "auto", device: str = "auto",
               field: str = "model", trust_remote_code: bool = False, weights: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder or a hub id, in eval mode. `weights=False` loads
    the tokenizer and the config only (`model` is None), for a backend that loads the weights itself (vLLM)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = resolve_path(path)
    if local is None and is_local_path(path):
        raise ModelLoadError(f"{field}={path!r}: no such folder; point it at a local model or use a hub id")
    if local is not None:
        source, local_only = str(local), True
        if not (local / "config.json").exists():
            raise ModelLoadError(f"{field}={path!r}: {local} has no config.json; is it a Hugging Face model folder?")
    else:
        source, local_only = _hub_source(path, revision, field)
    dev = resolve_device(device) if weights else None
    kwargs = dict(revision=revision, local_files_only=local_only, trust_remote_code=trust_remote_code)
    model = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype, dev), **kwargs)
            model.to(dev).eval()
            cfg = model.config
        else:
            cfg = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"{field}={path!r} could not be loaded: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:  # batched generation needs a pad token; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=source,
                       n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, config=cfg)


def role_device(model_cfg: Any, role: str) -> str:
    """The device of `role` ("thinking" or "base"): its own `device` if set, else `model.device`."""
    return getattr(getattr(model_cfg, role), "device", None) or model_cfg.device


def load_pair(model_cfg: Any) -> tuple[LoadedModel, LoadedModel]:
    """Load (thinking, base) from a `ModelConfig` and check the configured depth against the real one."""
    pair = []
    for role in ("thinking", "base"):
        spec = getattr(model_cfg, role)
        loaded = load_model(spec.path, revision=spec.revision, dtype=model_cfg.dtype,
                            device=role_device(model_cfg, role), field=f"model.{role}.path",
                            trust_remote_code=model_cfg.trust_remote_code)
        expected = model_cfg.n_layers if role == "thinking" else (model_cfg.base_n_layers or model_cfg.n_layers)
        if loaded.n_layers != expected:
            raise ModelLoadError(
                f"model.{role}: {spec.path} has {loaded.n_layers} layers but the config says {expected}; "
                f"fix model.n_layers (or model.base_n_layers)")
        pair.append(loaded)
    return pair[0], pair[1]


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (Llama, Qwen2, Mistral, Gemma... all use `model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelLoadError(f"unsupported architecture {type(model).__name__}: expected model.model.layers")
    return layers


def thinking_prompt(tokenizer: Any, question: str) -> str:
    """The thinking model's prompt: its own chat template with the generation prompt appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError("the thinking model's tokenizer has no chat template; set one in tokenizer_config.json")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def base_model_prompt(tokenizer: Any, question: str) -> str:
    """The base prompt as *text* carrying the special tokens the tokenizer would add itself (BOS for Llama and the
    organism, nothing for Qwen2), so that every prompt can be tokenised with `add_special_tokens=False`."""
    from sae_reasoning.prompts import base_prompt

    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    return (tokenizer.bos_token if adds_bos else "") + base_prompt(question)


# Each role's own prompt text (eval.py's plain methods and the vLLM backend use the same ones)
ROLE_PROMPTS = {"thinking": thinking_prompt, "base": base_model_prompt}
