"""Labellers and LLM judges of SAE latents (METHOD.md step 5), behind one interface.

- `OfflineLabeller` (default, deterministic, no network): class-based TF-IDF keywords of each latent's member
  sentences against the other latents' (BERTopic's c-TF-IDF), plus its most active sentences.
- `OpenAIJudge`: any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server...) via the `openai` client.
- `HFJudge`: a local Hugging Face chat model, loaded on first use.

An LLM judge writes each latent's title and description `n_repeats` times (as the paper) and also answers the
taxonomy-metric questions (membership, fit, distinctness) that `interpret.llm_metrics` asks. Every request goes
through `LLMJudge.ask`: an on-disk cache keyed by sha256(backend, model, messages, params) (only successes are
stored, so a rerun costs nothing and a failure is retried next run), validation of the reply against its schema,
bounded retries with exponential backoff (Retry-After honoured on 429, capped), and counters. A request that
still fails is returned as None and counted: callers count it as a failure, never as a success.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from sae_reasoning.artifacts import atomic_write_json
from sae_reasoning.errors import UserError

if TYPE_CHECKING:
    from sae_reasoning.interpret import LatentMembers


@dataclass
class Label:
    """A latent's name. `source`: offline | llm | offline-fallback (every LLM repeat failed) | empty (no members)."""

    latent: int
    title: str
    description: str
    keywords: list[str] = field(default_factory=list)
    source: str = "offline"
    titles: list[str] = field(default_factory=list)  # every valid LLM repeat's title, in order
    n_failed: int = 0  # LLM repeats that failed (after retries)


class Labeller(Protocol):
    """Names every latent of one SAE. `is_llm` says whether it can also answer the taxonomy-metric questions."""

    is_llm: bool

    def label(self, latents: Sequence["LatentMembers"]) -> list[Label]: ...


# ------------------------------------------------------------------------------------------------ offline


STOP_WORDS = frozenset(ENGLISH_STOP_WORDS)
N_TITLE_WORDS, N_KEYWORDS, N_EXAMPLES = 3, 5, 3


def tokenize(text: str) -> list[str]:
    """Lower-case words of letters only (numbers vanish), without stop-words and one-letter words."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 1 and w not in STOP_WORDS]


def ctfidf(docs: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Class-based TF-IDF (BERTopic): one "document" per class = all its tokens. `(vocab, weights [C, V])`.

    W[c, t] = tf[c, t] * log(1 + A / f[t]), with tf L1-normalised per class, A = mean tokens per class and
    f[t] = count of t over all classes: frequent in this class, rare in the others.
    """
    vocab = sorted({t for doc in docs for t in doc})
    index = {t: i for i, t in enumerate(vocab)}
    counts = np.zeros((len(docs), len(vocab)))
    for c, doc in enumerate(docs):
        for t in doc:
            counts[c, index[t]] += 1
    if not vocab:
        return vocab, counts
    tf = counts / counts.sum(1, keepdims=True).clip(min=1)
    idf = np.log(1 + counts.sum(1).mean() / counts.sum(0).clip(min=1))
    return vocab, tf * idf


def representative(members: "LatentMembers", n: int = N_EXAMPLES) -> list[tuple[str, float]]:
    """The `n` most active distinct member sentences, with their activations."""
    order = sorted(range(len(members.sentences)), key=lambda i: (-members.activations[i], i))
    out: list[tuple[str, float]] = []
    for i in order:
        if members.sentences[i] not in {s for s, _ in out}:
            out.append((members.sentences[i], float(members.activations[i])))
        if len(out) == n:
            break
    return out


def empty_label(latent: int) -> Label:
    return Label(latent, "(empty)", "No sentence has this latent as its largest activation.", source="empty")


