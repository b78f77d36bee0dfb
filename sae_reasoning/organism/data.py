"""Export the organism's problems and ground-truth labelled traces as JSON lines.

    python -m sae_reasoning.organism.data --out DIR [--seed 0] [--splits val test]

writes ``DIR/{split}.jsonl``: one object per problem with ``id, question, answer, operands, ops``, the
thinking trace (``thinking``, ``response``) and its ``sentences`` (``text, behavior, start, end``; character
spans in ``thinking``). Everything is deterministic given the seed, so the files can be regenerated at will.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .corpus import labelled_trace
from .task import Problem, make_splits


def problem_record(p: Problem) -> dict:
    rec = labelled_trace(p)
    rec.update({"operands": list(p.operands), "ops": list(p.ops), "n_ops": p.n_ops})
    return rec


def export(out_dir: str | Path, seed: int = 0, splits=("val", "test"), n_train: int = 50_000) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = make_splits(seed=seed, n_train=n_train if "train" in splits else 0)
    paths = {}
    for split in splits:
        path = out_dir / f"{split}.jsonl"
        with path.open("w") as f:
            for p in data[split]:
                f.write(json.dumps(problem_record(p)) + "\n")
        paths[split] = path
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", nargs="+", default=["val", "test"], choices=["train", "val", "test"])
    args = ap.parse_args(argv)
    for split, path in export(args.out, args.seed, tuple(args.splits)).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
