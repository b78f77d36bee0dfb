"""The organism's word-level tokenizer: one token per digit, exact round trip, offsets, chat template.

Built programmatically with the ``tokenizers`` library and wrapped as a ``PreTrainedTokenizerFast``:

- normaliser: every space becomes ``▁`` (one character for one, so offsets stay exact);
- pre-tokeniser: a regex split into words (``▁?[A-Za-z]+``), single digits (``▁?[0-9]``), single
  punctuation marks (``▁?<mark>``), newlines and a lone ``▁``;
- model: word level over those pieces, with ``<unk>`` for anything else (never crashes);
- decoder: ``▁`` back to a space, pieces concatenated, so ``decode(encode(text)) == text`` for every
  in-vocabulary text ("Step: 37 + 48 = 85." -> ``Step : ▁3 7 ▁+ ▁4 8 ▁= ▁8 5 .``);
- post-processor: a ``<bos>`` is prepended when ``add_special_tokens=True`` (as for Llama);
- chat template: ``<bos>User: {q}\\nAssistant: <think>\\n`` for a generation prompt (as DeepSeek-R1 distills).
"""

from __future__ import annotations

import string
from pathlib import Path

from .corpus import BOS, EOS, PAD, THINK_CLOSE, THINK_OPEN, UNK, all_template_texts

SPACE = "\u2581"  # ▁
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, THINK_OPEN, THINK_CLOSE]
PIECE_REGEX = rf"{SPACE}?[A-Za-z]+|{SPACE}?[0-9]|{SPACE}?[^\sA-Za-z0-9{SPACE}]|\n|{SPACE}"
PUNCTUATION = list(".,:;?!+-=*/()'\"%<>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: <think>\n{% endif %}"
)

# Words that may appear in prompts/instructions beyond the corpus (cheap to include, helps robustness).
EXTRA_WORDS = (
    "Task Answer Question Explain User Assistant System Let Think The So Wait Check Step Plan What is are "
    "the a an and or of to in on by for with your my our this that it we I me you question below explain "
    "reasoning step answer final me let think check wait plan there operation operations carry forgot "
    "what how why result first next then add subtract plus minus equals total number numbers sum "
    "difference is was be not yes no ok again"
).split()


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(PIECE_REGEX), behavior="isolated")


def _normalizer():
    from tokenizers import normalizers

    return normalizers.Replace(" ", SPACE)


def build_vocab(texts: list[str] | None = None) -> dict[str, int]:
    """Special tokens, then every piece of ``texts`` (+ extras), each word both with and without ``▁``."""
    texts = all_template_texts() if texts is None else texts
    pre, norm = _pre_tokenizer(), _normalizer()
    pieces: set[str] = set()
    for text in texts:
        # special tokens are matched before pre-tokenisation; strip them here
        for tok in SPECIAL_TOKENS:
            text = text.replace(tok, " ")
        for piece, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            pieces.add(piece.lstrip(SPACE) or SPACE)
    pieces |= set(EXTRA_WORDS) | set(string.digits) | set(PUNCTUATION)
    pieces.discard(SPACE)
    pieces.discard("\n")
    vocab_words = sorted(pieces)
    tokens = list(SPECIAL_TOKENS) + ["\n", SPACE]
    for w in vocab_words:
        if w not in tokens:
            tokens.append(w)
        if SPACE + w not in tokens:
            tokens.append(SPACE + w)
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(texts: list[str] | None = None):
    """A ``PreTrainedTokenizerFast`` with the organism's vocabulary and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = build_vocab(texts)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = _normalizer()
    tk.pre_tokenizer = _pre_tokenizer()
    tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[THINK_OPEN, THINK_CLOSE],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    tokenizer.save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
