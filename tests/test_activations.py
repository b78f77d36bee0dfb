"""Sentence activations equal an independent computation (HF output_hidden_states, mean by hand)."""

import pytest
import torch

from sae_reasoning.activations import ActivationStore, extract_activations, resid_post
from sae_reasoning.errors import DataError
from sae_reasoning.models import load_model

from conftest import REPO

TEXTS = [
    "Once upon a time, there was a girl. Wait, let me check. She had a ball; it was red. Wait, let me check. The end",
    "Tom ran to the park.\nHe saw a dog!\n\nThe dog was big. Was it happy? Yes, it was 3.5 times happier.",
    "Lily smiled. She said hi to her mom and dad. Wait, let me check. They went home together",
]


def make_traces():
    return [{"id": f"t{i}", "prompt": f"user: story {i}\nassistant: <think>\n", "completion": text + "\n</think>\nDone."}
            for i, text in enumerate(TEXTS)]


def independent_means(lm, trace, sentences, layer):
    """Mean of HF hidden_states[layer + 1] over the tokens whose characters fall inside each sentence span."""
    text = trace["prompt"] + trace["completion"]
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    with torch.no_grad():
        hs = lm.model(torch.tensor([enc["input_ids"]]), output_hidden_states=True).hidden_states[layer + 1][0]
    out = []
    for s in sentences:
        # a token belongs to the sentence holding its first visible character (" Wait" starts on the space);
        # a whitespace-only token belongs to the sentence its start is inside ("was ▁ 3.5")
        anchor = [a if text[a:b].isspace() else a + len(text[a:b]) - len(text[a:b].lstrip())
                  for a, b in enc["offset_mapping"]]
        rows = [t for t, (a, b) in enumerate(enc["offset_mapping"])
                if b > a and s["char_start"] <= anchor[t] < s["char_end"]]
        out.append(hs[rows].mean(0))
    return torch.stack(out)


@pytest.fixture(scope="module")
def stories(stories_path):
    return load_model(str(stories_path), dtype="float32", device="cpu")


def test_activations_match_hidden_states(stories, tmp_path):
    traces = make_traces()
    layers = [0, 2, 3]
    folder = extract_activations(stories, traces, layers, tmp_path / "acts", batch_size=2, min_words=2,
                                 progress=False)
    store = ActivationStore(folder)
    index = store.index()
    assert store.meta["n_sentences"] == len(index) > 10
    # the repeated sentence keeps its own position: three "Wait, let me check." at three different spans
    waits = [(r["trace_id"], r["char_start"]) for r in index if r["text"] == "Wait, let me check."]
    assert len(waits) == 3 and len(set(waits)) == 3
    for r in index:  # spans slice back to the text, inside the thinking part
        trace = traces[int(r["trace_id"][1:])]
        text = trace["prompt"] + trace["completion"]
        assert text[r["char_start"]: r["char_end"]] == r["text"]
        assert len(trace["prompt"]) <= r["char_start"] and r["char_end"] <= text.index("</think>")
    for layer in layers:
        got = store.load(layer)
        want = torch.cat([independent_means(stories, t, [r for r in index if r["trace_id"] == t["id"]], layer)
                          for t in traces])
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5), (layer, (got - want).abs().max())
    # one file per shard holds every layer (format 2): 2 fsynced files a shard (tensors, index), not layers + 1
    from safetensors import safe_open

    shards = sorted((folder / "shards").iterdir())
    assert [p.name for p in shards] == [f"shard-{b:05d}.safetensors" for b in range(len(shards))] and len(shards) > 1
    assert sorted(p.name for p in folder.iterdir()) == ["index", "meta.json", "shards"] and store.meta["format"] == 2
    with safe_open(str(shards[0]), framework="pt") as fh:
        assert sorted(fh.keys()) == [f"layer_{layer}" for layer in layers]
    # a folder in the old layout (format 1: a file per layer and shard) is refused with one line, not misread
    old = tmp_path / "old"
    (old / "layer_0").mkdir(parents=True)
    (old / "layer_0" / "shard-00000.safetensors").write_bytes((shards[0]).read_bytes())
    for call in (lambda: ActivationStore(old, require_complete=False),
                 lambda: extract_activations(stories, traces, layers, old, progress=False)):
        with pytest.raises(DataError, match="older layout"):
            call()


