"""Metrics: answer normalisation, accuracy by task, BLEU-4 and CIDEr-D against hand-worked numbers."""

from __future__ import annotations

import importlib.util
import math

import pytest

from vledge.metrics import AccuracyByTask, bleu4, caption_tokens, cider_d, exact_match, normalize_answer

# ------------------------------------------------------------------ answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Three", "three"),
        ("  three.  ", "three"),
        ("A  red\n circle.", "a red circle"),
        ('"three"', "three"),
        ("'Blue.'", "blue"),
        ('"three".', "three"),
        ("“left”", "left"),
        ("3.5", "3.5"),
        ("", ""),
        ('"', '"'),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Two.", "two")
    assert exact_match(" The  red one ", "the red one.")
    assert not exact_match("two", "three")
    assert not exact_match("red circle", "red")


def test_accuracy_by_task():
    acc = AccuracyByTask()
    acc.add("count", True)
    acc.add("count", False)
    acc.add("color", True)
    assert acc.add_answer("color", "Red.", "red") is True
    assert acc.add_answer("shape", "circle", "square") is False
    assert len(acc) == 5
    assert acc.accuracy("count") == 0.5
    assert acc.accuracy("color") == 1.0
    assert acc.accuracy() == pytest.approx(3 / 5)
    assert acc.accuracy("unseen") == 0.0
    assert acc.to_dict() == {
        "accuracy": pytest.approx(0.6),
        "correct": 3,
        "count": 5,
        "tasks": {
            "color": {"accuracy": 1.0, "correct": 2, "count": 2},
            "count": {"accuracy": 0.5, "correct": 1, "count": 2},
            "shape": {"accuracy": 0.0, "correct": 0, "count": 1},
        },
    }
    assert AccuracyByTask().to_dict() == {"accuracy": 0.0, "correct": 0, "count": 0, "tasks": {}}


# ------------------------------------------------------------------ tokenizer


def test_caption_tokens_like_ptb():
    assert caption_tokens("A dog's ball, on the T-shirt.") == ["a", "dog", "'s", "ball", "on", "the", "t-shirt"]
    assert caption_tokens("It DOESN'T fit (3.5 m)!") == ["it", "does", "n't", "fit", "3.5", "m"]
    assert caption_tokens('"Quoted"   words...') == ["quoted", "words"]


# ------------------------------------------------------------------ BLEU-4


def test_bleu4_identical_corpus_is_one():
    sentences = ["a red circle above a blue square", "two dogs play in the park", "the cat sat on the mat"]
    assert bleu4(sentences, [[s] for s in sentences]) == pytest.approx(1.0)


def test_bleu4_ignores_case_and_punctuation():
    assert bleu4(["The cat sat on the mat."], [["the cat sat on the mat"]]) == pytest.approx(1.0)


