"""Test helpers: small real models and question sets built from ../shared/data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sae_reasoning.data import Question

# A minimal chat template in the style of the R1 distills: the generation prompt ends with the think tag.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: <think>\n{% endif %}")


def stories_with_chat_template(src: Path, dst: Path) -> Path:
    """A copy of the tiny pretrained Llama (stories260K) whose tokenizer has a chat template."""
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return dst


def story_questions(n: int) -> list[Question]:
    starts = ["Once upon a time", "Lily had a red ball", "Tom saw a big dog", "The sun was hot", "A bird sang"]
    return [Question(id=f"q{i}", question=f"{starts[i % len(starts)]} number {i}.", gold=str(i), kind="number")
            for i in range(n)]
