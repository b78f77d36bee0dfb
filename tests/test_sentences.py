"""Splitter tests: tricky text, exact spans, token spans with a real tokenizer, random texts."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from sae_reasoning.sentences import Sentence, attach_token_spans, split_sentences, thinking_span

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "stories260K" / "hf"
if not TOKENIZER_DIR.exists():  # the checkout may live elsewhere; the shared data is at /work/shared
    TOKENIZER_DIR = Path("/work/shared/data/models/stories260K/hf")


def texts(text: str, **kw) -> list[str]:
    sents = split_sentences(text, **kw)
    check_spans(text, sents)
    return [s.text for s in sents]


def check_spans(text: str, sents: list[Sentence]) -> None:
    prev_end = -1
    for i, s in enumerate(sents):
        assert s.index == i
        assert text[s.char_start : s.char_end] == s.text
        assert s.text == s.text.strip() and s.text
        assert s.char_start >= prev_end and s.char_end > s.char_start
        prev_end = s.char_end


@pytest.mark.parametrize(
    "text, expected",
    [
        ("We have 3.14 and 0.5 here. Next we add them.", ["We have 3.14 and 0.5 here.", "Next we add them."]),
        ("Use a trick, e.g. the sum formula. Then i.e. we add.",
         ["Use a trick, e.g. the sum formula.", "Then i.e. we add."]),
        ("As J. R. Smith said in 1990. It works fine.", ["As J. R. Smith said in 1990.", "It works fine."]),
        ("Dr. Lee and Mr. Li met vs. the world. Good for them.",
         ["Dr. Lee and Mr. Li met vs. the world.", "Good for them."]),
        ("Apples, pears, etc. are fruit. Cars, bikes, etc. Now we stop.",
         ["Apples, pears, etc. are fruit.", "Cars, bikes, etc.", "Now we stop."]),
        # factorials: "!" after a digit, ")" or one letter continues unless an uppercase word follows
        ("We know 5! = 120 and it fits. Next step now.", ["We know 5! = 120 and it fits.", "Next step now."]),
        ("So 3! = 6 holds true. And 5!/3! = 20 also holds.", ["So 3! = 6 holds true.", "And 5!/3! = 20 also holds."]),
        ("Then (n-1)! times n gives n! in total. Good.", ["Then (n-1)! times n gives n! in total."]),
        ("The total is 120! Great, that is it.", ["The total is 120!", "Great, that is it."]),
        ("The answer is 5!", ["The answer is 5!"]),
        ("Is that right? Yes it is! Well; maybe not really.",
         ["Is that right?", "Yes it is!", "maybe not really."]),
        # ellipses: continue before lowercase, split before uppercase
        ("Wait... maybe we can do this. Hmm... Let me think again.",
         ["Wait... maybe we can do this.", "Let me think again."]),
        ("Wait… maybe we can do this… Let me think again.", ["Wait… maybe we can do this…", "Let me think again."]),
        # closing quotes / brackets / markdown stay with the sentence
        ('He said "this is fine." Then we left home.', ['He said "this is fine."', "Then we left home."]),
        ("(This is an aside.) Now back to work.", ["(This is an aside.)", "Now back to work."]),
        ("**Step one done.** Now step two starts.", ["**Step one done.**", "Now step two starts."]),
        # a lone lowercase letter is a variable, not an abbreviation
        ("So the side is a. Then the area follows.", ["So the side is a.", "Then the area follows."]),
        # list markers
        ("Plan:\n1. Compute the sum.\n2. Divide by two.\n  3. Check the result.",
         ["1. Compute the sum.", "2. Divide by two.", "3. Check the result."]),
        ("In 2024. The year was long.", ["The year was long."]),
        # newlines, blank lines, trailing text without terminator
        ("First line has words\n\nSecond line has words\nthird one trails", ["First line has words",
         "Second line has words", "third one trails"]),
        ("  Leading spaces here.   \n\n\n   And trailing too.  ", ["Leading spaces here.", "And trailing too."]),
        # no split inside tokens
        ("Open file.txt or www.example.com now. Done with that.",
         ["Open file.txt or www.example.com now.", "Done with that."]),
        ("", []),
        ("Short. Too short! Ok", []),
    ],
)
def test_tricky(text: str, expected: list[str]) -> None:
    assert texts(text) == expected


def test_min_words_filter_keeps_indices_contiguous() -> None:
    text = "Ok. This one is kept. No. And this is kept too. Yes!"
    sents = split_sentences(text)
    assert [s.text for s in sents] == ["This one is kept.", "And this is kept too."]
    assert [s.index for s in sents] == [0, 1]
    assert [s.text for s in split_sentences(text, min_words=1)] == [
        "Ok.", "This one is kept.", "No.", "And this is kept too.", "Yes!"]
    assert split_sentences(text, min_words=10) == []


def test_repeated_sentences_map_to_their_own_positions() -> None:
    text = "Wait, let me check. The sum is 12. Wait, let me check. Wait, let me check."
    sents = split_sentences(text)
    check_spans(text, sents)
    waits = [s for s in sents if s.text == "Wait, let me check."]
    assert len(waits) == 3
    assert len({s.char_start for s in waits}) == 3
    assert waits[0].char_start == 0 and waits[-1].char_end == len(text)


def test_unicode_offsets_are_str_indices() -> None:
    text = "Café naïve 😀 résumé here. 日本語 の テキスト です。Ünïcödé — ok then 🎉🎉 fine.\nλ = 3.5 is Greek."
    sents = split_sentences(text)
    check_spans(text, sents)
    assert [s.text for s in sents] == [
        "Café naïve 😀 résumé here.", "日本語 の テキスト です。", "Ünïcödé — ok then 🎉🎉 fine.", "λ = 3.5 is Greek."]


def test_cjk_fullwidth_terminators() -> None:
    # Full-width terminators split without whitespace; space-free CJK counts as one word.
    text = "第一 句 很 好。第二 句 也 好！第三句"
    assert texts(text) == ["第一 句 很 好。", "第二 句 也 好！"]
    assert texts(text, min_words=1) == ["第一 句 很 好。", "第二 句 也 好！", "第三句"]


def test_thinking_span_and_range() -> None:
    text = "System: solve it. User: what is 2+2?<think>\nFirst we add two and two. We get four.\n</think> The answer is 4."
    a, b = thinking_span(text)
    assert text[a:b] == "\nFirst we add two and two. We get four.\n"
    sents = split_sentences(text, a, b)
    check_spans(text, sents)
    assert [s.text for s in sents] == ["First we add two and two.", "We get four."]
    assert all(a <= s.char_start and s.char_end <= b for s in sents)
    # no open tag (DeepSeek templates put it in the prompt) / no close tag (truncated)
    assert thinking_span("we think here.</think>answer") == (0, len("we think here."))
    assert thinking_span("prompt <think> still thinking") == (len("prompt <think>"), len("prompt <think> still thinking"))
    assert thinking_span("no tags at all") == (0, 14)
    assert thinking_span("<t>x</t>y", "<t>", "</t>") == (3, 4)


def test_range_cuts_at_end_even_mid_word() -> None:
    text = "One two three four. Five six seven"
    sents = split_sentences(text, 0, len(text) - 2)
    assert [s.text for s in sents] == ["One two three four.", "Five six sev"]
    with pytest.raises(ValueError):
        split_sentences(text, 5, 2)


def test_linear_time_on_long_text() -> None:
    unit = "Wait, 3.14 is e.g. pi... and 5! = 120; right? Yes.\n"
    short, long = unit * 2000, unit * 20000
    t0 = time.perf_counter()
    n_short = len(split_sentences(short))
    t1 = time.perf_counter()
    n_long = len(split_sentences(long))
    t2 = time.perf_counter()
    assert n_long == 10 * n_short
    assert (t2 - t1) < 30 * (t1 - t0) + 0.5  # ~10x for linear; 100x would be quadratic
    # pathological runs (long whitespace, long dots) stay fast too
    t0 = time.perf_counter()
    split_sentences("a." + " " * 200_000 + "b " * 3 + "." * 100_000 + " x y z")
    assert time.perf_counter() - t0 < 2.0


FRAGMENTS = [
    "Wait, let me check.", "The value is 3.14 here.", "We use e.g. the formula.", "So 5! = 120 holds.",
    "Then 5!/3! = 20.", "Is it right?", "Yes!", "Hmm...", "so the side is a.", "Dr. Lee agrees.",
    "Café 😀 naïve test.", "日本語です。", "x = -0.5;", "(An aside.)", '"Quoted text."', "1. First item",
    "etc. and so on", "no terminator here", "...", "!", "?", ";", "", "   ", "\n", "\n\n", "\t",
]


def test_property_random_texts() -> None:
    rng = random.Random(0)
    for _ in range(500):
        parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 25))]
        text = "".join(p + rng.choice(["", " ", "  ", "\n", " \n "]) for p in parts)
        a = rng.randint(0, len(text))
        b = rng.randint(a, len(text))
        for lo, hi in ((0, len(text)), (a, b)):
            for mw in (1, 3):
                sents = split_sentences(text, lo, hi, min_words=mw)
                check_spans(text, sents)
                for s in sents:
                    assert lo <= s.char_start < s.char_end <= hi
                    assert len(s.text.split()) >= mw
                # strictly increasing and non-overlapping
                assert all(x.char_end <= y.char_start for x, y in zip(sents, sents[1:]))
        # with min_words=1 nothing visible is lost: the pieces cover every non-space char
        covered = "".join(s.text for s in split_sentences(text, min_words=1))
        assert "".join(covered.split()) == "".join(text.split())


# ----------------------------------------------------------------------------- token spans


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    if not TOKENIZER_DIR.exists():
        pytest.skip(f"tokenizer not found at {TOKENIZER_DIR}")
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert tok.is_fast
    return tok


TOKEN_TEXTS = [
    "Question: what is 5!?<think>\nOkay, 5! = 120. Wait, let me check. Wait, let me check.\n\n"
    "So 3.14 times 2 is 6.28; e.g. pi times two.\nCafé naïve 🎉 fine here.</think> The answer is 120.",
    "Once upon a time there was a cat. The cat was happy! Did the dog like it? Yes, he did.\n"
    "Tom said \"hello there.\" Then they played all day long",
]


@pytest.mark.parametrize("text", TOKEN_TEXTS)
def test_token_spans_with_real_tokenizer(tokenizer, text: str) -> None:
    enc = tokenizer(text, return_offsets_mapping=True)
    a, b = thinking_span(text)
    sents = attach_token_spans(split_sentences(text, a, b), enc["offset_mapping"])
    assert len(sents) >= 3
    ids = enc["input_ids"]
    prev_end = 0
    for s in sents:
        assert s.token_start is not None and s.token_end is not None
        assert prev_end <= s.token_start < s.token_end
        prev_end = s.token_end
        decoded = tokenizer.decode(ids[s.token_start : s.token_end])
        assert " ".join(s.text.split()) in " ".join(decoded.split()), (s.text, decoded)
        # every token in the span overlaps the sentence's chars
        for ta, tb in enc["offset_mapping"][s.token_start : s.token_end]:
            assert ta < s.char_end and tb > s.char_start


def test_token_spans_special_tokens_ignored_and_repeats() -> None:
    text = "Wait, let me check. Wait, let me check."
    sents = split_sentences(text)
    # (0,0) special token first; a " Wait" token starting on the space belongs to the next sentence;
    # a ".\n"-style token ending a sentence belongs to the sentence with its first character.
    offsets = [(0, 0), (0, 4), (4, 5), (5, 9), (9, 12), (12, 19), (19, 24), (24, 25), (25, 29), (29, 32),
               (32, 38), (38, 39), (0, 0)]
    attach_token_spans(sents, offsets)
    assert (sents[0].token_start, sents[0].token_end) == (1, 6)
    assert (sents[1].token_start, sents[1].token_end) == (6, 12)


def test_token_spans_missing_token_raises() -> None:
    text = "One two three. Four five six."
    sents = split_sentences(text)
    with pytest.raises(ValueError, match="got no token"):
        attach_token_spans(sents, [(0, 0), (0, 14)])


def test_token_spans_byte_level_bpe_straddling_tokens() -> None:
    """Qwen2-style pre-tokenisation makes ".\\n" and " The" single tokens that straddle boundaries."""
    tk = pytest.importorskip("tokenizers")
    qwen2 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(qwen2), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = tk.decoders.ByteLevel()
    corpus = ["Wait, let me check.\nThe sum is 12. The cat sat.\n\nThe end. Café 🎉 naïve."] * 20
    trainer = tk.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    text = "Wait, let me check.\nThe sum is 12. The cat sat.\n\nThe end. Café 🎉 naïve. Wait, let me check.\nThe end."
    enc = tok.encode(text)
    pieces = [text[a:b] for a, b in enc.offsets]
    assert ".\n" in pieces and " The" in pieces  # the straddling tokens this test is about
    sents = attach_token_spans(split_sentences(text, min_words=2), enc.offsets)
    got = [tok.decode(enc.ids[s.token_start : s.token_end]) for s in sents]
    assert got == ["Wait, let me check.\n", "The sum is 12.", " The cat sat.\n\n", "The end.", " Café 🎉 naïve.",
                   "Wait, let me check.\n", "The end."]