class OfflineLabeller:
    """Deterministic titles: the top c-TF-IDF keywords of a latent's member sentences against the other latents'."""

    is_llm = False

    def label(self, latents: Sequence["LatentMembers"]) -> list[Label]:
        live = [m for m in latents if m.sentences]
        vocab, weights = ctfidf([[t for s in m.sentences for t in tokenize(s)] for m in live])
        out = {m.latent: empty_label(m.latent) for m in latents}
        for row, m in zip(weights, live):
            # ties broken alphabetically (vocab is sorted and the sort is stable) so titles are reproducible
            keywords = [vocab[i] for i in sorted(range(len(vocab)), key=lambda i: -row[i]) if row[i] > 0][:N_KEYWORDS]
            title = " / ".join(keywords[:N_TITLE_WORDS]) or "(no words)"
            examples = "; ".join(f'"{s}"' for s, _ in representative(m))
            description = f"Keywords: {', '.join(keywords) or '-'}. Most active sentences: {examples}."
            out[m.latent] = Label(m.latent, title, description, keywords=keywords, source="offline")
        return [out[m.latent] for m in latents]


# ------------------------------------------------------------------------------------------------ replies


def extract_json(raw: str) -> dict:
    """The JSON object in a reply, tolerating a reasoning preamble (`...</think>`) and ```json fences."""
    text = raw.split("</think>")[-1]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON object in reply {raw[:80]!r}")
    obj = json.loads(text[start:end + 1])  # JSONDecodeError is a ValueError
    if not isinstance(obj, dict):
        raise ValueError("reply JSON is not an object")
    return obj


def _text(obj: dict, key: str, max_chars: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"reply needs a non-empty string {key!r}")
    return " ".join(value.split())[:max_chars]


def parse_label(raw: str) -> dict:
    """{"title": str, "description": str} (optional "includes"/"excludes" strings are appended)."""
    obj = extract_json(raw)
    out = {"title": _text(obj, "title", 120), "description": _text(obj, "description", 1000)}
    for key in ("includes", "excludes"):
        if isinstance(obj.get(key), str) and obj[key].strip():
            out["description"] += f" {key.capitalize()}: {' '.join(obj[key].split())}"
    return out


def parse_list(key: str, n: int, kind: str) -> Callable[[str], list]:
    """A parser of {key: [n values]}: kind "bool" (true/false) or "score" (a number in 0..10)."""

    def parse(raw: str) -> list:
        values = extract_json(raw).get(key)
        if not isinstance(values, list) or len(values) != n:
            raise ValueError(f"reply needs {key!r}: a list of exactly {n} values")
        for v in values:
            ok = isinstance(v, bool) if kind == "bool" else (
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 10)
            if not ok:
                raise ValueError(f"{key!r} holds {v!r}, expected {'true/false' if kind == 'bool' else '0..10'}")
        return [bool(v) if kind == "bool" else float(v) for v in values]

    return parse


# ------------------------------------------------------------------------------------------------ prompts

SYSTEM = ("You analyse the reasoning traces of a language model, sentence by sentence. "
          "Answer with one JSON object and nothing else.")
MAX_SENTENCE_CHARS = 300