def test_length_sorted_windows_keep_shard_order_and_values(stories, tmp_path):
    """Forwards on length-sorted batches across a window of shards: every shard still holds its own traces in order,
    and the vectors equal one-shard-at-a-time extraction (no sorting) and a window that is cut by a kill (whose
    half-written temporary files are removed)."""
    import json

    base = make_traces()
    # 7 traces of very different lengths, in an order that sorting changes
    traces = [{**base[i % 3], "id": f"t{i}", "completion": base[i % 3]["completion"].replace(
        "</think>", " More words here. " * (i % 4) + "</think>")} for i in (5, 0, 3, 6, 1, 4, 2)]
    plain = ActivationStore(extract_activations(stories, traces, [1], tmp_path / "plain", batch_size=2, min_words=2,
                                                sort_window=1, progress=False))
    folder = extract_activations(stories, traces, [1], tmp_path / "sorted", batch_size=2, min_words=2, sort_window=3,
                                 progress=False)
    sorted_ = ActivationStore(folder)
    for b in range(4):  # shard b = traces 2b, 2b + 1, whatever batches the forwards ran on
        ids = [json.loads(line)["trace_id"] for line in (folder / "index" / f"shard-{b:05d}.jsonl").open()]
        assert list(dict.fromkeys(ids)) == [t["id"] for t in traces[2 * b: 2 * b + 2]]
    assert sorted_.index() == plain.index()
    assert torch.allclose(sorted_.load(1), plain.load(1), atol=1e-5)
    # resume: shards 1 and 3 missing (as after a kill), the rest is kept and the result is the same
    part = tmp_path / "part"
    extract_activations(stories, traces, [1], part, batch_size=2, min_words=2, sort_window=3, progress=False)
    (part / "meta.json").unlink()
    for b in (1, 3):
        (part / "index" / f"shard-{b:05d}.jsonl").unlink()
    (part / "index" / ".shard-00001.jsonl.tmp-123-456").write_text("{half a rec")  # what a kill mid-write leaves
    (part / "shards" / ".shard-00003.safetensors.tmp").write_bytes(b"half")
    kept = (part / "index" / "shard-00000.jsonl").stat().st_mtime_ns
    resumed = ActivationStore(extract_activations(stories, traces, [1], part, batch_size=2, min_words=2,
                                                  sort_window=3, progress=False))
    assert (part / "index" / "shard-00000.jsonl").stat().st_mtime_ns == kept
    assert not list(part.rglob(".*.tmp*"))
    assert resumed.index() == plain.index() and torch.allclose(resumed.load(1), plain.load(1), atol=1e-5)
    with pytest.raises(DataError, match="sort_window"):
        extract_activations(stories, traces, [1], tmp_path / "bad", sort_window=0, progress=False)


def test_forward_stops_at_the_deepest_layer(stories):
    calls = []
    handle = stories.model.model.layers[4].register_forward_hook(lambda *a: calls.append(1))
    try:
        ids = torch.tensor([[1, 400, 300, 200]])
        out = resid_post(stories, ids, torch.ones_like(ids), [1, 2])
    finally:
        handle.remove()
    assert sorted(out) == [1, 2] and not calls


