"""Train the organism's thinking and base models from scratch (seeded, CPU; ~20 min for both on 2 free cores).

    python -m sae_reasoning.organism.train --out DIR [--steps-thinking N] [--steps-base N] [--threads 2]

writes ``DIR/thinking`` and ``DIR/base`` (Hugging Face folders: config, safetensors weights, generation
config, tokenizer with chat template) atomically, plus ``DIR/train_log.json``.

Recipe (see /work/shared/ORGANISM-NOTES.md): Llama architecture (hidden 128, 4 layers, 4 heads, SwiGLU 512,
RoPE, tied embeddings, ~1M parameters); AdamW (0.9, 0.98), weight decay 0.05, gradient clip 1, warm-up 4% then
cosine to 10% of the peak learning rate 3e-3, bf16 autocast, batches of 32 packed rows x 256 tokens.
Every document starts with ``<bos>`` and ends with ``<eos>``; a document that does not fit in the rest of a
row is dropped (never carried over to the next row: that would bias which documents start a row).
Thinking documents are trained on their response only (the chat prompt is masked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .corpus import BASE_WHEN, DEFAULT_BASE_MIX, sample_base_document, thinking_document
from .task import Problem, make_splits

IGNORE = -100


@dataclass
class ModelSpec:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0


@dataclass
class TrainConfig:
    kind: str = "thinking"  # "thinking" | "base"
    steps: int = 1250
    batch_rows: int = 32
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.04
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    bf16: bool = True
    seed: int = 0
    data_seed: int = 0
    n_train_problems: int = 50_000
    base_mix: dict = field(default_factory=lambda: dict(DEFAULT_BASE_MIX))
    base_when: dict = field(default_factory=dict)  # overrides of corpus.BASE_WHEN (empty: the shipped corpus)
    max_drops_per_row: int = 3
    model: ModelSpec = field(default_factory=ModelSpec)


# ---------------------------------------------------------------- model


def make_model(tokenizer, spec: ModelSpec | None = None, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or ModelSpec()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model


# ---------------------------------------------------------------- data


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def thinking_examples(tokenizer, problems: list[Problem], seed: int, chunk: int = 512
                      ) -> Iterator[tuple[list[int], list[int]]]:
    """Endless ``(ids, labels)`` of thinking documents; labels mask the chat prompt (by character offset)."""
    rng = random.Random(f"thinking-data-{seed}")
    backend = tokenizer.backend_tokenizer
    while True:
        docs = [thinking_document(rng.choice(problems)) for _ in range(chunk)]
        encs = backend.encode_batch([p + r for p, r in docs], add_special_tokens=False)
        for (prompt, _), enc in zip(docs, encs):
            labels = [t if start >= len(prompt) else IGNORE for t, (start, _) in zip(enc.ids, enc.offsets)]
            yield enc.ids, labels


def base_examples(tokenizer, problems: list[Problem], seed: int, mix: dict | None = None, chunk: int = 512,
                  when: dict | None = None):
    """Endless ``(ids, labels)`` of base documents: ``<bos> text <eos>``, every token but ``<bos>`` trained."""
    rng = random.Random(f"base-data-{seed}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while True:
        texts = [sample_base_document(rng, problems, mix, when)[1] for _ in range(chunk)]
        for ids in _encode_many(tokenizer, texts):
            ids = [bos] + ids + [eos]
            yield ids, [IGNORE] + ids[1:]


def pack_rows(examples: Iterator, n_rows: int, seq_len: int, pad_id: int, max_drops: int = 3):
    """``n_rows`` rows of whole documents; a document that does not fit is dropped (never carried over).

    A row closes after ``max_drops`` consecutive documents that do not fit. Returns
    ``(input_ids, labels, stats)`` as tensors ``[n_rows, seq_len]``; ``labels`` are aligned with inputs
    (the loss shifts them).
    """
    import torch

    ids_out = torch.full((n_rows, seq_len), pad_id, dtype=torch.long)
    lab_out = torch.full((n_rows, seq_len), IGNORE, dtype=torch.long)
    n_docs = n_tokens = 0
    for r in range(n_rows):
        pos, drops = 0, 0
        while drops < max_drops and pos < seq_len:
            ids, labels = next(examples)
            if len(ids) > seq_len - pos:
                drops += 1
                continue
            drops = 0
            ids_out[r, pos : pos + len(ids)] = torch.tensor(ids)
            lab_out[r, pos : pos + len(ids)] = torch.tensor(labels)
            pos += len(ids)
            n_docs += 1
        n_tokens += pos
    return ids_out, lab_out, {"docs": n_docs, "tokens": n_tokens, "fill": n_tokens / (n_rows * seq_len)}


# ---------------------------------------------------------------- training


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def loss_fn(model, input_ids, labels, bf16: bool = True):
    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=input_ids).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE)


def train_model(tokenizer, problems: list[Problem], cfg: TrainConfig, progress: bool = True, log_every: int = 25):
    """Train one model from scratch; returns ``(model, history)``; history rows: step, loss, lr, seconds."""
    import torch
    from tqdm.auto import tqdm

    model = make_model(tokenizer, cfg.model, seed=cfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    if cfg.kind == "thinking":
        stream = thinking_examples(tokenizer, problems, cfg.data_seed)
    elif cfg.kind == "base":
        stream = base_examples(tokenizer, problems, cfg.data_seed, cfg.base_mix, when=cfg.base_when or None)
    else:
        raise ValueError(cfg.kind)
    history, t0, ema = [], time.time(), None
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.kind}", disable=not progress, mininterval=2)
    for step in bar:
        ids, labels, stats = pack_rows(stream, cfg.batch_rows, cfg.seq_len, tokenizer.pad_token_id,
                                       cfg.max_drops_per_row)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(model, ids, labels, cfg.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.1e}", fill=f"{stats['fill']:.2f}", refresh=False)
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": value, "loss_ema": ema, "lr": lr, "fill": stats["fill"],
                            "seconds": time.time() - t0})
    model.eval()
    return model, history


# ---------------------------------------------------------------- saving


def save_model_dir(model, tokenizer, out_dir: str | Path) -> None:
    """Write a Hugging Face folder atomically (temporary sibling folder, then rename)."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
            max_new_tokens=256,
        )
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---------------------------------------------------------------- CLI


