"""Stage-by-stage timing of the hybrid benchmark's pieces, each reported the moment it ends (a diagnostic, not a
comparison): for a short GPU lease where `bench_hybrid.py` reports nothing until a whole interleaved round is done.

    python benchmarks/hybrid_stages.py --device cuda [--stages base:1:64,sentence:1:64,...] --out stages.json

A stage is KIND:BATCH:TOKENS with KIND one of base (the cached greedy loop), hf (`generate`), sentence, token
(`HybridGenerator` with bench_hybrid's default settings and random SAE/vectors), ref_agree / ref_disagree (one
reference step at a prefix of TOKENS generated tokens; BATCH ignored), profile_sentence / profile_token (cProfile
of the run: the top functions by cumulative time), or warm (bench_hybrid's GPU warm-up: TOKENS-token base-only loops
until two in a row agree within 10%, up to 60 s; BATCH ignored). Each stage prints one line to stderr (seconds,
tokens/s, the model calls it made: `count_forwards`) and the JSON written to --out is rewritten after every stage,
so a run cut short by a timeout still leaves what it measured. EOS is masked as in bench_hybrid.py (every run
writes N tokens).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import bench_hybrid as H  # noqa: E402

DEFAULT_STAGES = ("warm:1:32,base:1:64,sentence:1:64,token:1:64,ref_agree:1:64,ref_disagree:1:64,base:16:32,"
                  "sentence:16:32,token:16:32,profile_token:1:64,profile_sentence:16:32,base:1:512,sentence:1:512,"
                  "token:1:512")
KINDS = ("base", "hf", "sentence", "token", "ref_agree", "ref_disagree", "profile_sentence", "profile_token", "warm")


def parse_stages(text: str) -> list[tuple[str, int, int]]:
    stages = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in KINDS or not (parts[1].isdigit() and parts[2].isdigit()):
            raise SystemExit(f"hybrid_stages: bad stage {item!r}: write KIND:BATCH:TOKENS with KIND in {KINDS}")
        stages.append((parts[0], int(parts[1]), int(parts[2])))
    return stages


def main() -> None:
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--stages", default=DEFAULT_STAGES, help="comma-separated KIND:BATCH:TOKENS (see the docstring)")
    args = p.parse_args()
    stages = parse_stages(args.stages)
    device = C.setup(args)
    from sae_reasoning.hybrid import HybridGenerator
    from sae_reasoning.organism import make_splits

    t0 = time.perf_counter()
    thinking, base, info = C.load_pair(device, quick_gpu_layers=8 if args.quick else None,
                                       random_models=args.random_models)
    sae, sae_layer, steering_layer, vectors, bias = H.random_artifacts(thinking, base, device.type == "cuda")
    vec_map = {i: vectors[i] for i in range(len(vectors))}
    result = C.header("hybrid_stages", args, device)
    result.update(models=info, stages=[], load_s=time.perf_counter() - t0)
    C.log(f"hybrid_stages: {info['models']}, loaded in {result['load_s']:.1f}s")

    def mk(gran: str, n: int, b: int) -> HybridGenerator:
        return HybridGenerator(thinking, base, sae, sae_layer, vec_map, bias, steering_layer, progress=False,
                               coefficient=1.0, granularity=gran, max_new_tokens=n, batch_size=b)

    problems = make_splits(0, n_train=1000)["test"][:max(b for _, b, _ in stages)]
    pairs = [mk("sentence", 8, 1).prompts(pr.question) for pr in problems]
    base_prompts, think_prompts = [x[0] for x in pairs], [x[1] for x in pairs]
    ref = H.Reference(thinking, base, sae, sae_layer, vectors, bias, steering_layer)
    continuation: list[int] = []

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=C._json_default))

    with H.no_eos(thinking, base):
        for kind, b, n in stages:
            bp, tp = base_prompts[:b], think_prompts[:b]
            row: dict = {"stage": f"{kind}:{b}:{n}"}
            if kind == "warm":
                fn = (lambda: H.warm_until_steady(base, base_prompts[:1], device, n=n))
            elif kind.startswith("ref_"):
                if len(continuation) < n:
                    continuation = H.base_cached_loop(base, base_prompts[:1], n)[0]
                bseq, tseq = base_prompts[0] + continuation[:n], think_prompts[0] + continuation[:n]
                fn = (lambda: ref.step(bseq, tseq, force=kind == "ref_disagree"))
            elif kind in ("base", "hf"):
                fn = (lambda: (H.base_cached_loop if kind == "base" else H.base_hf_generate)(base, bp, n))
            else:
                gen = mk(kind.replace("profile_", ""), n, b)
                fn = (lambda: H.hybrid_run(gen, bp, tp))
            C.sync(device)
            t = time.perf_counter()
            if kind.startswith("profile_"):
                row["profile"] = C.profile_top(fn, 30)
                out = None
            else:
                row["calls"] = H.count_forwards(lambda: row.__setitem__("out", fn()), thinking=thinking, base=base)
                out = row.pop("out")
            C.sync(device)
            row["seconds"] = time.perf_counter() - t
            if kind in ("sentence", "token"):
                row["tokens_per_s"] = sum(r["n_tokens"] for r in out) / row["seconds"]
                row["n_decisions"] = sum(r["n_decisions"] for r in out)
                row["n_drafts"] = sum(r["n_drafts"] for r in out)
                row["text_head"] = base.tokenizer.decode(out[0]["token_ids"][:120]) if "token_ids" in out[0] else None
            elif kind in ("base", "hf"):
                row["tokens_per_s"] = b * n / row["seconds"]
            elif kind == "warm":
                row["warm_up"] = out
            result["stages"].append(row)
            save()
            extra = {k: row[k] for k in ("tokens_per_s", "n_decisions", "n_drafts", "calls") if k in row}
            C.log(f"  {row['stage']}: {row['seconds']:.3f}s {json.dumps(extra, default=C._json_default)}")
            if "profile" in row:
                C.log("\n".join(row["profile"]))
    C.emit(result, args)


if __name__ == "__main__":
    main()