def test_half_precision_storage_and_resume(stories, tmp_path):
    traces = make_traces()
    full = extract_activations(stories, traces, [1], tmp_path / "a", batch_size=1, min_words=2, dtype="bfloat16",
                               progress=False)
    # simulate a crash after the first batch: drop later shards and the completion marker, then rerun
    part = tmp_path / "b"
    extract_activations(stories, traces[:1], [1], part, batch_size=1, min_words=2, dtype="bfloat16", progress=False)
    (part / "meta.json").unlink()
    extract_activations(stories, traces, [1], part, batch_size=1, min_words=2, dtype="bfloat16", progress=False)
    a, b = ActivationStore(full), ActivationStore(part)
    assert a.index() == b.index() and torch.equal(a.load(1), b.load(1))
    assert a.meta["dtype"] == "bfloat16"
    ref = ActivationStore(extract_activations(stories, traces, [1], tmp_path / "c", batch_size=1, min_words=2,
                                              progress=False)).load(1)
    assert torch.allclose(a.load(1), ref, rtol=1e-2, atol=1e-2)


def test_bad_inputs(stories, tmp_path):
    with pytest.raises(DataError, match="layers \\[7\\] do not exist"):
        extract_activations(stories, make_traces(), [7], tmp_path / "x", progress=False)
    empty = [{"id": "e", "prompt": "<think>\n", "completion": "   \n"}]
    with pytest.raises(DataError, match="no sentence was found"):
        extract_activations(stories, empty, [0], tmp_path / "y", progress=False)
    assert not (tmp_path / "y" / "meta.json").exists()
    long = [{"id": "long", "prompt": "<think>\n", "completion": "A cat sat. " * 300}]
    with pytest.raises(DataError, match="more than the model's context"):
        extract_activations(stories, long, [0], tmp_path / "z", progress=False)



def test_tokens_after_the_last_sentence_are_not_run(stories, tmp_path):
    """The forward stops at the last sentence's end: a trace whose answer part alone overflows the model's context
    is extracted, and its vectors equal those of the trace cut after its thinking (causal: the tail cannot matter)."""
    base = make_traces()[0]
    tail = "\nThe end. The end. The end." * 120  # well past the 512-token context
    traces = [{**base, "completion": base["completion"] + tail}]
    store = ActivationStore(extract_activations(stories, traces, [2], tmp_path / "acts", min_words=2,
                                                progress=False))
    cut = {**base, "completion": base["completion"].split("</think>")[0]}
    assert torch.allclose(store.load(2), independent_means(stories, cut, store.index(), 2), atol=1e-5)


ORGANISM = REPO / "sae_reasoning" / "organism" / "weights" / "thinking"


def test_organism_traces_carry_planted_labels_and_match_hidden_states(tmp_path):
    """On the organism: generated traces -> sentences -> activations; >= 99% of sentences carry their planted label,
    every behavior occurs, and the vectors equal HF hidden states averaged by hand."""
    from omegaconf import OmegaConf

    from sae_reasoning.data import load_questions
    from sae_reasoning.organism.corpus import BEHAVIORS, label_sentence
    from sae_reasoning.traces import generate_traces, iter_traces

    lm = load_model(str(ORGANISM), dtype="float32", device="cpu")
    questions = load_questions(OmegaConf.create(dict(name="organism", source="generated", split="test", limit=48,
                                                     seed=0)))
    traces = list(iter_traces(generate_traces(lm, questions, tmp_path / "traces", batch_size=16,
                                              max_new_tokens=200, progress=False)))
    store = ActivationStore(extract_activations(lm, traces, [1, 2], tmp_path / "acts", batch_size=16,
                                                label_fn=label_sentence, progress=False))
    index = store.index()
    labels = [r["label"] for r in index]
    assert sum(label is not None for label in labels) / len(labels) >= 0.99
    assert set(labels) - {None} == set(BEHAVIORS)
    first = [r for r in index if r["trace_id"] in {t["id"] for t in traces[:8]}]
    for layer in (1, 2):
        want = torch.cat([independent_means(lm, t, [r for r in first if r["trace_id"] == t["id"]], layer)
                          for t in traces[:8]])
        assert torch.allclose(store.load(layer)[: len(want)], want, atol=1e-5)
