"""Shared test setup: offline, quiet, one thread (CI machines have 2 cores and tests may run beside other jobs)."""

import os
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
STORIES = SHARED_DATA / "models" / "stories260K" / "hf"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    assert STORIES.exists(), f"{STORIES} is missing: the tests need ../shared/data beside the checkout"
    return STORIES
