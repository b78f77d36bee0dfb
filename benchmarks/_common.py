"""Shared helpers of the benchmark scripts: setup, machine/version info, models, traces, timing, JSON output.

Every benchmark prints ONE JSON object on stdout (progress and warnings go to stderr). Timings follow
/work/shared/STACK.md: the things compared run in the same process, interleaved (A, B, A, B, ...), and the
figures are medians over repeats; the ratios are what to trust, absolute times on shared machines drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "data" / "models" / "stories260K" / "hf"

# Qwen2-1.5B (the paper's smallest pair: Qwen2.5-Math-1.5B <- DeepSeek-R1-Distill-Qwen-1.5B), random weights.
QWEN2_1P5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu (organism, or stories260K if missing) or cuda "
                                                   "(random-weight models of real shape)")
    p.add_argument("--quick", action="store_true", help="small settings (smoke test, ~seconds to a minute)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machines have 2 "
                                                         "cores, often shared)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per measurement")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    p.add_argument("--no-profile", action="store_true", help="skip the profiles taken when a target is missed")
    p.add_argument("--random-models", action="store_true",
                   help="use the random-weight Qwen2 models of the cuda path on any device; on CPU at a SMALL shape "
                        "(hidden 128, 4 layers, real vocabulary): a check of the GPU code path without a GPU")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # sae-lens' and our progress bars would flood stderr
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible")
    torch.manual_seed(0)
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- machine info


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def _other_torch_jobs() -> list[str]:
    """Other processes that compete for the CPU (the organism's training job, pytest, other benchmarks)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    me = os.getpid()
    busy = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) < 3 or int(parts[0]) == me:
            continue
        try:
            cpu = float(parts[1])
        except ValueError:
            continue
        if cpu >= 20.0 and "python" in parts[2]:
            busy.append(f"{parts[0]} {cpu:.0f}% {parts[2][:100]}")
    return busy


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "cpu_model": _lscpu_model(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "busy_python_processes": _other_torch_jobs(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("torch", "transformers", "tokenizers", "sae-lens", "transformer-lens", "safetensors", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["sae_reasoning_commit"] = head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["sae_reasoning_commit"] = None
    return out


def emit(result: dict[str, Any], args: argparse.Namespace) -> None:
    text = json.dumps(result, indent=2, default=_json_default)
    print(text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def header(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {"benchmark": name, "argv": sys.argv[1:], "quick": bool(args.quick), "machine": machine_info(device),
            "versions": versions()}


# ---------------------------------------------------------------------------------------------------- timing


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                warmup: bool = True) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run every fn once per round, rounds `repeats` times (A, B, A, B...); returns wall seconds per fn and the
    last result of each. One untimed warm-up round first (allocator, lazy init, caches)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict[str, Any] = {}
    if warmup:
        for k, fn in fns.items():
            results[k] = fn()
            sync(device)
    for r in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            results[k] = fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    return times, results


@contextmanager
def timer(store: list[float], device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    store.append(time.perf_counter() - t0)


def profile_top(fn: Callable[[], Any], n: int = 15) -> list[str]:
    """cProfile of one call: the top functions by cumulative time, as lines."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(n)
    lines = [ln.rstrip() for ln in buf.getvalue().splitlines() if ln.strip()]
    return [ln for ln in lines if not ln.startswith(("   Ordered", "   List reduced"))][: n + 6]


def torch_profile_top(fn: Callable[[], Any], device: torch.device, n: int = 12) -> dict[str, Any]:
    """torch.profiler of one call: the top operators by self time (device time on CUDA), with their share."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:n]
    return {"total_self_ms": total / 1e3, "clock": "device" if device.type == "cuda" else "cpu",
            "top_ops": [{"op": e.key, "self_ms": round(getattr(e, attr) / 1e3, 3),
                         "share": round(getattr(e, attr) / total, 3), "calls": e.count} for e in top]}


# ---------------------------------------------------------------------------------------------------- models


def organism_dirs() -> tuple[Path, Path]:
    """(thinking, base) folders of the organism: $BENCH_ORGANISM_DIR/{thinking,base} if set (e.g. a fresh training
    run's --out), else the committed sae_reasoning/organism/weights."""
    from sae_reasoning.organism import BASE_DIR, THINKING_DIR

    root = os.environ.get("BENCH_ORGANISM_DIR")
    return (Path(root) / "thinking", Path(root) / "base") if root else (THINKING_DIR, BASE_DIR)


def organism_available() -> bool:
    thinking, base = organism_dirs()
    return (thinking / "config.json").exists() and (base / "config.json").exists()


def organism_tokenizer():
    """The organism's tokenizer (built from code, no weights needed): 226 words/digits, chat template."""
    from sae_reasoning.organism.tokenizer import build_tokenizer

    return build_tokenizer()


def random_qwen2(tokenizer: Any, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 **overrides: Any):
    """A random-weight Qwen2 of Qwen2-1.5B's shape, wrapped as a LoadedModel with `tokenizer`.

    The vocabulary keeps its real size (the LM head is ~15% of the model's FLOPs), but the embedding rows (tied
    with the LM head) of ids the tokenizer cannot decode are zeroed: their logit is exactly 0 while the real ids
    get random logits of both signs, so greedy decoding stays inside the tokenizer's vocabulary and generated text
    decodes (sentence splitting works) at the full cost of the real LM head.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sae_reasoning.models import LoadedModel

    cfg = Qwen2Config(**dict(QWEN2_1P5B, **overrides), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg._attn_implementation = "sdpa"  # what load_model gets by default; the hybrid's candidate mode needs it
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # tied with the LM head
        if float(emb[: len(tokenizer)].float().std()) < 1e-3:
            raise RuntimeError("random_qwen2: the embedding was not initialised")
        emb[len(tokenizer):] = 0
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, source=f"random Qwen2 {cfg.num_hidden_layers}L "
                       f"d{cfg.hidden_size} (seed {seed})", n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size)


SMALL_QWEN2 = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256)


def load_pair(device: torch.device, quick_gpu_layers: int | None = None,
              random_models: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(thinking, base, description). CPU: the organism pair, or stories260K twice if the organism is missing.
    CUDA (or `random_models`): two random-weight Qwen2-1.5B-shaped models (bf16) sharing the organism's tokenizer;
    on CPU with `random_models` the same code at a small shape (float32)."""
    from sae_reasoning.models import load_model

    if device.type == "cuda" or random_models:
        tok = organism_tokenizer()
        small = device.type != "cuda"
        kw = dict(SMALL_QWEN2) if small else {}
        if quick_gpu_layers is not None and not small:
            kw["num_hidden_layers"] = quick_gpu_layers
        dtype = torch.float32 if small else torch.bfloat16
        thinking = random_qwen2(tok, device, dtype=dtype, seed=1, **kw)
        base = random_qwen2(tok, device, dtype=dtype, seed=2, **kw)
        shape = dict(QWEN2_1P5B, **kw)
        what = "small CPU check shape" if small else "Qwen2-1.5B shape"
        return thinking, base, {"models": f"random-weight Qwen2 ({what}, {str(dtype).replace('torch.', '')})",
                                "config": shape,
                                "n_layers": thinking.n_layers, "d_model": thinking.d_model,
                                "tokenizer": f"organism ({len(tok)} ids)"}
    if organism_available():
        t_dir, b_dir = organism_dirs()
        thinking = load_model(str(t_dir), dtype="float32", device="cpu")
        base = load_model(str(b_dir), dtype="float32", device="cpu")
        return thinking, base, {"models": "organism", "thinking": str(t_dir), "base": str(b_dir),
                                "n_layers": thinking.n_layers, "d_model": thinking.d_model,
                                "n_params": n_params(thinking)}
    log("organism weights missing: falling back to stories260K (both roles)")
    from sae_reasoning.organism.tokenizer import CHAT_TEMPLATE

    thinking = load_model(str(STORIES), dtype="float32", device="cpu")
    base = load_model(str(STORIES), dtype="float32", device="cpu")
    thinking.tokenizer.chat_template = CHAT_TEMPLATE  # stories260K has none; the organism's format
    return thinking, base, {"models": "stories260K (fallback: organism weights missing)", "path": str(STORIES),
                            "n_layers": thinking.n_layers, "d_model": thinking.d_model}


def n_params(lm: Any) -> int:
    return sum(p.numel() for p in lm.model.parameters())


# ---------------------------------------------------------------------------------------------------- traces


def organism_traces(n: int, seed: int = 0, join: int = 1, prompt_style: str = "chat") -> list[dict]:
    """`n` thinking traces in the organism's format (prompt = chat prompt up to ``<think>\\n``, completion =
    thinking sentences, ``</think>``, answer), built from the organism's corpus: the exact text the thinking model
    was trained to produce. `join` > 1 concatenates the thinking text of several problems into one longer trace
    (real traces are 10x longer than the organism's ~120 tokens)."""
    from sae_reasoning.organism import make_splits
    from sae_reasoning.organism.corpus import chat_prompt, final_answer, thinking_text

    problems = make_splits(seed, n_train=max(1000, n * join))["train"]
    traces = []
    for i in range(n):
        group = problems[i * join: (i + 1) * join]
        thinking = " ".join(thinking_text(p) for p in group)
        traces.append({"id": f"bench{i}", "question": group[0].question, "prompt": chat_prompt(group[0].question),
                       "completion": f"{thinking}\n</think>\n{final_answer(group[-1].answer)}"})
    return traces
