"""Sentence splitting of thinking traces with exact character and token spans (METHOD.md step 2).

Every sentence carries its own span in the full text, found while scanning; the text is never
searched for a sentence (the reference code used ``str.find``, so a repeated "Wait, let me check."
always mapped to its first occurrence).

Rules of :func:`split_sentences` (one left-to-right pass, O(n)):

* A sentence ends after a newline, or after a run of ``. ! ? ;`` (also ``…`` and the full-width
  ``。！？；``) plus any closing quotes/brackets/markdown stars right after it, provided the run is
  followed by whitespace or the end of the range. So ``3.14``, ``e.g.x``, ``U.S.A``, ``5!/3!``,
  ``a;b`` never split (full-width terminators need no whitespace: CJK has none).
* Not a sentence end although followed by whitespace:
  - ``.`` after a one-letter word that is uppercase (initials: ``J. Smith``, and, as a documented
    trade-off, ``option A. Next``) or that continues a dotted chain (``e.g.``, ``i.e.``, ``a.m.``).
    A lone lowercase letter (``so x = a. Then``) does end the sentence: math uses them as variables.
  - ``.`` after an abbreviation in :data:`ABBREVIATIONS_ALWAYS` (titles, ``vs``, ``Fig``…), or in
    :data:`ABBREVIATIONS_BEFORE_LOWER` (``etc``, ``al``…) when the next word starts in lowercase or
    with a digit.
  - ``.`` after 1-3 digits that open the line: a list marker (``1. Compute the sum.``).
  - ellipses (``...`` or ``…``) unless the next word starts in uppercase (``wait... maybe`` goes on,
    ``Hmm... Let me`` splits).
  - factorials: ``!`` right after a digit, ``)`` or a one-letter word (``5!``, ``(n-1)!``, ``n!``)
    unless the next non-space character is uppercase (``120! Great``) or the line/text ends.
* Each piece is stripped of surrounding whitespace (spans exclude it); pieces with fewer than
  ``min_words`` whitespace-separated words are dropped and ``index`` counts the kept ones only.
  CJK text without spaces counts as one word per space-free run.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

# Titles and the like: the word after them is (almost) never a new sentence. Case-sensitive on
# purpose ("ms." is milliseconds, "No." is an answer).
ABBREVIATIONS_ALWAYS = frozenset(
    {"Mr", "Mrs", "Ms", "Dr", "Prof", "St", "vs", "Vs", "cf", "Cf", "viz", "Fig", "fig", "Figs",
     "Eq", "eq", "Eqs", "eqs", "approx", "Approx"}
)
# Often sentence-final ("... and so on, etc."): protected only before a lowercase word or a digit.
ABBREVIATIONS_BEFORE_LOWER = frozenset(
    {"etc", "al", "Jr", "Sr", "Inc", "Ltd", "Co", "Corp", "resp", "ca", "incl", "esp", "Sec", "Ch"}
)
_MAX_ABBREV = max(len(a) for a in ABBREVIATIONS_ALWAYS | ABBREVIATIONS_BEFORE_LOWER)

_TERMINATORS = frozenset(".!?;…")
_FULLWIDTH_TERMINATORS = frozenset("。！？；")
_CLOSERS = frozenset("\"')]}»”’*」』）】")


@dataclass
class Sentence:
    """One sentence; ``full_text[char_start:char_end] == text`` always (Python str indices)."""

    index: int
    text: str
    char_start: int
    char_end: int
    token_start: int | None = None  # half-open token range, set by attach_token_spans
    token_end: int | None = None


def thinking_span(text: str, open_tag: str = "<think>", close_tag: str = "</think>") -> tuple[int, int]:
    """Character range of the thinking part: after the first ``open_tag`` (else from 0) up to the
    first ``close_tag`` after it (else to the end)."""
    i = text.find(open_tag)
    start = 0 if i < 0 else i + len(open_tag)
    j = text.find(close_tag, start)
    return start, (len(text) if j < 0 else j)


def _word_before(text: str, pos: int, lo: int) -> tuple[str, int]:
    """The run of letters ending just before ``pos`` (at most ``_MAX_ABBREV + 1`` long) and its start.

    Bounded look-back keeps the scan O(n)."""
    k = pos
    while k > lo and pos - k <= _MAX_ABBREV and text[k - 1].isalpha():
        k -= 1
    return text[k:pos], k


def _next_visible(text: str, pos: int, end: int) -> str:
    """First non-space character at or after ``pos`` on the same line ('' at a newline or the end).

    Only called right after a terminator run, on the whitespace that follows it; those stretches are
    disjoint, so the total cost stays O(n)."""
    while pos < end and text[pos].isspace() and text[pos] != "\n":
        pos += 1
    return "" if pos >= end or text[pos] == "\n" else text[pos]


def _period_protected(text: str, i: int, lo: int, nxt: str) -> bool:
    """Whether the single ``.`` at ``i`` (followed by whitespace) is not a sentence end."""
    word, wstart = _word_before(text, i, lo)
    before = text[wstart - 1] if wstart > lo else ""
    if word and not before.isalnum():  # a whole word, not the tail of "1st" or "x2y"
        if len(word) == 1:
            # Uppercase: initials. Lowercase: only inside a dotted chain (e.g. / i.e. / a.m.).
            return word.isupper() or before == "."
        if word in ABBREVIATIONS_ALWAYS:
            return True
        if word in ABBREVIATIONS_BEFORE_LOWER:
            return nxt != "" and (nxt.islower() or nxt.isdigit())
        return False
    # List marker: 1-3 digits that open the line ("12. Next we ...").
    k = i
    while k > lo and i - k < 4 and text[k - 1].isdigit():
        k -= 1
    return 0 < i - k <= 3 and _opens_line(text, k, lo)


def _opens_line(text: str, pos: int, lo: int) -> bool:
    """Only spaces/tabs (at most 8: bounded, so the scan stays O(n)) between the line start and ``pos``."""
    for _ in range(9):
        if pos <= lo or text[pos - 1] == "\n":
            return True
        if text[pos - 1] not in " \t":
            return False
        pos -= 1
    return False


def _boundaries(text: str, start: int, end: int) -> list[int]:
    """Positions (absolute) where one piece ends and the next begins."""
    cuts: list[int] = []
    i = start
    while i < end:
        c = text[i]
        if c == "\n":
            cuts.append(i + 1)
            i += 1
            continue
        if c in _FULLWIDTH_TERMINATORS:
            j = i + 1
            while j < end and (text[j] in _FULLWIDTH_TERMINATORS or text[j] in _CLOSERS):
                j += 1
            cuts.append(j)
            i = j
            continue
        if c not in _TERMINATORS:
            i += 1
            continue
        # A run of terminators ("?!", "...", "!!"), then closing quotes/brackets.
        j = i
        while j < end and text[j] in _TERMINATORS:
            j += 1
        run = text[i:j]
        k = j
        while k < end and text[k] in _CLOSERS:
            k += 1
        if k < end and not text[k].isspace():
            i = k  # "3.14", "e.g.x", "5!/3!", "a;b": inside a token, not an end
            continue
        nxt = _next_visible(text, k, end)
        if _protected(text, i, run, start, nxt):
            i = k
            continue
        cuts.append(k)
        i = k
    return cuts


def _protected(text: str, i: int, run: str, lo: int, nxt: str) -> bool:
    """Whether a terminator run at ``i``, followed by whitespace or the end, is not a sentence end."""
    if run == ".":
        return _period_protected(text, i, lo, nxt)
    if run == "…" or (len(run) >= 2 and set(run) == {"."}):
        return nxt != "" and not nxt.isupper()  # "wait... maybe" goes on; "Hmm... Let" splits
    if run == "!":
        prev = text[i - 1] if i > lo else ""
        word, wstart = _word_before(text, i, lo)
        single_letter = len(word) == 1 and not (wstart > lo and text[wstart - 1].isalnum())
        if prev.isdigit() or prev == ")" or single_letter:
            return nxt != "" and not nxt.isupper()  # "5! = 120", "3! ways"; "120! Great" splits
    return False


def split_sentences(text: str, start: int = 0, end: int | None = None, min_words: int = 3) -> list[Sentence]:
    """Split ``text[start:end]`` into sentences whose spans index the full ``text`` (see module doc)."""
    end = len(text) if end is None else end
    if not 0 <= start <= end <= len(text):
        raise ValueError(f"bad range [{start}, {end}) for a text of length {len(text)}")
    out: list[Sentence] = []
    a = start
    for b in [*_boundaries(text, start, end), end]:
        s, e = a, b
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        a = b
        if e > s:
            piece = text[s:e]
            if len(piece.split()) >= min_words:
                out.append(Sentence(len(out), piece, s, e))
    return out


def attach_token_spans(sentences: Sequence[Sentence], offsets: Sequence[Sequence[int]]) -> list[Sentence]:
    """Set ``token_start``/``token_end`` (half-open) from a fast tokenizer's ``offset_mapping``.

    ``offsets`` are (start, end) character offsets of each token in the same full text. Empty
    ranges (special tokens: (0, 0)) are ignored. A token belongs to the sentence containing its
    first non-space character, so a byte-level token that straddles a boundary (".\\n", " The")
    goes to the sentence its visible character belongs to; a whitespace-only token goes to the
    sentence containing its start, if any. Implemented without the text: since sentences are
    stripped, a token starting in the gap before a sentence and reaching into it has its first
    non-space character there (gaps hold whitespace, or dropped short pieces). Raises ValueError if
    a sentence gets no token. O((tokens) log(sentences)).
    """
    sents = list(sentences)
    starts = [s.char_start for s in sents]
    first: list[int | None] = [None] * len(sents)
    last: list[int | None] = [None] * len(sents)
    for t, (a, b) in enumerate(offsets):
        a, b = int(a), int(b)  # also accepts a tensor row
        if b <= a:
            continue
        # Anchor: the first character of the token that lies inside some sentence. A token like
        # " The" starts on the space between sentences; its first visible char is inside the next.
        si = bisect.bisect_right(starts, a) - 1
        if si >= 0 and a < sents[si].char_end:
            pass  # token starts inside sentence si (at its visible text)
        else:
            si += 1  # token starts in the gap before sentence si+1; does it reach into it?
            if si >= len(sents) or sents[si].char_start >= b:
                continue  # whitespace between sentences, or text outside every sentence
        if first[si] is None:
            first[si] = t
        last[si] = t
    for s, f, l in zip(sents, first, last):
        if f is None or l is None:
            raise ValueError(
                f"sentence {s.index} (chars {s.char_start}:{s.char_end}, {s.text[:40]!r}) got no token: "
                "are the offsets from the same full text, or does one token cover two sentences?"
            )
        s.token_start, s.token_end = f, l + 1
    return sents
