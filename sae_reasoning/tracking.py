"""Weights & Biases logging that never blocks: offline by default, disabled cleanly, same calls either way."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf


class Tracker:
    """A thin wrapper over one W&B run (or nothing, when wandb.mode=disabled)."""

    def __init__(self, run: Any | None):
        self.run = run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def start(cfg: Any, run_dir: Path, job_type: str) -> Tracker:
    """Start a run for one stage; files go under `run_dir/wandb`. Online needs WANDB_API_KEY or `wandb login`."""
    mode = cfg.wandb.mode
    if mode == "disabled":
        return Tracker(None)
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, tags=list(cfg.wandb.tags) or None, job_type=job_type,
        dir=str(run_dir), mode=mode, config=OmegaConf.to_container(cfg, resolve=True),
        name=f"{job_type}-{cfg.model.name}-{run_dir.name}", reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True),
    )
    return Tracker(run)