def test_bleu4_zero_without_fourgram_overlap():
    # Unigrams to trigrams overlap, but no 4-gram does.
    assert bleu4(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0
    assert bleu4(["completely different words here"], [["a red circle above a square"]]) == 0.0


def test_bleu4_hand_worked_corpus():
    predictions = ["the cat sat on the mat", "a dog runs in the park"]
    references = [["the cat is on the mat"], ["a dog runs in a park"]]
    # Sentence 1 (6 words each):
    #   1-grams: the x2 (ref has 2), cat, on, mat match; sat does not        -> 5/6
    #   2-grams: the cat, on the, the mat match; cat sat, sat on do not     -> 3/5
    #   3-grams: on the mat matches; the cat sat, cat sat on, sat on the not -> 1/4
    #   4-grams: none of the 3 match                                        -> 0/3
    # Sentence 2 (6 words each):
    #   1-grams: a (ref has 2, pred 1), dog, runs, in, park; the does not   -> 5/6
    #   2-grams: a dog, dog runs, runs in; in the, the park not             -> 3/5
    #   3-grams: a dog runs, dog runs in; runs in the, in the park not      -> 2/4
    #   4-grams: a dog runs in; dog runs in the, runs in the park not       -> 1/3
    # Corpus precisions: p1 = 10/12, p2 = 6/10, p3 = 3/8, p4 = 1/6.
    # Product = (10/12)(6/10)(3/8)(1/6) = 1/2 * 3/8 * 1/6 = 1/32.
    # Brevity penalty: prediction length 12 = reference length 12 -> 1.
    # BLEU-4 = (1/32) ** (1/4) = 2 ** (-5/4) = 0.42045...
    assert bleu4(predictions, references) == pytest.approx(2 ** (-5 / 4))


def test_bleu4_brevity_penalty():
    # All n-grams of the 5-word prediction are in the 6-word reference: precisions are all 1,
    # so BLEU-4 is the brevity penalty alone: exp(1 - 6/5) = exp(-0.2) = 0.8187...
    assert bleu4(["the cat sat on the"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(-0.2))
    # A longer prediction is not penalised for length (only by its precisions).
    # 7 words, the extra "today" adds 1 wrong n-gram of each order: p_n = (7-n)/(7-n+1) ... = 6/7, 5/6, 4/5, 3/4.
    expected = (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25
    assert bleu4(["the cat sat on the mat today"], [["the cat sat on the mat"]]) == pytest.approx(expected)


def test_bleu4_closest_reference_length_and_clipping():
    # Lengths 4 and 6 are equally close to 5: the shorter one (4) counts, so no penalty;
    # every n-gram of the prediction occurs in the 6-word reference, so BLEU-4 = 1.
    assert bleu4(["the cat sat on the"], [["the cat sat on", "the cat sat on the mat"]]) == pytest.approx(1.0)
    # The closest reference (6 words) sets the penalty even though a 9-word one exists.
    refs = [["the cat sat on the mat", "the cat sat on the mat in the sun"]]
    assert bleu4(["the cat sat on the"], refs) == pytest.approx(math.exp(-0.2))
    # Clipping: "the the the the" has 4 unigrams but "the" occurs at most twice in one reference.
    assert bleu4(["the the the the"], [["the cat on the mat"]]) == 0.0


def test_bleu4_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        bleu4(["a"], [])
    with pytest.raises(ValueError):
        bleu4([], [])
    with pytest.raises(ValueError):
        bleu4(["a b"], [[]])
    with pytest.raises(ValueError):
        bleu4(["a b"], ["a b"])  # a bare string instead of a list of references


# ------------------------------------------------------------------ CIDEr-D

CORPUS_REFS = [
    ["a red circle above a blue square", "a red circle over a blue square"],
    ["two dogs play in the park", "dogs playing on the grass"],
    ["a cat sleeps on a sofa", "a cat lying on the couch"],
]


def test_cider_d_identical_beats_unrelated():
    identical = cider_d([refs[0] for refs in CORPUS_REFS], CORPUS_REFS)
    unrelated = cider_d(["purple elephants fly", "purple elephants fly", "purple elephants fly"], CORPUS_REFS)
    assert identical > 1.0
    assert unrelated == 0.0


def test_cider_d_hand_worked_example():
    predictions = ["the cat the cat", "a dog"]
    references = [["the cat sat"], ["the dog ran"]]
    # N = 2 images; idf(g) = ln 2 - ln(max(1, df(g))), df over each image's set of reference n-grams.
    # "the" is in both reference sets -> idf 0; every other n-gram (seen once or never) -> idf L = ln 2.
    # Image 1, candidate "the cat the cat" vs reference "the cat sat":
    #   n=1: cand {the: 0, cat: 2L}, ref {the: 0, cat: L, sat: L}
    #        numerator min(2L, L) * L = L^2; norms 2L and sqrt(2) L -> 1 / (2 sqrt 2)
    #   n=2: cand {the cat: 2L, cat the: L}, ref {the cat: L, cat sat: L}
    #        numerator min(2L, L) * L = L^2; norms sqrt(5) L and sqrt(2) L -> 1 / sqrt 10
    #   n=3, 4: no shared n-gram -> 0
    #   length (in bigrams) 3 vs 2 -> penalty exp(-1 / (2 * 6^2)) = exp(-1/72)
    #   score = 10 * exp(-1/72) * (1/(2 sqrt 2) + 1/sqrt 10) / 4                 = 1.6514...
    # Image 2, candidate "a dog" vs "the dog ran":
    #   n=1: cand {a: L (unseen n-grams count as df 1), dog: L}, ref {the: 0, dog: L, ran: L}
    #        numerator L^2; norms sqrt(2) L, sqrt(2) L -> 1/2
    #   n=2: {a dog} vs {the dog, dog ran} -> 0; n=3, 4 -> 0
    #   length 1 vs 2 -> exp(-1/72)
    #   score = 10 * exp(-1/72) * (1/2) / 4                                      = 1.2328...
    # CIDEr-D = mean of the two.
    penalty = math.exp(-1 / 72)
    image1 = 10 * penalty * (1 / (2 * math.sqrt(2)) + 1 / math.sqrt(10)) / 4
    image2 = 10 * penalty * 0.5 / 4
    assert cider_d(predictions, references) == pytest.approx((image1 + image2) / 2)
    assert (image1 + image2) / 2 == pytest.approx(1.44206, abs=1e-5)


def test_cider_d_single_image_scores_zero_like_pycocoevalcap():
    # With one image every reference n-gram has idf ln(1) - ln(1) = 0.
    assert cider_d(["a red circle"], [["a red circle"]]) == 0.0


def test_cider_d_invariant_to_reference_order():
    predictions = ["a red circle above a square", "dogs play in a park", "a cat on a sofa"]
    shuffled = [list(reversed(refs)) for refs in CORPUS_REFS]
    assert cider_d(predictions, CORPUS_REFS) == pytest.approx(cider_d(predictions, shuffled))


def test_cider_d_penalises_length_difference():
    refs = [["a red circle above a blue square"], ["two dogs play in the park"]]
    exact = cider_d(["a red circle above a blue square", "two dogs play in the park"], refs)
    padded = cider_d(["a red circle above a blue square a red circle above", "two dogs play in the park"], refs)
    assert padded < exact


@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None, reason="pycocoevalcap not installed")
def test_matches_pycocoevalcap():  # pragma: no cover - only where the reference implementation exists
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    predictions = ["a red circle above a square", "dogs play in a park", "a cat on a sofa"]
    gts = {i: [" ".join(caption_tokens(r)) for r in refs] for i, refs in enumerate(CORPUS_REFS)}
    res = {i: [" ".join(caption_tokens(p))] for i, p in enumerate(predictions)}
    bleu_scores, _ = Bleu(4).compute_score(gts, res)
    cider_score, _ = Cider().compute_score(gts, res)
    assert bleu4(predictions, CORPUS_REFS) == pytest.approx(bleu_scores[3], abs=1e-6)
    assert cider_d(predictions, CORPUS_REFS) == pytest.approx(cider_score, abs=1e-6)
