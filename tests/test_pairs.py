import hashlib

import pytest

from crv_ray.refine.pairs import GAPS, build_pairs, choose_negative, pair_id, select_aligned

ORIG = "original step\n\n\\boxed{4}"
REFINED = "refined step 1\n\nrefined step 2\n\n\\boxed{4}"
NEG = "wrong step\n\n\\boxed{5}"


@pytest.mark.parametrize(
    ("label", "original_correct", "refined", "verified", "expected"),
    [
        ("easy", True, REFINED, True, (REFINED, "refined")),
        ("hard", True, REFINED, True, (REFINED, "refined")),
        ("easy", True, REFINED, False, (None, None)),  # never verified: not aligned, no fallback
        ("hard", True, None, True, (None, None)),
        ("hard", True, "  ", True, (None, None)),
        ("medium", True, None, False, (ORIG, "original")),
        ("medium", True, REFINED, True, (ORIG, "original")),  # medium keeps the original
        ("medium", False, None, False, (None, None)),  # a wrong original is never aligned
        ("medium", False, REFINED, True, (REFINED, "refined")),  # verified repair
        ("easy", False, REFINED, True, (REFINED, "refined")),
        (None, False, REFINED, True, (REFINED, "refined")),
        (None, True, REFINED, True, (None, None)),  # unlabelled correct original: nothing to align
        (None, True, None, False, (None, None)),
    ],
)
def test_select_aligned(label, original_correct, refined, verified, expected):
    assert select_aligned(label, original_correct, refined, verified, ORIG) == expected


def test_select_aligned_medium_needs_the_original():
    with pytest.raises(ValueError, match="original_cot"):
        select_aligned("medium", True, None, False)


def _gaps(**kwargs):
    args = dict(problem_id="p1", prompt="Q", original_cot=ORIG, original_correct=True, label="easy",
                aligned_cot=REFINED, aligned_source="refined", negative_cot=NEG)
    args.update(kwargs)
    return [(p["gap"], p["chosen"], p["rejected"]) for p in build_pairs(**args)]


@pytest.mark.parametrize(
    ("case", "kwargs", "expected"),
    [
        ("easy, verified, negative", {}, [("small", REFINED, ORIG), ("medium", ORIG, NEG), ("large", REFINED, NEG)]),
        ("hard, verified, negative", {"label": "hard"},
         [("small", REFINED, ORIG), ("medium", ORIG, NEG), ("large", REFINED, NEG)]),
        ("no negative", {"negative_cot": None}, [("small", REFINED, ORIG)]),
        ("empty negative", {"negative_cot": " \n"}, [("small", REFINED, ORIG)]),
        ("unverified rewrite", {"aligned_cot": None, "aligned_source": None}, [("medium", ORIG, NEG)]),
        ("medium label: large would repeat medium", {"label": "medium", "aligned_cot": ORIG,
                                                     "aligned_source": "original"}, [("medium", ORIG, NEG)]),
        ("wrong original repaired", {"original_correct": False, "negative_cot": ORIG}, [("large", REFINED, ORIG)]),
        ("wrong original, no repair", {"original_correct": False, "aligned_cot": None, "aligned_source": None,
                                       "negative_cot": ORIG}, []),
        ("wrong original passed as aligned", {"original_correct": False, "aligned_cot": ORIG,
                                              "aligned_source": "original"}, []),
        ("rewrite equals original", {"aligned_cot": ORIG + "\n"}, [("medium", ORIG, NEG)]),
        ("negative equals aligned", {"negative_cot": " " + REFINED}, [("small", REFINED, ORIG), ("medium", ORIG, " " + REFINED)]),
        ("label lost, verified rewrite", {"label": None}, [("medium", ORIG, NEG), ("large", REFINED, NEG)]),
    ],
)
def test_gap_existence(case, kwargs, expected):
    assert _gaps(**kwargs) == expected, case


def test_pair_fields_carry_the_gap_not_a_beta():
    pairs = build_pairs("p1", "Q?", ORIG, True, "hard", REFINED, "refined", NEG)
    assert [p["gap"] for p in pairs] == ["small", "medium", "large"]
    for p in pairs:
        # Beta is resolved from the gap at train time (train.cogpo.gap_betas): a beta sweep needs no new refine.
        assert set(p) == {"pair_id", "problem_id", "prompt", "chosen", "rejected", "gap"}
        assert p["problem_id"] == "p1" and p["prompt"] == "Q?" and p["pair_id"] == pair_id("p1", p["gap"])
        assert p["chosen"].strip() != p["rejected"].strip()


def test_gap_filter():
    pairs = build_pairs("p1", "Q", ORIG, True, "easy", REFINED, "refined", NEG, gaps=("large", "small"))
    assert [p["gap"] for p in pairs] == ["small", "large"]
    # Asked for alone, a medium-labelled problem's large pair is kept (no medium pair to repeat).
    alone = build_pairs("p1", "Q", ORIG, True, "medium", ORIG, "original", NEG, gaps=("large",))
    assert [(p["gap"], p["chosen"], p["rejected"]) for p in alone] == [("large", ORIG, NEG)]


def test_unknown_gap_is_named():
    with pytest.raises(ValueError, match="'huge'"):
        build_pairs("p1", "Q", ORIG, True, "easy", REFINED, "refined", NEG, gaps=("small", "huge"))


def test_pair_ids_stable_and_unique():
    assert pair_id("p1", "small") == pair_id("p1", "small")
    assert len(pair_id("p1", "small")) == 16 and int(pair_id("p1", "small"), 16) >= 0
    ids = {pair_id(p, g) for p in ("p1", "p2", "p1small", "") for g in GAPS}
    assert len(ids) == 12
    # sha1 of "p1\x1fsmall": pinned so ids stay stable across releases.
    assert pair_id("p1", "small") == hashlib.sha1(b"p1\x1fsmall").hexdigest()[:16]


@pytest.mark.parametrize(
    ("candidates", "order", "expected"),
    [
        ([("injected", "i"), ("student_sample", "s1"), ("student_sample", "s2"), ("wrong_original", "w")],
         ("wrong_original", "student_sample", "injected"), ("w", "wrong_original")),
        ([("injected", "i"), ("student_sample", "s1"), ("student_sample", "s2")],
         ("wrong_original", "student_sample", "injected"), ("s1", "student_sample")),
        ([("injected", "i"), ("student_sample", "s1")], ("injected", "student_sample"), ("i", "injected")),
        ([("student_sample", ""), ("student_sample", None), ("injected", "i")],
         ("student_sample", "injected"), ("i", "injected")),
        ([("injected", "i")], ("wrong_original", "student_sample"), (None, None)),
        ([], ("wrong_original",), (None, None)),
    ],
)
def test_choose_negative(candidates, order, expected):
    assert choose_negative(candidates, order) == expected


def test_choose_negative_rejects_unknown_sources():
    with pytest.raises(ValueError, match="'llm'"):
        choose_negative([("injected", "i")], ("llm",))
    with pytest.raises(ValueError, match="'other'"):
        choose_negative([("other", "x")], ("injected",))
