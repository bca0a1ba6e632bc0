"""The eval metrics on hand-computed examples (pure functions, no engine)."""

import pytest

from crv_ray.eval.scoring import (
    answer_clusters,
    maj_at_k,
    majority_index,
    pass_at_1,
    status_counts,
    summarize,
)


def same(a, b):
    return a == b


def row(pid, mode, i, status, predicted=None, tokens=10, **groups):
    return {"problem_id": pid, "mode": mode, "sample_index": i, "status": status, "predicted": predicted,
            "tokens": tokens, "groups": groups}


def test_pass_at_1_is_mean_of_per_problem_shares():
    assert pass_at_1([[True, False, True], [False, False, False]]) == pytest.approx((2 / 3 + 0) / 2)
    assert pass_at_1([[True], [True], [False], [True]]) == 0.75
    assert pass_at_1([[True, True], []]) == 0.5  # a problem without samples is a miss, not left out
    assert pass_at_1([]) == 0.0


def test_clusters_group_equivalent_answers_in_order_of_first_appearance():
    assert answer_clusters(["7", "8", None, "8", "7", "9"], same) == [[0, 4], [1, 3], [5]]
    # Real equivalence, not string equality: 1/2 and 0.5 are one answer; 18 and 18.0 too.
    assert answer_clusters(["\\frac{1}{2}", "0.5", "18", "18.0", "3"]) == [[0, 1], [2, 3], [4]]


def test_majority_vote_ties_go_to_the_answer_seen_first():
    assert majority_index(["7", "8", "8", "7"], same) == 0  # 2 vs 2: "7" came first
    assert majority_index(["8", "7", "7", "8"], same) == 0
    assert majority_index(["x", None, "y", "y"], same) == 2  # the larger cluster wins wherever it starts
    assert majority_index([None, None], same) is None
    assert majority_index([], same) is None


def test_maj_at_k_hand_computed():
    problems = [
        (["18", "17", "18"], [True, False, True]),  # majority 18, correct
        (["5", "6", None], [False, False, False]),  # tie 5/6 -> 5, wrong
        (["4", "3", "3"], [True, False, False]),  # majority 3 (wrong) beats the one correct sample
        ([None, None, None], [False, False, False]),  # nobody answered
    ]
    assert maj_at_k(problems, same) == pytest.approx(1 / 4)


def test_summarize_sampled_rows_hand_computed():
    rows = [
        row("p1", "greedy", 0, "correct", "18", tokens=5, level="1"),
        row("p1", "sampled", 0, "correct", "18", tokens=10, level="1"),
        row("p1", "sampled", 1, "wrong", "17", tokens=20, level="1"),
        row("p1", "sampled", 2, "correct", "18.0", tokens=30, level="1"),
        row("p2", "greedy", 0, "wrong", "5", tokens=7, level="10"),
        row("p2", "sampled", 2, "no_answer", "6", tokens=60, level="10"),  # a guess: does not vote
        row("p2", "sampled", 0, "wrong", "5", tokens=40, level="10"),
        row("p2", "sampled", 1, "error", None, tokens=50, level="10"),
    ]
    s = summarize(rows, ["level"])
    assert s["n_problems"] == 2 and s["n_samples"] == 3 and s["k"] == 3
    assert s["greedy_pass@1"] == 0.5
    assert s["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert s["maj@k"] == 0.5  # p1: {18, 18.0} x2 beats 17; p2: only "5" votes -> wrong
    assert s["mean_response_tokens"] == 35.0  # over the sampled rows: (10+20+30+40+50+60)/6
    assert s["no_answer_rate"] == pytest.approx(1 / 6)
    # Natural order of levels ("1" before "10"), problems per group, pass@1 within the group.
    assert list(s["groups"]["level"]) == ["1", "10"]
    assert s["groups"]["level"]["1"] == {"n": 1, "pass@1": pytest.approx(2 / 3)}
    assert s["groups"]["level"]["10"] == {"n": 1, "pass@1": 0.0}
    assert status_counts(rows) == {"correct": 3, "error": 1, "no_answer": 1, "wrong": 3}


def test_summarize_greedy_only_pass_at_1_is_greedy():
    rows = [row("a", "greedy", 0, "correct", "1", tokens=4, subject="Algebra"),
            row("b", "greedy", 0, "no_answer", None, tokens=8, subject="Geometry"),
            row("c", "greedy", 0, "wrong", "2", tokens=12, subject="Algebra"),
            row("d", "greedy", 0, "correct", "3", tokens=16, subject="Algebra")]
    s = summarize(rows, ["subject"])
    assert s["greedy_pass@1"] == s["pass@1"] == 0.5
    assert s["maj@k"] is None and s["k"] is None and s["n_samples"] == 1
    assert s["mean_response_tokens"] == 10.0 and s["no_answer_rate"] == 0.25
    assert s["groups"] == {"subject": {"Algebra": {"n": 3, "pass@1": pytest.approx(2 / 3)},
                                       "Geometry": {"n": 1, "pass@1": 0.0}}}


def test_summarize_samples_without_greedy_has_no_greedy_score():
    rows = [row("a", "sampled", 0, "correct", "1"), row("a", "sampled", 1, "correct", "1")]
    s = summarize(rows)
    assert s["greedy_pass@1"] is None and s["pass@1"] == 1.0 and s["maj@k"] == 1.0 and s["k"] == 2
    assert s["groups"] == {}