def _numbered(sentences: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {' '.join(s.split())[:MAX_SENTENCE_CHARS]}" for i, s in enumerate(sentences))


def _messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _category(label: Label) -> str:
    return f"{label.title}: {label.description}"


@dataclass(frozen=True)
class Ask:
    """One request: chat messages and the parser that validates the reply (raises ValueError when invalid)."""

    messages: list
    parse: Callable[[str], Any]


def label_ask(sentences: Sequence[str]) -> Ask:
    return Ask(_messages(
        "These sentences from reasoning traces share one hidden feature; some activate it most strongly, the "
        "others are random sentences that have it.\n\n" + _numbered(sentences) + "\n\nName the reasoning "
        "behavior they share. Reply as JSON: {\"title\": a title of at most 6 words, \"description\": 1-3 "
        "sentences saying its function in the reasoning, what it includes and what it excludes}."), parse_label)


def membership_ask(label: Label, sentences: Sequence[str]) -> Ask:
    return Ask(_messages(
        f"Category: {_category(label)}\n\nSentences:\n{_numbered(sentences)}\n\nFor each sentence, in order, "
        f"decide whether it belongs to the category. Reply as JSON: {{\"decisions\": a list of exactly "
        f"{len(sentences)} true/false values}}."), parse_list("decisions", len(sentences), "bool"))


def completeness_ask(label: Label, sentences: Sequence[str]) -> Ask:
    return Ask(_messages(
        f"Category: {_category(label)}\n\nSentences:\n{_numbered(sentences)}\n\nFor each sentence, in order, rate "
        f"from 0 (not at all) to 10 (perfectly) how well the category describes it. Reply as JSON: "
        f"{{\"scores\": a list of exactly {len(sentences)} integers}}."), parse_list("scores", len(sentences), "score"))


def independence_ask(label: Label, others: Sequence[Label]) -> Ask:
    listed = "\n".join(f"{i + 1}. {_category(o)}" for i, o in enumerate(others))
    return Ask(_messages(
        f"Category A: {_category(label)}\n\nOther categories:\n{listed}\n\nFor each other category, in order, "
        f"decide whether it names a reasoning behavior distinct from A (true) or one that overlaps or duplicates A "
        f"(false). Reply as JSON: {{\"distinct\": a list of exactly {len(others)} true/false values}}."),
        parse_list("distinct", len(others), "bool"))


# ------------------------------------------------------------------------------------------------ LLM judges


class RetryableError(Exception):
    """A call that may succeed if repeated (timeout, connection, 429, 5xx); `retry_after` in seconds if known."""

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class CallFailed(Exception):
    """A call that will not succeed if repeated (e.g. HTTP 400): counted as a failure at once."""


def title_key(title: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", title.lower()))


class LLMJudge:
    """The transport shared by LLM backends: cache, validation, retries with backoff, concurrency, counters.

    Subclasses implement `_complete(messages, attempt) -> reply text`, raising RetryableError or CallFailed
    (or UserError for a mistake no retry fixes, such as a rejected API key).
    """

    is_llm = True
    backend = "llm"

    def __init__(self, model: str, *, cache_dir: str | Path | None = None, n_repeats: int = 1,
                 max_retries: int = 4, max_concurrency: int = 8, backoff_s: float = 0.5, backoff_cap_s: float = 30.0,
                 retry_after_cap_s: float = 60.0, seed: int = 0, sleep: Callable[[float], None] = time.sleep):
        self.model, self.n_repeats, self.seed = model, n_repeats, seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_retries, self.max_concurrency = max_retries, max_concurrency
        self.backoff_s, self.backoff_cap_s, self.retry_after_cap_s = backoff_s, backoff_cap_s, retry_after_cap_s
        self._sleep = sleep
        self._lock = threading.Lock()
        self.counters = Counter({"calls": 0, "cache_hits": 0, "retries": 0, "failures": 0, "parse_errors": 0})
        self.last_errors: list[str] = []  # a few recent failure reasons, for the report

    # -- counters and cache
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)

    def cache_key(self, messages: list) -> str:
        blob = json.dumps({"backend": self.backend, "model": self.model, "messages": messages,
                           "params": self.params()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def params(self) -> dict:
        """Generation parameters that change replies (part of the cache key)."""
        return {"temperature": 0.0}

    def _cache_path(self, key: str) -> Optional[Path]:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    # -- one request
    def _delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            return min(retry_after, self.retry_after_cap_s)
        return min(self.backoff_cap_s, self.backoff_s * 2 ** attempt)

    def ask(self, ask: Ask) -> Any:
        """The validated reply, or None once every attempt failed (counted in `failures`)."""
        key = self.cache_key(ask.messages)
        path = self._cache_path(key)
        if path is not None and path.exists():
            try:  # replies are re-validated: a cached reply that no longer fits its schema is a miss
                value = ask.parse(json.loads(path.read_text())["reply"])
                self._count("cache_hits")
                return value
            except (ValueError, KeyError):
                pass
        delay, error = 0.0, "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                self._sleep(delay)
            self._count("calls")
            try:
                raw = self._complete(ask.messages, attempt)
                value = ask.parse(raw)
            except RetryableError as exc:
                delay, error = self._delay(attempt, exc.retry_after), str(exc)
                continue
            except CallFailed as exc:
                error = str(exc)
                break
            except ValueError as exc:  # the reply did not validate: ask again
                self._count("parse_errors")
                delay, error = self._delay(attempt), f"invalid reply: {exc}"
                continue
            if path is not None:
                atomic_write_json(path, {"model": self.model, "messages": ask.messages, "reply": raw})
            return value
        self._count("failures")
        with self._lock:
            self.last_errors = (self.last_errors + [error[:300]])[-5:]
        return None

    def ask_many(self, asks: Sequence[Ask]) -> list[Any]:
        """`ask` over many requests, at most `max_concurrency` in flight; results in input order."""
        if len(asks) <= 1 or self.max_concurrency <= 1:
            return [self.ask(a) for a in asks]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(self.ask, asks))

    def _complete(self, messages: list, attempt: int) -> str:
        raise NotImplementedError

    # -- labelling
    def label(self, latents: Sequence["LatentMembers"]) -> list[Label]:
        """`n_repeats` labels per latent; the most common title wins (ties: the earliest), with its description.

        Repeat r > 0 shows the same member sentences in a seeded shuffled order, so repeats are distinct
        requests (and distinct cache entries) even at temperature 0. A latent whose repeats all failed gets its
        offline label, marked `offline-fallback`.
        """
        live = [m for m in latents if m.sentences]
        asks = []
        for m in live:
            for r in range(self.n_repeats):
                order = np.arange(len(m.sentences))
                if r:
                    order = np.random.default_rng([self.seed, m.latent, r]).permutation(order)
                asks.append(label_ask([m.sentences[i] for i in order]))
        replies = self.ask_many(asks)
        fallback = {lab.latent: lab for lab in OfflineLabeller().label(latents)}
        out = {m.latent: empty_label(m.latent) for m in latents}
        for j, m in enumerate(live):
            valid = [x for x in replies[j * self.n_repeats:(j + 1) * self.n_repeats] if x is not None]
            n_failed = self.n_repeats - len(valid)
            if not valid:
                fb = fallback[m.latent]
                out[m.latent] = Label(m.latent, fb.title, fb.description, fb.keywords, "offline-fallback", [], n_failed)
                continue
            keys = [title_key(x["title"]) for x in valid]
            best = max(Counter(keys).items(), key=lambda kv: (kv[1], -keys.index(kv[0])))[0]
            chosen = valid[keys.index(best)]
            out[m.latent] = Label(m.latent, chosen["title"], chosen["description"], fallback[m.latent].keywords,
                                  "llm", [x["title"] for x in valid], n_failed)
        return [out[m.latent] for m in latents]


class OpenAIJudge(LLMJudge):
    """Any OpenAI-compatible chat endpoint. Asks for `response_format={"type": "json_object"}`; if the server
    rejects that with HTTP 400 it switches to prompt-only JSON for the rest of the run (the prompts ask for JSON)."""

    backend = "openai"

    def __init__(self, model: str, *, base_url: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, **kwargs: Any):
        super().__init__(model, **kwargs)
        import openai

        key = os.environ.get(api_key_env)
        if not key:
            raise UserError(f"judge.backend=openai reads its API key from ${api_key_env}, which is not set: export it "
                            f"(any value, e.g. EMPTY, for a local server without auth) or set judge.api_key_env")
        self.base_url, self.api_key_env = base_url, api_key_env
        # the client's own retries are off: ours count, back off and honour Retry-After in one place
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0)
        self.json_mode = True

    def _create(self, messages: list) -> Any:
        kwargs: dict[str, Any] = dict(model=self.model, messages=messages, **self.params())
        if self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        return self.client.chat.completions.create(**kwargs)

    def _complete(self, messages: list, attempt: int) -> str:
        import openai

        where = self.base_url or "api.openai.com"
        try:
            try:
                response = self._create(messages)
            except openai.BadRequestError:
                if not self.json_mode:
                    raise
                self.json_mode = False  # the server does not offer structured output; the prompt asks for JSON
                self._count("calls")
                response = self._create(messages)
        except openai.APITimeoutError as exc:  # before APIConnectionError, its parent
            raise RetryableError(f"timeout: {exc}") from None
        except openai.APIConnectionError as exc:
            raise RetryableError(f"connection: {exc}") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status in (401, 403):
                raise UserError(f"judge endpoint {where} rejected the API key in ${self.api_key_env} (HTTP {status}); "
                                "check the key or judge.api_key_env") from None
            if status == 404:
                raise UserError(f"judge endpoint {where} answered 404 for model {self.model!r}: check judge.model "
                                "and judge.base_url (it usually ends in /v1)") from None
            if status in (408, 409, 429) or status >= 500:
                raise RetryableError(f"HTTP {status}", retry_after=retry_after(exc.response.headers)) from None
            raise CallFailed(f"HTTP {status}: {str(exc)[:200]}") from None
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices else None
        if not isinstance(content, str):
            raise RetryableError("reply without message content")
        return content


def retry_after(headers: Any) -> Optional[float]:
    """Seconds from `retry-after-ms` or `retry-after` (seconds only; an HTTP date is ignored)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers.get(name)) * scale
        except (TypeError, ValueError):
            continue
    return None


class HFJudge(LLMJudge):
    """A local Hugging Face chat model, loaded on first use. Attempt 0 decodes greedily; retries sample (seeded)
    so that a retry after an invalid reply can differ. Generation is serialised: one model, one call at a time."""

    backend = "hf"

    def __init__(self, model: str, *, max_new_tokens: int = 512, device: str = "auto", dtype: str = "auto",
                 **kwargs: Any):
        kwargs.setdefault("backoff_s", 0.0)  # nothing to wait for locally
        super().__init__(model, **kwargs)
        self.max_new_tokens, self.device, self.dtype = max_new_tokens, device, dtype
        self._lm: Any = None
        self._gen_lock = threading.Lock()

    def params(self) -> dict:
        return {"temperature": 0.0, "max_new_tokens": self.max_new_tokens}

    def _load(self) -> Any:
        if self._lm is None:
            from sae_reasoning.models import load_model

            lm = load_model(self.model, dtype=self.dtype, device=self.device, field="judge.model")
            if not getattr(lm.tokenizer, "chat_template", None):
                raise UserError(f"judge.model={self.model!r} has no chat template: use an instruct / chat model")
            self._lm = lm
        return self._lm

    def _prompt(self, tokenizer: Any, messages: list) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # some templates (e.g. Gemma's) refuse a system turn: fold it into the user turn
            merged = [{"role": "user", "content": "\n\n".join(m["content"] for m in messages)}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def _complete(self, messages: list, attempt: int) -> str:
        import torch

        with self._gen_lock:
            lm = self._load()
            tok = lm.tokenizer
            enc = tok(self._prompt(tok, messages), return_tensors="pt", add_special_tokens=False).to(lm.device)
            gen = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id, do_sample=attempt > 0)
            if attempt:
                gen.update(temperature=0.7, top_p=0.95)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(self.seed + attempt)
                out = lm.model.generate(**enc, **gen)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def make_labeller(cfg: Any, cache_dir: str | Path | None = None, seed: int = 0) -> Labeller:
    """The labeller a `JudgeConfig` names; LLM replies are cached under `cache_dir` (None: no cache)."""
    if cfg.backend == "offline":
        return OfflineLabeller()
    common = dict(cache_dir=cache_dir, n_repeats=cfg.n_repeats, max_retries=cfg.max_retries,
                  max_concurrency=cfg.max_concurrency, seed=seed)
    if cfg.backend == "openai":
        return OpenAIJudge(cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                           **common)
    if cfg.backend == "hf":
        return HFJudge(cfg.model, **common)
    raise UserError(f"judge.backend={cfg.backend!r}: choose offline, openai or hf")
