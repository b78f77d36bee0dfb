"""Steering vectors in the base model, one per behavior of a chosen taxonomy, plus a bias vector.

Usage: python steer.py [model=organism|deepseek-r1-distill|...] [group.key=value ...]  (Hydra; -m for sweeps)
"""

import sys

import hydra

from sae_reasoning.cli import preflight, run_stage
from sae_reasoning.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    from sae_reasoning.pipeline import steer

    run_stage(steer, cfg)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