def parse_base_when(items: list[str], ap: argparse.ArgumentParser) -> dict:
    """``["stop=0.6", ...]`` -> ``{"stop": 0.6}``; unknown keys or chances outside [0, 1] end with one usage line."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            p = float(value)
        except ValueError:
            p = None
        if not sep or key not in BASE_WHEN or p is None or not 0 <= p <= 1:
            ap.error(f"--base-when {item!r}: use KEY=P with KEY one of {', '.join(BASE_WHEN)} and 0 <= P <= 1")
        out[key] = p
    return out


def main(argv=None) -> dict:
    import torch

    from .tokenizer import build_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (gets thinking/ and base/)")
    ap.add_argument("--steps-thinking", type=int, default=TrainConfig.steps)
    ap.add_argument("--steps-base", type=int, default=1700)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-seed", type=int, default=None,
                    help="seed of the weights' init and the training stream only (default: --seed); the problem "
                         "splits stay those of --seed, so the test problems stay out of training")
    ap.add_argument("--only", choices=["thinking", "base"], default=None, help="train just one model")
    ap.add_argument("--base-when", nargs="+", default=[], metavar="KEY=P",
                    help=f"override chances of the base corpus (corpus.BASE_WHEN: {BASE_WHEN}), e.g. stop=0.6")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    base_when = parse_base_when(args.base_when, ap)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    splits = make_splits(seed=args.seed, n_train=TrainConfig.n_train_problems)
    import sys

    log: dict = {"seed": args.seed, "run_seed": args.run_seed, "threads": args.threads, "models": {},
                 "command": "python -m sae_reasoning.organism.train "
                 + " ".join(sys.argv[1:] if argv is None else argv)}
    run_seed = args.seed if args.run_seed is None else args.run_seed
    for kind, steps in (("thinking", args.steps_thinking), ("base", args.steps_base)):
        if args.only and kind != args.only:
            continue
        cfg = TrainConfig(kind=kind, steps=steps, seed=run_seed, data_seed=run_seed,
                          base_when=base_when if kind == "base" else {})
        t0 = time.time()
        model, history = train_model(tokenizer, splits["train"], cfg, progress=not args.no_progress)
        seconds = time.time() - t0
        save_model_dir(model, tokenizer, out / kind)
        cfg_dict = asdict(cfg)
        cfg_dict["betas"] = list(cfg.betas)
        log["models"][kind] = {"config": cfg_dict, "train_seconds": seconds, "final_loss_ema": history[-1]["loss_ema"],
                               "history": history}
        print(json.dumps({"model": kind, "steps": steps, "seconds": round(seconds, 1),
                          "final_loss_ema": round(history[-1]["loss_ema"], 4)}), flush=True)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
