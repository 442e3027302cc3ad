"""Text similarity metrics of the Evals API's `text_similarity` grader, in plain Python.

    fuzzy_match   2 * LCS / (len a + len b) over characters, case kept (rapidfuzz's ratio)
    bleu          sentence BLEU over 1-4-grams, brevity penalty; 2-4-gram precisions add one
                  to matches and total (Lin & Och's BLEU+1), so a short answer is not 0
    gleu          Google-BLEU: matching 1-4-grams / the larger side's count
    rouge_1..5    n-gram F1 over words
    rouge_l       LCS F1 over words

Text is lowercased for all but fuzzy_match; bleu and gleu count punctuation marks as tokens,
the rouge metrics drop them. Equal token sequences score 1.0, texts sharing nothing 0.0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

METRICS = ("fuzzy_match", "bleu", "gleu", *(f"rouge_{n}" for n in range(1, 6)), "rouge_l")
# Similarity compares this much of each text: the LCS metrics cost length squared / 64.
MAX_COMPARED_CHARS = 32 * 1024

#
_WORDS = re.compile(r"\w+")
_TOKENS = re.compile(r"\w+|[^\w\s]")


def similarity(candidate: str, reference: str, *, metric: str) -> float:
    """How alike the two texts are by `metric` (one of METRICS), from 0 to 1."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    a = _tokenize(candidate[:MAX_COMPARED_CHARS], metric=metric)
    b = _tokenize(reference[:MAX_COMPARED_CHARS], metric=metric)
    if a == b:
        return 1.0
    if metric in ("fuzzy_match", "rouge_l"):
        return 2 * _lcs_length(a, b) / (len(a) + len(b))
    if metric == "bleu":
        return _bleu(a, b)
    if metric == "gleu":
        return _gleu(a, b)
    return _f1(_ngrams(a, int(metric[-1])), _ngrams(b, int(metric[-1])))


def _tokenize(text: str, *, metric: str) -> Sequence[Hashable]:
    if metric == "fuzzy_match":
        return text
    pattern = _WORDS if metric.startswith("rouge") else _TOKENS
    return pattern.findall(text.lower())


def _lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Bit-parallel LCS (Allison-Dix): one big-int step per element of `a`."""
    masks: dict[Hashable, int] = {}
    for i, x in enumerate(b):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for x in a:
        u = v & masks.get(x, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def _ngrams(tokens: Sequence[Hashable], n: int) -> Counter[tuple[Hashable, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(a: Counter[Any], b: Counter[Any]) -> float:
    total = a.total() + b.total()
    return 2 * (a & b).total() / total if total else 0.0


def _bleu(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    if not candidate or not reference:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        matches = (_ngrams(candidate, n) & _ngrams(reference, n)).total()
        total = max(len(candidate) - n + 1, 0)
        if n == 1 and matches == 0:
            return 0.0
        smooth = 0 if n == 1 else 1
        log_precision += math.log((matches + smooth) / (total + smooth)) / 4
    shorter = len(candidate) < len(reference)
    brevity = math.exp(1 - len(reference) / len(candidate)) if shorter else 1.0
    return brevity * math.exp(log_precision)


def _gleu(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    a: Counter[Any] = Counter()
    b: Counter[Any] = Counter()
    for n in range(1, 5):
        a += _ngrams(candidate, n)
        b += _ngrams(reference, n)
    most = max(a.total(), b.total())
    return (a & b).total() / most if most else 0.0
