"""Question sets with gold answers: the organism, GSM8K, MATH500 and MMLU-Pro, from local JSONL files or hub ids.

Local files are read line by line so that a malformed line is reported as ``file:line`` with the reason; hub ids go
through `datasets` (and fail in one line when the hub cannot be reached).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sae_reasoning.config import is_local_path, resolve_path
from sae_reasoning.errors import DataError

CHOICE_LETTERS = "ABCDEFGHIJKLMNOP"


@dataclass
class Question:
    id: str
    question: str  # the text shown to the models
    gold: str  # the gold answer as a string
    kind: str  # "number" (GSM8K, organism), "math" (MATH500, LaTeX), "choice" (MMLU-Pro letter)
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- parsing rows


def _field(row: dict, name: str, where: str, types: tuple = (str,)) -> Any:
    if name not in row:
        raise DataError(f"{where}: missing field '{name}'; every line needs it")
    value = row[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join(t.__name__ for t in types)
        raise DataError(f"{where}: field '{name}' must be {expected}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _gsm8k(row: dict, idx: int, where: str) -> Question:
    answer = _field(row, "answer", where)
    if "####" not in answer:
        raise DataError(f"{where}: field 'answer' has no '#### <number>' line (GSM8K format)")
    gold = answer.split("####")[-1].strip().replace(",", "")
    return Question(id=f"gsm8k-{idx}", question=_field(row, "question", where), gold=gold, kind="number")


def _math500(row: dict, idx: int, where: str) -> Question:
    answer = _field(row, "answer", where, (str, int, float))
    qid = row.get("unique_id") or f"math500-{idx}"
    meta = {k: row[k] for k in ("subject", "level") if k in row}
    return Question(id=str(qid), question=_field(row, "problem", where), gold=str(answer), kind="math", meta=meta)


def _mmlu_pro(row: dict, idx: int, where: str) -> Question:
    question = _field(row, "question", where)
    options = _field(row, "options", where, (list,))
    if not 2 <= len(options) <= len(CHOICE_LETTERS):
        raise DataError(f"{where}: field 'options' must have 2..{len(CHOICE_LETTERS)} entries, got {len(options)}")
    answer = _field(row, "answer", where)
    if answer not in CHOICE_LETTERS[: len(options)]:
        last = CHOICE_LETTERS[len(options) - 1]
        raise DataError(f"{where}: field 'answer' must be a letter A..{last}, got {answer!r}")
    text = question.strip() + "\n" + "\n".join(f"{CHOICE_LETTERS[i]}. {o}" for i, o in enumerate(options))
    qid = f"mmlu_pro-{row.get('question_id', idx)}"
    return Question(id=qid, question=text, gold=answer, kind="choice", meta={"category": row.get("category")})


PARSERS: dict[str, Callable[[dict, int, str], Question]] = {"gsm8k": _gsm8k, "math500": _math500, "mmlu_pro": _mmlu_pro}
HUB_ARGS = {  # hub id -> (config name, split) defaults
    "openai/gsm8k": ("main", None),
    "HuggingFaceH4/MATH-500": (None, None),
    "TIGER-Lab/MMLU-Pro": (None, None),
}


def read_jsonl_questions(path: Path, name: str) -> list[Question]:
    parse = PARSERS[name]
    questions = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as "
                                "UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}); fix or delete the line") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            questions.append(parse(row, len(questions), where))
    return questions


def _hub_questions(source: str, name: str, split: str) -> list[Question]:
    import datasets

    config, _ = HUB_ARGS.get(source, (None, None))
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure means the data set cannot be had; say how to fix it
        hint = " (HF_DATASETS_OFFLINE is set)" if offline else ""
        raise DataError(f"data.source={source!r} could not be loaded from the hub{hint} ({type(exc).__name__}): "
                        f"download it, or set data.source to a local JSONL file") from None
    parse = PARSERS[name]
    return [parse(dict(row), i, f"{source}[{split}][{i}]") for i, row in enumerate(ds)]


def _organism_questions(split: str, seed: int) -> list[Question]:
    from sae_reasoning.organism.task import make_splits

    splits = make_splits(seed=seed)
    if split not in splits:
        raise DataError(f"data.split={split!r}: the organism has splits {', '.join(splits)}")
    return [Question(id=p.id, question=p.question, gold=str(p.answer), kind="number",
                     meta={"n_ops": p.n_ops, "expression": p.expression}) for p in splits[split]]


def load_questions(data_cfg: Any, num_shards: int = 1, shard_index: int = 0) -> list[Question]:
    """The questions of a `DataConfig`, sharded (every num_shards-th from shard_index) and limited."""
    name, source = data_cfg.name, data_cfg.source
    if name == "organism":
        questions = _organism_questions(data_cfg.split, data_cfg.seed)
    elif name not in PARSERS:
        raise DataError(f"data.name={name!r}: choose one of organism, {', '.join(PARSERS)}")
    elif is_local_path(source):
        path = resolve_path(source)
        if path is None or not path.is_file():
            raise DataError(f"data.source={source!r}: no such file; give a local JSONL path or a hub id")
        questions = read_jsonl_questions(path, name)
    else:
        questions = _hub_questions(source, name, data_cfg.split)
    if not 0 <= shard_index < num_shards:
        raise DataError(f"shard_index={shard_index} must be in 0..{num_shards - 1}")
    questions = questions[shard_index::num_shards]
    if data_cfg.limit is not None:
        questions = questions[: data_cfg.limit]
    if not questions:
        raise DataError(f"data {name} ({source}, split {data_cfg.split}) has no questions; check the file or split")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise DataError(f"data {name}: question ids are not unique; give each line a distinct id")
    return questions
