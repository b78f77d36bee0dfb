"""Question sets: local JSONL files from ../shared/data, the organism, and clear errors on malformed lines."""

import json

import pytest
from omegaconf import OmegaConf

from sae_reasoning.data import load_questions
from sae_reasoning.errors import DataError

from conftest import SHARED_DATA


def data_cfg(**kw):
    base = dict(name="gsm8k", source=str(SHARED_DATA / "gsm8k" / "test.jsonl"), split="test", limit=None, seed=0)
    return OmegaConf.create({**base, **kw})


def test_gsm8k_local_golds_match_the_hash_line():
    qs = load_questions(data_cfg())
    assert len(qs) == 1319
    first = json.loads((SHARED_DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
    assert qs[0].question == first["question"] and qs[0].gold == first["answer"].split("####")[-1].strip()
    assert all(q.gold.lstrip("-").isdigit() for q in qs)


def test_math500_local_with_limit_and_shards():
    cfg = data_cfg(name="math500", source=str(SHARED_DATA / "math500" / "test.jsonl"))
    qs = load_questions(cfg)
    assert len(qs) == 500 and len({q.id for q in qs}) == 500 and qs[0].kind == "math"
    shard = load_questions(cfg, num_shards=4, shard_index=1)
    assert [q.id for q in shard] == [q.id for q in qs[1::4]]
    assert len(load_questions(data_cfg(name="math500", source=cfg.source, limit=7))) == 7


def test_organism_split_answers():
    qs = load_questions(OmegaConf.create(dict(name="organism", source="generated", split="test", limit=50, seed=0)))
    assert len(qs) == 50
    for q in qs:  # independent check: evaluate the expression in the question
        assert int(q.gold) == eval(q.meta["expression"])  # noqa: S307 - digits and +/- only


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": "#### 3"', ":2: not valid JSON"),
    ('{"answer": "#### 3"}', ":2: missing field 'question'"),
    ('{"question": 5, "answer": "#### 3"}', ":2: field 'question' must be str, got int"),
    ('{"question": "q", "answer": "no hash line"}', ":2: field 'answer' has no '#### <number>' line"),
    ('[1, 2]', ":2: expected a JSON object, got list"),
])
def test_malformed_line_is_reported_as_file_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "answer": "#### 1"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_questions(data_cfg(source=str(path)))
    assert f"{path}{message}" in str(err.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="has no questions"):
        load_questions(data_cfg(source=str(path)))


def test_hub_id_offline_fails_in_one_line():
    with pytest.raises(DataError) as err:
        load_questions(data_cfg(source="openai/gsm8k"))
    assert "data.source='openai/gsm8k' could not be loaded" in str(err.value) and "\n" not in str(err.value)
