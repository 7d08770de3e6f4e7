"""Decontamination: drop training rows whose prompt shares word n-grams with an evaluation prompt.

A prompt's n-grams are the runs of ``n`` consecutive lower-cased words (``\\w+``); a prompt with fewer than ``n``
words is one n-gram of all its words (so an identical short prompt still matches). A training prompt is
contaminated when it shares at least one n-gram with the evaluation prompts and the shared fraction of its own
n-grams is at least ``threshold``:

    overlap(p) = |G_n(p) & G_n(eval)| / |G_n(p)|,   drop p  iff  |G_n(p) & G_n(eval)| >= 1  and  overlap(p) >= threshold

``threshold=0`` is the any-shared-13-gram rule of GPT-3 (Brown et al. 2020, arXiv 2005.14165, appendix C) and
the Llama / OLMo decontamination reports; a higher threshold keeps prompts that only share boilerplate.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of ``n``-word runs of ``text`` (lower-cased ``\\w+`` words); one run of all words if fewer than n."""
    if n < 1:
        raise ValueError(f"data.decontaminate.ngram={n} must be >= 1")
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def overlap_fractions(train_texts: list[str], eval_texts: list[str], n: int) -> list[float]:
    """overlap(p) per training text (0.0 for a text with no words)."""
    reference = set().union(*(word_ngrams(t, n) for t in eval_texts)) if eval_texts else set()
    fractions = []
    for text in train_texts:
        grams = word_ngrams(text, n)
        fractions.append(len(grams & reference) / len(grams) if grams else 0.0)
    return fractions


def contaminated(train_texts: list[str], eval_texts: list[str], n: int, threshold: float = 0.0) -> list[bool]:
    """Per training text: whether it shares an n-gram with ``eval_texts`` and overlap(p) >= ``threshold``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"data.decontaminate.threshold={threshold} must be in [0, 1]")
    return [f > 0.0 and f >= threshold for f in overlap_fractions(train_texts, eval_texts, n)]
