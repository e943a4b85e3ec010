"""shared.metrics against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest

from shared.metrics import (
    BASELINES,
    HIGHER_IS_BETTER,
    NOISE_SCALE_SUFFIX,
    STOPPING_METRICS,
    SUM_NOISE_SD,
    SUM_PREFIX,
    THRESHOLD_KEY,
    auc,
    average_precision,
    baseline_key,
    informative,
    is_noise_scale,
    is_released_sum,
    log_loss,
    mae,
    mrr,
    ndcg_at_k,
    noise_scale_key,
    precision_recall_f1,
    random_order_mrr,
    random_order_ndcg,
    recall_at_k,
    released_sum_key,
    rmse,
    task_metrics,
)

LOG2_3 = math.log2(3)  # 1.5849625
LOG2_5 = math.log2(5)  # 2.3219281

# ----------------------------------------------------------------------------- AUC


def test_auc_with_tied_scores() -> None:
    # positives score {0.8, 0.4, 0.9}, negatives {0.4, 0.2}; 3 * 2 = 6 pairs.
    # 0.8 beats both (2), 0.4 ties 0.4 (0.5) and beats 0.2 (1), 0.9 beats both (2) -> 5.5 / 6.
    # By ranks: 0.2 -> 1, 0.4, 0.4 -> 2.5 each, 0.8 -> 4, 0.9 -> 5; positive rank sum 4 + 2.5 + 5
    # = 11.5; U = 11.5 - 3 * 4 / 2 = 5.5; AUC = 5.5 / 6 = 11/12.
    assert auc([1, 0, 1, 0, 1], [0.8, 0.4, 0.4, 0.2, 0.9]) == pytest.approx(11 / 12)


def test_auc_perfect_inverse_all_tied() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    # Every pair tied: each of the 4 pairs is worth 0.5 -> 0.5.
    assert auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_auc_one_class_is_nan() -> None:
    assert math.isnan(auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(auc(np.zeros(4), np.arange(4.0)))


def test_auc_accepts_numpy_and_bool_labels() -> None:
    assert auc(np.array([False, True]), np.array([0.2, 0.7])) == 1.0


def test_auc_matches_brute_force_pair_count() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, size=n)
        # Few distinct values so ties are common, both within and across classes.
        scores = rng.integers(0, 5, size=n) / 4.0
        pos, neg = scores[labels == 1], scores[labels == 0]
        if pos.size == 0 or neg.size == 0:
            assert math.isnan(auc(labels, scores))
            continue
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert auc(labels, scores) == pytest.approx(wins / (pos.size * neg.size), abs=1e-12)


# ----------------------------------------------------------------------------- log loss


def test_log_loss_three_examples() -> None:
    # -(ln 0.9 + ln(1 - 0.2) + ln 0.5) / 3 = (0.1053605 + 0.2231436 + 0.6931472) / 3 = 0.3405504
    assert log_loss([1, 0, 1], [0.9, 0.2, 0.5]) == pytest.approx(0.3405504, abs=1e-7)


def test_log_loss_clips_certain_mistakes() -> None:
    # p = 0 for a positive is clipped to eps = 1e-7: -ln(1e-7) = 7 ln 10 = 16.1180957.
    assert log_loss([1], [0.0]) == pytest.approx(7 * math.log(10))
    # A certain correct answer costs -ln(1 - 1e-7), about 1e-7.
    assert log_loss([1, 0], [1.0, 0.0]) == pytest.approx(1e-7, rel=1e-3)


# ----------------------------------------------------------------------------- P / R / F1


def test_precision_recall_f1_at_threshold() -> None:
    labels = [1, 1, 0, 0, 1, 0]
    probs = [0.9, 0.4, 0.6, 0.1, 0.5, 0.3]
    # threshold 0.5 (>=): predicted positive at 0, 2, 4 -> TP = 2 (0, 4), FP = 1 (2), FN = 1 (1).
    # P = 2/3, R = 2/3, F1 = 2/3.
    assert precision_recall_f1(labels, probs) == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3}
    )
    # threshold 0.55: predicted positive at 0, 2 -> TP = 1, FP = 1, FN = 2.
    # P = 1/2, R = 1/3, F1 = 2 * (1/2)(1/3) / (1/2 + 1/3) = (1/3) / (5/6) = 0.4.
    assert precision_recall_f1(labels, probs, threshold=0.55) == pytest.approx(
        {"precision": 0.5, "recall": 1 / 3, "f1": 0.4}
    )


def test_precision_recall_f1_undefined_is_zero() -> None:
    # Nothing predicted positive: precision 0/0 -> 0, recall 0/2 = 0, F1 -> 0.
    assert precision_recall_f1([1, 1, 0], [0.1, 0.2, 0.3]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # No actual positives: precision 0/1 = 0, recall 0/0 -> 0.
    assert precision_recall_f1([0, 0], [0.9, 0.1]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


# ----------------------------------------------------------------------------- regression


def test_rmse_and_mae() -> None:
    # errors 1, 0, 2, -1: MSE = (1 + 0 + 4 + 1) / 4 = 1.5 -> RMSE = sqrt(1.5); MAE = 4 / 4 = 1.
    assert rmse([1, 2, 3, 4], [2, 2, 5, 3]) == pytest.approx(math.sqrt(1.5))
    assert mae(np.array([1, 2, 3, 4]), np.array([2, 2, 5, 3])) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- ranking

# Query "a": A1 (grade 3, score 0.2), A2 (2, 0.9), A3 (0, 0.5), A4 (1, 0.1)
#   ranked by score: A2 (2), A3 (0), A1 (3), A4 (1)
# Query "b": B1 (1, 0.7), B2 (0, 0.7), B3 (2, 0.3); B1 and B2 tie, input order keeps B1 first
#   ranked: B1 (1), B2 (0), B3 (2)
# Query "c": all grade 0 -> ideal DCG 0 -> skipped by NDCG.
# Rows are interleaved so grouping, not input position, decides membership.
GROUPS = ["a", "b", "a", "c", "b", "a", "c", "b", "a"]
GRADES = [3, 1, 2, 0, 0, 0, 0, 2, 1]
SCORES = [0.2, 0.7, 0.9, 0.4, 0.7, 0.5, 0.8, 0.3, 0.1]


def test_ndcg_at_k_with_cutoff() -> None:
    # gains 2**g - 1: grade 3 -> 7, 2 -> 3, 1 -> 1, 0 -> 0; discounts 1, 1/log2 3, 1/2, 1/log2 5.
    # k = 2:
    #   a: DCG = 3/1 + 0/log2 3 = 3;  IDCG (3, 2) = 7 + 3/log2 3 = 8.8927893;  NDCG = 0.3373520
    #   b: DCG = 1/1 + 0 = 1;         IDCG (2, 1) = 3 + 1/log2 3 = 3.6309298;  NDCG = 0.2754116
    #   mean = 0.3063818
    # (Had the B1/B2 tie gone the other way, b's DCG would be 1/log2 3 = 0.63, not 1.)
    a2 = 3 / (7 + 3 / LOG2_3)
    b2 = 1 / (3 + 1 / LOG2_3)
    assert ndcg_at_k(GROUPS, GRADES, SCORES, k=2) == pytest.approx((a2 + b2) / 2)
    assert ndcg_at_k(GROUPS, GRADES, SCORES, k=2) == pytest.approx(0.3063818, abs=1e-7)
    # k = 10 (whole list; the cutoff matters: A1's gain of 7 at rank 3 now counts):
    #   a: DCG = 3 + 0 + 7/2 + 1/log2 5 = 6.9306766; IDCG = 7 + 3/log2 3 + 1/2 + 0 = 9.3927893
    #      NDCG = 0.7378720
    #   b: DCG = 1 + 0 + 3/2 = 2.5;  IDCG = 3 + 1/log2 3 + 0 = 3.6309298;  NDCG = 0.6885289
    #   mean = 0.7132005
    a10 = (3 + 7 / 2 + 1 / LOG2_5) / (7 + 3 / LOG2_3 + 1 / 2)
    b10 = 2.5 / (3 + 1 / LOG2_3)
    assert ndcg_at_k(GROUPS, GRADES, SCORES) == pytest.approx((a10 + b10) / 2)
    assert ndcg_at_k(GROUPS, GRADES, SCORES) == pytest.approx(0.7132005, abs=1e-7)


def test_ndcg_perfect_and_all_zero_ideal() -> None:
    assert ndcg_at_k(["q"] * 3, [3, 1, 0], [0.9, 0.5, 0.1], k=2) == pytest.approx(1.0)
    assert math.isnan(ndcg_at_k(["q", "q", "r"], [0, 0, 0], [0.1, 0.2, 0.3]))


def test_ranking_accepts_numpy_and_mixed_hashable_groups() -> None:
    # Same data, groups as a numpy array and as arbitrary hashables (ints, tuples).
    mapping = {"a": 7, "b": ("user", 2), "c": None}
    expected = ndcg_at_k(GROUPS, GRADES, SCORES, k=2)
    assert ndcg_at_k(np.array(GROUPS), np.array(GRADES), np.array(SCORES), k=2) == pytest.approx(expected)
    assert ndcg_at_k([mapping[g] for g in GROUPS], GRADES, SCORES, k=2) == pytest.approx(expected)


def test_mrr() -> None:
    # q1: labels [0, 1, 0], scores [0.9, 0.8, 0.7] -> first relevant at rank 2 -> 1/2
    # q2: labels [1, 0, 0], scores [0.1, 0.5, 0.3] -> ranked 0.5, 0.3, 0.1 -> rank 3 -> 1/3
    # q3: no relevant item -> skipped.   MRR = (1/2 + 1/3) / 2 = 5/12
    groups = ["q1"] * 3 + ["q2"] * 3 + ["q3"] * 2
    labels = [0, 1, 0, 1, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.1, 0.5, 0.3, 0.6, 0.2]
    assert mrr(groups, labels, scores) == pytest.approx(5 / 12)
    # On the graded data with threshold 2: a ranks A2 (2) first -> 1; b ranks B1 (1), B2 (0),
    # B3 (2) -> 1/3; c skipped.  MRR = (1 + 1/3) / 2 = 2/3.
    assert mrr(GROUPS, GRADES, SCORES, relevant_threshold=2) == pytest.approx(2 / 3)
    assert math.isnan(mrr(["q"], [0], [0.5]))


def test_recall_at_k() -> None:
    # q1: labels [1, 0, 1, 1], scores [0.9, 0.8, 0.7, 0.1]: top 2 holds 1 of 3 relevant -> 1/3
    # q2: labels [0, 1], scores [0.2, 0.1]: top 2 is everything -> 1/1; top 1 holds none -> 0
    # q3: no relevant item -> skipped.
    # k = 2: (1/3 + 1) / 2 = 2/3;  k = 1: (1/3 + 0) / 2 = 1/6
    groups = ["q1"] * 4 + ["q2"] * 2 + ["q3"]
    labels = [1, 0, 1, 1, 0, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.1, 0.2, 0.1, 0.5]
    assert recall_at_k(groups, labels, scores, k=2) == pytest.approx(2 / 3)
    assert recall_at_k(groups, labels, scores, k=1) == pytest.approx(1 / 6)


def test_average_precision_admits_a_tie_block_whole() -> None:
    # Highest first: 0.9 (pos) P = 1, adds 1/3; 0.8 (neg); the tie at 0.7 (pos, pos) is one
    # threshold: P = 3/4 there, adds 2/3; 0.1 (neg) adds nothing. AP = (1 + 2 * 3/4) / 3 = 5/6.
    assert average_precision([1, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.7, 0.1]) == pytest.approx(5 / 6)
    # Without ties it is the textbook mean of the precision at each positive: (1 + 2/3 + 3/4) / 3.
    assert average_precision([1, 0, 1, 1, 0], [0.9, 0.8, 0.75, 0.7, 0.1]) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # Input order inside a tie does not matter: a negative tied with a positive costs the same either way.
    assert average_precision([1, 0], [0.5, 0.5]) == average_precision([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(average_precision([0, 0], [0.2, 0.4]))


@pytest.mark.parametrize("labels", [[0, 1], [0, 1, 2], [3, 0, 0, 1, 2], [1, 1, 0], [2, 0, 0, 0, 0, 1, 3]])
def test_random_order_baselines_are_the_mean_over_every_order(labels: list[int]) -> None:
    """The closed forms against brute force: the mean of ndcg_at_k and mrr over all n! orders."""
    n = len(labels)
    orders = [[labels[i] for i in perm] for perm in itertools.permutations(range(n))]
    descending = list(range(n, 0, -1))  # scores that rank the order as given
    for k in (10, 2):
        brute = np.mean([ndcg_at_k([0] * n, order, descending, k=k) for order in orders])
        assert random_order_ndcg(labels, k=k) == pytest.approx(brute, rel=1e-12)
    assert random_order_mrr(labels) == pytest.approx(np.mean([mrr([0] * n, order, descending) for order in orders]),
                                                     rel=1e-12)


def test_random_order_baselines_by_hand_and_undefined() -> None:
    # Grades [1, 0]: the relevant item is first half the time: MRR (1 + 1/2) / 2 = 3/4, and
    # NDCG (1 + 1/log2 3) / 2 (the ideal DCG is 1).
    assert random_order_mrr([1, 0]) == pytest.approx(0.75)
    assert random_order_ndcg([1, 0]) == pytest.approx((1 + 1 / LOG2_3) / 2)
    # One grade only: every order is the ideal one.
    assert random_order_ndcg([2, 2, 2]) == pytest.approx(1.0) and random_order_mrr([2, 2, 2]) == pytest.approx(1.0)
    assert math.isnan(random_order_ndcg([0, 0])) and math.isnan(random_order_mrr([0, 0]))


def test_informative_keeps_groups_with_two_grades() -> None:
    # a: grades {3, 0} kept; b: {2} (one grade, twice) dropped; c: a single judgment dropped.
    assert informative(["a", "b", "a", "b", "c"], [3, 2, 0, 2, 1]).tolist() == [True, False, True, False, False]


# ----------------------------------------------------------------------------- per task


def test_task_metrics_ctr() -> None:
    labels = [1, 1, 0, 0, 1, 0]
    probs = [0.9, 0.4, 0.6, 0.1, 0.5, 0.3]
    out = task_metrics("ctr", targets=labels, preds=probs, groups=[""] * 6)
    assert set(out) == {"ctr_auc", "ctr_ap", "ctr_logloss", "ctr_logloss_baseline", "ctr_precision", "ctr_recall",
                        "ctr_f1", THRESHOLD_KEY}
    # Highest first: 0.9 (+) P 1; 0.6 (-); 0.5 (+) P 2/3; 0.4 (+) P 3/4 -> (1 + 2/3 + 3/4) / 3
    assert out["ctr_ap"] == pytest.approx(29 / 36)
    # Base rate 1/2: the threshold, and the constant's log-loss ln 2.
    assert out[THRESHOLD_KEY] == 0.5
    assert out["ctr_logloss_baseline"] == pytest.approx(math.log(2))
    # positives {0.9, 0.4, 0.5} vs negatives {0.6, 0.1, 0.3}: 0.9 wins 3, 0.4 wins 2, 0.5 wins 2 -> 7/9
    assert out["ctr_auc"] == pytest.approx(7 / 9)
    assert out["ctr_logloss"] == pytest.approx(log_loss(labels, probs))
    assert out["ctr_precision"] == pytest.approx(2 / 3)
    assert out["ctr_recall"] == pytest.approx(2 / 3)
    assert out["ctr_f1"] == pytest.approx(2 / 3)


def test_task_metrics_ctr_thresholds_at_the_base_rate() -> None:
    # Base rate 4/5. At 0.5 every prediction is positive (precision 0.8, recall 1: says nothing);
    # at the base rate 0.9, 0.85 and 0.95 are: all positives, 3 of the 4.
    labels = [1, 1, 1, 1, 0]
    probs = [0.9, 0.85, 0.7, 0.95, 0.75]
    assert precision_recall_f1(labels, probs) == pytest.approx({"precision": 0.8, "recall": 1.0, "f1": 8 / 9})
    out = task_metrics("ctr", targets=labels, preds=probs, groups=[""] * 5)
    assert out[THRESHOLD_KEY] == pytest.approx(0.8)
    assert (out["ctr_precision"], out["ctr_recall"], out["ctr_f1"]) == pytest.approx((1.0, 0.75, 6 / 7))
    assert out["ctr_logloss_baseline"] == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))


def test_task_metrics_ctr_one_class_leaves_auc_out() -> None:
    out = task_metrics("ctr", targets=[0, 0], preds=[0.2, 0.4], groups=["u", "v"])
    assert "ctr_auc" not in out and "ctr_ap" not in out
    assert set(out) == {"ctr_logloss", "ctr_logloss_baseline", "ctr_precision", "ctr_recall", "ctr_f1", THRESHOLD_KEY}


def test_task_metrics_rating() -> None:
    out = task_metrics("rating", targets=[1, 2, 3, 4], preds=[2, 2, 5, 3], groups=["u"] * 4)
    # The constant mean 2.5 misses by 1.5, 0.5, 0.5, 1.5: RMSE sqrt(5/4).
    assert out == pytest.approx({"rating_rmse": math.sqrt(1.5), "rating_mae": 1.0,
                                 "rating_rmse_baseline": math.sqrt(1.25)})


def test_task_metrics_relevance() -> None:
    out = task_metrics("relevance", targets=GRADES, preds=SCORES, groups=GROUPS)
    assert out == pytest.approx(
        {
            "relevance_ndcg@10": 0.7132005,  # worked in test_ndcg_at_k_with_cutoff
            "relevance_mrr": 1.0,  # a: A2 (2) first; b: B1 (1) first; c: no relevant
            # a: 3 relevant, all in top 10; b: 2 relevant, both in top 10 -> 1
            "relevance_recall@10": 1.0,
            "relevance_rmse": rmse(GRADES, SCORES),
            "relevance_rmse_baseline": float(np.std(GRADES)),
            # c (all grade 0) is not informative: a and b only.
            "relevance_ndcg@10_baseline": (random_order_ndcg([3, 2, 0, 1]) + random_order_ndcg([1, 0, 2])) / 2,
            "relevance_mrr_baseline": (random_order_mrr([3, 2, 0, 1]) + random_order_mrr([1, 0, 2])) / 2,
        },
        abs=1e-7,
    )


def test_task_metrics_relevance_ranks_informative_queries_only() -> None:
    # d's two exact matches, ranked any way, would score NDCG = MRR = recall = 1 and pull the
    # means up: it counts for the RMSE (a pointwise error), not for ranking.
    with_d = task_metrics("relevance", targets=[*GRADES, 3, 3], preds=[*SCORES, 0.0, 0.1], groups=[*GROUPS, "d", "d"])
    alone = task_metrics("relevance", targets=GRADES, preds=SCORES, groups=GROUPS)
    for key in ("relevance_ndcg@10", "relevance_mrr", "relevance_recall@10", "relevance_ndcg@10_baseline",
                "relevance_mrr_baseline"):
        assert with_d[key] == alone[key], key
    assert with_d["relevance_rmse"] == pytest.approx(rmse([*GRADES, 3, 3], [*SCORES, 0.0, 0.1]))
    # Nothing informative: no ranking keys at all (not NaN, not 1).
    only_d = task_metrics("relevance", targets=[3, 3], preds=[0.0, 0.1], groups=["d", "d"])
    assert set(only_d) == {"relevance_rmse", "relevance_rmse_baseline"}


def test_task_metrics_empty_and_names() -> None:
    for task in ("ctr", "rating", "relevance"):
        assert task_metrics(task, targets=[], preds=np.array([]), groups=[]) == {}
    produced = set()
    for task, targets in (("ctr", [0, 1]), ("rating", [1, 5]), ("relevance", [0, 3])):
        produced |= set(task_metrics(task, targets=targets, preds=[0.5, 0.7], groups=["q", "q"]))
    # Every key has a direction, but the threshold: a setting, not a metric.
    assert produced == set(HIGHER_IS_BETTER) | {THRESHOLD_KEY}
    assert not HIGHER_IS_BETTER["ctr_logloss"] and HIGHER_IS_BETTER["relevance_ndcg@10"] and HIGHER_IS_BETTER["ctr_ap"]
    # A baseline runs as its metric does; neither it nor the threshold is a metric to stop on.
    for metric in BASELINES:
        assert HIGHER_IS_BETTER[baseline_key(metric)] == HIGHER_IS_BETTER[metric]
        assert metric in STOPPING_METRICS and baseline_key(metric) not in STOPPING_METRICS
    assert THRESHOLD_KEY not in STOPPING_METRICS and THRESHOLD_KEY not in HIGHER_IS_BETTER
    assert STOPPING_METRICS == set(HIGHER_IS_BETTER) - {baseline_key(m) for m in BASELINES}


def test_noise_scales_are_no_metrics() -> None:
    """``<key>_sd`` (a released figure's noise scale) is never a metric, a stopping metric or a
    baseline, and no figure's own name looks like one."""
    figures = set(HIGHER_IS_BETTER) | {THRESHOLD_KEY, "eval-loss"}
    for key in figures:
        sd = noise_scale_key(key)
        assert sd == key + NOISE_SCALE_SUFFIX == key + "_sd"
        assert is_noise_scale(sd) and not is_noise_scale(key)
        assert sd not in HIGHER_IS_BETTER and sd not in STOPPING_METRICS and sd not in BASELINES
    assert not any(is_noise_scale(k) for k in STOPPING_METRICS)


def test_released_sums_are_no_metrics() -> None:
    """A merchant's raw release (``sum:<task>/<statistic>`` and ``sum-noise-sd``) is never a
    metric, a stopping metric, a baseline or a noise scale, and no figure looks like one."""
    from shared.eval_sums import layout  # here only: this module's own tests need no torch

    keys = [released_sum_key(n) for n in layout(("ctr", "rating", "relevance"))] + [SUM_NOISE_SD]
    assert all(k.startswith(SUM_PREFIX) for k in keys[:-1])
    for key in keys:
        assert is_released_sum(key) and not is_noise_scale(key)
        assert key not in HIGHER_IS_BETTER and key not in STOPPING_METRICS and key not in BASELINES
    figures = set(HIGHER_IS_BETTER) | {THRESHOLD_KEY, "eval-loss", "num-examples"}
    assert not any(is_released_sum(k) or is_released_sum(noise_scale_key(k)) for k in figures)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: auc([1, 0, 1], [0.1, 0.2]), r"labels and scores must have the same length; got 3 and 2"),
        (lambda: auc([1, 0], [0.1, float("nan")]), r"scores must be finite; scores\[1\] is nan"),
        (lambda: auc([1, 2], [0.1, 0.2]), r"labels must be 0 or 1; labels\[1\] is 2"),
        (lambda: auc([], []), r"labels and scores are empty"),
        (lambda: auc([[1, 0]], [[0.1, 0.2]]), r"labels must be 1-D; got shape \(1, 2\)"),
        (lambda: auc(["x", "y"], [0.1, 0.2]), r"labels must be numeric"),
        (lambda: log_loss([1], [1.5]), r"probs must lie in \[0, 1\]; probs\[0\] is 1.5"),
        (lambda: log_loss([1], [0.5], eps=0.0), r"eps must lie in \(0, 0.5\); got 0.0"),
        (lambda: precision_recall_f1([1], [0.5], threshold=float("nan")), r"threshold must be finite"),
        (lambda: rmse([1.0, float("inf")], [1.0, 2.0]), r"targets must be finite; targets\[1\] is inf"),
        (lambda: mae([1.0], [1.0, 2.0]), r"targets and preds must have the same length; got 1 and 2"),
        (lambda: ndcg_at_k(["q"], [1], [0.5], k=0), r"k must be an integer >= 1; got 0"),
        (lambda: recall_at_k(["q"], [1], [0.5], k=2.5), r"k must be an integer >= 1; got 2.5"),  # type: ignore[arg-type]
        (lambda: ndcg_at_k(["q", "q"], [1, 0], [0.5]), r"labels and scores must have the same length"),
        (lambda: mrr(["q"], [1, 0], [0.5, 0.1]), r"groups and labels must have the same length; got 1 and 2"),
        (
            lambda: mrr([["q"]], [1], [0.5]),  # type: ignore[list-item]
            r"groups must hold hashable labels; groups\[0\] is \['q'\]",
        ),
        (lambda: ndcg_at_k(["q"], [-1], [0.5]), r"labels must be >= 0 for NDCG"),
        (lambda: task_metrics("clicks", targets=[1], preds=[0.5], groups=["q"]), r"task must be one of"),
        (
            lambda: task_metrics("rating", targets=[1, 2], preds=[1, 2], groups=["q"]),
            r"groups and targets must have the same length; got 1 and 2",
        ),
    ],
)
def test_bad_input_raises_clear_value_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
