"""Scores for generated answers against references: exact match, character chrF and ROUGE-L.

Japanese has no spaces between words, so ROUGE-L counts characters for Japanese text and words otherwise;
chrF works on characters for every language (sacrebleu's default chrF: character 6-grams, beta 2).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_WHITESPACE = re.compile(r"\s+")
# Hiragana, katakana, CJK ideographs and half-width katakana.
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f]")


def normalize_text(text: str) -> str:
    """NFKC (full-width letters and digits -> ASCII, half-width kana -> full-width), whitespace collapsed."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both strings are equal after `normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def is_japanese(text: str) -> bool:
    """Whether the text contains kana or kanji (then it is scored per character)."""
    return _JAPANESE.search(text) is not None


def rouge_tokens(text: str, japanese: bool) -> list[str]:
    """Characters without spaces for Japanese, lower-cased words otherwise."""
    text = normalize_text(text)
    if japanese:
        return [ch for ch in text if not ch.isspace()]
    return text.lower().split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming over one row)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, japanese: bool | None = None) -> float:
    """ROUGE-L F1 (beta 1) between two strings; the unit (character or word) follows the reference's language.

    Args:
        prediction: The generated answer.
        reference: The expected answer.
        japanese: Force character (True) or word (False) units; by default detected from the reference.
    """
    if japanese is None:
        japanese = is_japanese(reference)
    pred, ref = rouge_tokens(prediction, japanese), rouge_tokens(reference, japanese)
    if not pred or not ref:
        return float(pred == ref)
    common = lcs_length(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level character chrF (0-100) with sacrebleu, after NFKC normalisation."""
    from sacrebleu.metrics import CHRF

    preds = [normalize_text(p) for p in predictions]
    refs = [normalize_text(r) for r in references]
    return float(CHRF().corpus_score(preds, [refs]).score)


def sentence_chrf(prediction: str, reference: str) -> float:
    """Character chrF (0-100) of one answer."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(normalize_text(prediction), [normalize_text(reference)]).score)


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L F1 (0-1), corpus chrF (0-100) over paired answers and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no answers to score")
    n = len(references)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "chrf": chrf(predictions, references),
        "rouge_l": sum(map(rouge_l, predictions, references)) / n,
    }
