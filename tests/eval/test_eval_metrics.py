"""Generation scores: normalisation, exact match, ROUGE-L (characters for Japanese, words otherwise), chrF."""

from __future__ import annotations

import itertools
import random

import pytest

from aift.eval.metrics import (
    chrf,
    exact_match,
    is_japanese,
    lcs_length,
    normalize_text,
    rouge_l,
    score_generations,
    sentence_chrf,
)


def test_normalize_applies_nfkc_and_collapses_whitespace():
    assert normalize_text("  ＡＢＣ　１２３\n\tｶﾀｶﾅ  ") == "ABC 123 カタカナ"


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("東京です。", "東京です。", 1.0),
        (" 東京です。\n", "東京です。", 1.0),
        ("３７７６メートル", "3776メートル", 1.0),  # full-width digits
        ("Four.", "four.", 0.0),  # case is meaningful
        ("東京", "東京です。", 0.0),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def _brute_lcs(a, b) -> int:
    """The longest common subsequence by trying every subsequence of the shorter input."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    for size in range(len(short), 0, -1):
        for combo in itertools.combinations(short, size):
            it = iter(long_)
            if all(ch in it for ch in combo):
                return size
    return 0


def test_lcs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert lcs_length(a, b) == _brute_lcs(a, b), (a, b)


def test_rouge_l_japanese_counts_characters():
    # reference 東京は日本の首都です (10 chars), prediction 東京は首都 (5 chars): LCS 5 -> P 1, R 0.5, F 2/3
    assert is_japanese("東京は日本の首都です")
    assert rouge_l("東京は首都", "東京は日本の首都です") == pytest.approx(2 / 3)
    # spaces do not count as characters
    assert rouge_l("東京 は 首都", "東京は日本の首都です") == pytest.approx(2 / 3)


def test_rouge_l_english_counts_words():
    assert not is_japanese("the cat sat on the mat")
    # LCS "the cat the mat" = 4 words; P 4/5, R 4/6 -> F = 2*0.8*0.667/(1.467)
    p, r = 4 / 5, 4 / 6
    assert rouge_l("the cat ate the mat", "The cat sat on the mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("", "something") == 0.0
    assert rouge_l("", "") == 1.0


def test_chrf_bounds_and_order():
    assert chrf(["東京は日本の首都です。"], ["東京は日本の首都です。"]) == pytest.approx(100.0)
    assert chrf(["abc"], ["xyz"]) == 0.0
    close = sentence_chrf("東京は日本の首都", "東京は日本の首都です。")
    far = sentence_chrf("大阪", "東京は日本の首都です。")
    assert 0 <= far < close < 100
    # NFKC before scoring: full-width Latin equals ASCII
    assert sentence_chrf("Ｔｏｋｙｏ", "Tokyo") == pytest.approx(100.0)


def test_score_generations():
    scores = score_generations(["東京です。", "Five."], ["東京です。", "Four."])
    assert scores["exact_match"] == 0.5
    assert 0 < scores["chrf"] < 100
    assert 0.5 <= scores["rouge_l"] < 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_generations(["a", "b"], ["a"])
