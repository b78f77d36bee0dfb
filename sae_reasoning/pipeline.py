"""The three stages behind train.py, steer.py and eval.py. Each reads its inputs from files and writes a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_reasoning.errors import UserError
from sae_reasoning.models import load_pair


def train(cfg: Any, run_dir: Path) -> None:
    thinking, base = load_pair(cfg.model)
    print(f"loaded thinking={thinking.source} ({thinking.n_layers} layers) base={base.source}")


def steer(cfg: Any, run_dir: Path) -> None:
    raise UserError("steer.py: steering-vector training is not implemented yet (issue 7)")


def evaluate(cfg: Any, run_dir: Path) -> None:
    raise UserError("eval.py: evaluation is not implemented yet (issue 9)")
