"""Base, thinking and hybrid (and controls) on a question set: accuracy, gap recovered, plots.

Usage: python eval.py [model=organism|deepseek-r1-distill|...] [group.key=value ...]  (Hydra; -m for sweeps)
"""

import sys

import hydra

from sae_reasoning.cli import preflight, run_stage
from sae_reasoning.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    from sae_reasoning.pipeline import evaluate

    run_stage(evaluate, cfg)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
