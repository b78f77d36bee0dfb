"""Steering-vector training: examples/s of `steering.train_vector`, batched against one example at a time.

    python benchmarks/bench_steering.py [--device cuda] [--quick] [--batch-size 16] [--objective ce|kl]

Both runs train the same vector (zero start, Adam lr 1e-2, cosine) on the same examples for the same fixed
number of epochs (no early stopping: patience > epochs); only `TrainSettings.batch_size` differs (16, the
config default, against 1); batches are bucketed by length as in training (`steering.bucketed_batches`). Each
epoch also evaluates the validation split (with the same batch size), and `train_vector` computes the unsteered
train/val losses before and the train loss after: all inside the timed call.
examples/s = (epochs x (n_train + n_val) + 2 n_train + n_val) / seconds, i.e. every example forward the call
makes. The steering layer is ~37% of depth (METHOD.md step 6). Examples are thinking sentences of organism
traces, in the base model's context (base prompt + thinking so far), built by `steering.sentence_example`.
The final validation losses of both runs are reported (they differ: 16x more, smaller steps with batch 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402


def make_examples(base, traces, n: int) -> list:
    from sae_reasoning.activations import trace_sentences
    from sae_reasoning.steering import bos_prefix, sentence_example

    bos = bos_prefix(base.tokenizer)
    out = []
    for t in traces:
        _ids, sentences = trace_sentences(t, base.tokenizer, 3)
        for s in sentences:
            out.append(sentence_example(t, s.char_start, s.char_end, base.tokenizer, sentence_index=s.index, bos=bos))
            if len(out) == n:
                return out
    return out


def main() -> None:
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--objective", choices=["ce", "kl"], default="ce")
    args = p.parse_args()
    device = C.setup(args)
    from sae_reasoning.steering import TrainSettings, train_vector

    cuda = device.type == "cuda"
    thinking, base, model_info = C.load_pair(
        device, quick_gpu_layers=8 if args.quick else None, random_models=args.random_models)
    layer = round(0.37 * base.n_layers)
    n_train = args.n_train or (16 if args.quick else (128 if cuda else 64))
    n_val = args.n_val or (4 if args.quick else 16)
    epochs = args.epochs or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 3)
    join = 4 if cuda else 1  # longer contexts on GPU (real thinking traces are 10x the organism's)
    traces = C.organism_traces(max(8, (n_train + n_val) // 4), seed=2, join=join)
    examples = make_examples(base, traces, n_train + n_val)
    train, val = examples[:n_train], examples[n_train:]
    tokens = [len(e.input_ids) for e in examples]
    n_forward = epochs * (len(train) + len(val)) + 2 * len(train) + len(val)
    # padded / real tokens of the batched run's first epoch (train_vector's length buckets, seed 0), and of plain
    # shuffled batches (what the buckets replace)
    from sae_reasoning.steering import bucketed_batches

    def pad_ratio(batches):
        chunks = [[len(train[j].input_ids) for j in b] for b in batches]
        return sum(max(c) * len(c) for c in chunks) / sum(sum(c) for c in chunks)

    padding = pad_ratio(bucketed_batches(train, args.batch_size, torch.Generator().manual_seed(0)))
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    padding_shuffled = pad_ratio([perm[i: i + args.batch_size] for i in range(0, len(train), args.batch_size)])
    C.log(f"steering: {len(train)} train / {len(val)} val examples ({sum(tokens) / len(tokens):.0f} tokens mean), "
          f"layer {layer}, {epochs} epochs, batch {args.batch_size} vs 1, {repeats} repeats")

    def run(b: int):
        s = TrainSettings(lr=1e-2, max_epochs=epochs, patience=epochs + 1, batch_size=b, objective=args.objective)
        return train_vector(base, train, val, layer, s, thinking=thinking if args.objective == "kl" else None,
                            progress=False)

    key_b, key_1 = f"batched_b{args.batch_size}", "one_at_a_time_b1"
    times, results = C.interleaved({key_b: lambda: run(args.batch_size), key_1: lambda: run(1)}, repeats, device)
    med = {k: C.median(v) for k, v in times.items()}
    eps = {k: n_forward / v for k, v in med.items()}
    result = C.header("steering", args, device)
    result.update({
        "models": model_info,
        "setup": {"n_train": len(train), "n_val": len(val), "epochs": epochs, "early_stopping": False,
                  "layer": layer, "objective": args.objective,
                  "tokens_per_example": {"mean": sum(tokens) / len(tokens), "min": min(tokens), "max": max(tokens)},
                  "example_forwards_per_call": n_forward, "repeats": repeats,
                  "batched_padded_over_real_tokens": padding,
                  "shuffled_batches_padded_over_real_tokens": padding_shuffled,
                  "model_dtype": str(next(base.model.parameters()).dtype),
                  "timing": "interleaved rounds after one warm-up round; medians"},
        "seconds": {k: {"median": med[k], "all": v} for k, v in times.items()},
        "examples_per_s": eps,
        "ratio_batched_over_one": eps[key_b] / eps[key_1],
        "final": {k: {"val_loss_before": r.val_loss_before, "val_loss_after": r.val_loss_after,
                      "norm": float(r.vector.norm())} for k, r in results.items()},
    })
    if eps[key_b] / eps[key_1] < 2 and not args.no_profile:  # no target: profile when batching buys little
        result["profile_batched_torch_ops"] = C.torch_profile_top(lambda: run(args.batch_size), device)
    C.emit(result, args)


if __name__ == "__main__":
    main()
