"""The model organism: a tiny thinking/base pair with planted reasoning behaviors (issue 3).

- ``task``: procedural arithmetic problems with exact answers and seeded, disjoint splits;
- ``corpus``: typed reasoning sentences (plan, compute, verify, correct, conclude), thinking traces with
  ground-truth labels, the base corpus, and ``label_sentence`` for generated text;
- ``tokenizer``: word-level tokenizer, one token per digit, with a chat template;
- ``train``: trains both models from scratch (``python -m sae_reasoning.organism.train --out DIR``);
- ``evaluate``: greedy accuracies (``python -m sae_reasoning.organism.evaluate``);
- ``weights/thinking`` and ``weights/base``: the committed Hugging Face folders; ``weights/metrics.json``.
"""

from pathlib import Path

from .corpus import BEHAVIOR_KEYWORDS, BEHAVIORS, label_sentence, labelled_trace, trace_sentences
from .task import Problem, make_splits, parse_answer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
THINKING_DIR = WEIGHTS_DIR / "thinking"
BASE_DIR = WEIGHTS_DIR / "base"
METRICS_FILE = WEIGHTS_DIR / "metrics.json"

__all__ = [
    "BASE_DIR",
    "BEHAVIORS",
    "BEHAVIOR_KEYWORDS",
    "METRICS_FILE",
    "Problem",
    "THINKING_DIR",
    "WEIGHTS_DIR",
    "label_sentence",
    "labelled_trace",
    "make_splits",
    "parse_answer",
    "trace_sentences",
]
