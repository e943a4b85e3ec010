"""Evaluation metrics for the three task heads, in plain numpy.

Clients compute these on their own held-out data and report only the scalars, so this module
must run anywhere a client runs: numpy only, no sklearn, no torch (``shared.tasks`` imports
torch, so the task names are repeated here rather than imported).

Conventions shared by every function:

* Inputs are 1-D sequences or numpy arrays of equal length; anything else is a ``ValueError``
  naming the argument, as is NaN or infinity anywhere. A silent NaN in a metric would travel
  through federated averaging and only surface rounds later as a NaN curve.
* Empty inputs are a ``ValueError`` for the single metrics (there is no honest value);
  ``task_metrics`` returns ``{}`` instead, because a merchant may simply hold no examples of
  a task.
* A metric that is mathematically undefined for valid input (AUC with one class, a ranking
  metric with no gradable group) returns ``float("nan")``; ``task_metrics`` leaves such keys
  out so that averages across merchants never see them.

Ranking metrics group examples by any hashable label (query or user). Within a group, items are
ordered by score, highest first, and **ties keep their original input order** (a stable sort).
That makes the metrics deterministic, but means a model that outputs constant scores is scored
on the order the data happened to arrive in; AUC, by contrast, gives tied pairs half credit.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

# Metric name -> whether a larger value is better. Early stopping and "best round" selection
# read this instead of guessing from the name. A baseline (``<metric>_baseline``: what a
# model-free predictor scores on the same held-out data, see ``BASELINES``) runs the same way as
# its metric, so a report can compare the two; it is no target (``STOPPING_METRICS``).
HIGHER_IS_BETTER: dict[str, bool] = {
    "ctr_auc": True,
    "ctr_ap": True,
    "ctr_logloss": False,
    "ctr_precision": True,
    "ctr_recall": True,
    "ctr_f1": True,
    "rating_rmse": False,
    "rating_mae": False,
    "relevance_ndcg@10": True,
    "relevance_mrr": True,
    "relevance_recall@10": True,
    "relevance_rmse": False,
}

BASELINE_SUFFIX = "_baseline"
# Metric -> the model-free predictor its ``<metric>_baseline`` scores (the run summary prints it
# beside the metric): the constant held-out base rate (ctr), the constant held-out mean (rating,
# relevance grades), a uniformly random order of each query's candidates (expected value).
BASELINES: dict[str, str] = {
    "ctr_logloss": "constant base rate",
    "rating_rmse": "constant mean",
    "relevance_rmse": "constant mean",
    "relevance_ndcg@10": "random order",
    "relevance_mrr": "random order",
}
# The threshold ctr's precision, recall and F1 are taken at (the held-out base rate): reported
# beside them, but a setting, not a metric: it has no better direction.
THRESHOLD_KEY = "ctr_threshold"


def baseline_key(metric: str) -> str:
    """The key of ``metric``'s baseline: ``<metric>_baseline``."""
    return metric + BASELINE_SUFFIX


HIGHER_IS_BETTER.update({baseline_key(m): HIGHER_IS_BETTER[m] for m in BASELINES})

# What a run may stop early on (or pick a best round by): the metrics proper. A baseline moves
# only with the held-out data (and, released, its noise), the threshold is a setting: stopping on
# either would stop on noise.
STOPPING_METRICS: frozenset[str] = frozenset(k for k in HIGHER_IS_BETTER if not k.endswith(BASELINE_SUFFIX))

# A released metric's noise scale (``client.release.noise_scales``): ``<key>_sd``, the standard
# deviation the evaluation noise alone gives the released figure ``<key>`` (a metric, a baseline,
# the threshold, the loss). It is no metric: never a stopping metric (it is in neither
# ``HIGHER_IS_BETTER`` nor ``STOPPING_METRICS``), never a plot of its own; a report shows it as
# "± sd" beside the figure it belongs to.
NOISE_SCALE_SUFFIX = "_sd"


def noise_scale_key(key: str) -> str:
    """The key of ``key``'s noise scale: ``<key>_sd``."""
    return key + NOISE_SCALE_SUFFIX


def is_noise_scale(key: str) -> bool:
    """Whether ``key`` is a released figure's noise scale (``<key>_sd``), not a figure itself."""
    return key.endswith(NOISE_SCALE_SUFFIX)


# The evaluation release itself (``shared.eval_sums``): a merchant's noised sums, one key
# ``sum:<task>/<statistic>`` per coordinate, and their noise sd σ_eval·C_eval. The server pools
# them and computes the round's metrics from the pooled sums. They are no metrics: never a
# stopping metric, a plot, or a summary line (``is_released_sum``), and never averaged as one.
SUM_PREFIX = "sum:"
SUM_NOISE_SD = "sum-noise-sd"


def released_sum_key(coordinate: str) -> str:
    """The metric key of one released sum coordinate (``<task>/<statistic>``): ``sum:<coordinate>``."""
    return SUM_PREFIX + coordinate


def is_released_sum(key: str) -> bool:
    """Whether ``key`` is part of the evaluation's raw release (a ``sum:`` coordinate or its
    noise sd), not a figure computed from it."""
    return key.startswith(SUM_PREFIX) or key == SUM_NOISE_SD

_TASKS = ("ctr", "rating", "relevance")


# ----------------------------------------------------------------------------- validation


def _as_1d(name: str, values: ArrayLike) -> FloatArray:
    """``values`` as a finite 1-D float array, or a ValueError naming ``name``."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric; could not convert it: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite; {name}[{index}] is {array[index]}")
    return array


def _pair(
    first_name: str, first: ArrayLike, second_name: str, second: ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Validate two aligned, non-empty arrays."""
    a = _as_1d(first_name, first)
    b = _as_1d(second_name, second)
    if a.shape != b.shape:
        raise ValueError(
            f"{first_name} and {second_name} must have the same length; got {a.size} and {b.size}"
        )
    if a.size == 0:
        raise ValueError(f"{first_name} and {second_name} are empty; the metric is undefined")
    return a, b


def _check_binary(name: str, labels: FloatArray) -> None:
    bad = (labels != 0.0) & (labels != 1.0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be 0 or 1; {name}[{index}] is {labels[index]}")


def _check_unit_interval(name: str, values: FloatArray) -> None:
    bad = (values < 0.0) | (values > 1.0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must lie in [0, 1]; {name}[{index}] is {values[index]}")


def _check_k(k: int) -> None:
    # bool is an int subclass; k=True is almost certainly a mistake, not k=1.
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")


def _check_threshold(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")


# ----------------------------------------------------------------------------- classification


def _average_ranks(values: FloatArray) -> FloatArray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # A tie block ending at cumulative rank c with n members spans ranks c-n+1..c; mean c-(n-1)/2.
    block_mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    return np.asarray(block_mean_rank[inverse], dtype=np.float64)


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, via the Mann-Whitney U statistic.

    AUC is the probability that a random positive outscores a random negative, a tie counting
    one half. With average ranks over all examples, U = (sum of positive ranks) - P(P+1)/2,
    and AUC = U / (P * N). This is O(n log n) and exact, unlike trapezoids over thresholds.
    Returns ``nan`` when only one class is present: there are no pairs to compare.
    """
    y, s = _pair("labels", labels, "scores", scores)
    _check_binary("labels", y)
    positives = y == 1.0
    n_pos = int(positives.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_average_ranks(s)[positives].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels: ArrayLike, probs: ArrayLike, *, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, natural log.

    Probabilities are clipped to ``[eps, 1 - eps]`` so that one confident mistake costs
    ``-ln(eps)`` (about 16.1 at the default) instead of infinity, which would make the mean
    useless for comparing rounds. Labels may be soft (any value in [0, 1]).
    """
    if not (0.0 < eps < 0.5):
        raise ValueError(f"eps must lie in (0, 0.5); got {eps!r}")
    y, p = _pair("labels", labels, "probs", probs)
    _check_unit_interval("labels", y)
    _check_unit_interval("probs", p)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def precision_recall_f1(labels: ArrayLike, probs: ArrayLike, *, threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of the rule ``prob >= threshold`` -> positive.

    An undefined ratio (no predicted positives for precision, no actual positives for recall,
    both zero for F1) is reported as 0.0, the usual convention: it keeps the values averageable
    and never rewards a model for predicting nothing.
    """
    _check_threshold("threshold", threshold)
    y, p = _pair("labels", labels, "probs", probs)
    _check_binary("labels", y)
    _check_unit_interval("probs", p)
    predicted = p >= threshold
    actual = y == 1.0
    true_pos = int(np.sum(predicted & actual))
    n_predicted = int(predicted.sum())
    n_actual = int(actual.sum())
    precision = true_pos / n_predicted if n_predicted else 0.0
    recall = true_pos / n_actual if n_actual else 0.0
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall > 0.0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision: the precision at each threshold times the recall it adds, summed.

    Tied scores form one threshold: a tie block is admitted whole, at the precision of the
    block's end (as scikit-learn's ``average_precision_score``), so the value never depends on
    the input order of tied items. That is also what a histogram of binned scores can resolve
    (``client.release``: every bin one threshold), so the two agree on binned scores. Returns
    ``nan`` when there is no positive (no recall to add).
    """
    y, s = _pair("labels", labels, "scores", scores)
    _check_binary("labels", y)
    n_pos = float(y.sum())
    if n_pos == 0:
        return float("nan")
    # Tie blocks from the highest score down: positives and items per block.
    unique, inverse = np.unique(-s, return_inverse=True)
    block_pos = np.bincount(inverse, weights=y, minlength=unique.size)
    block_all = np.bincount(inverse, minlength=unique.size).astype(np.float64)
    precision = np.cumsum(block_pos) / np.cumsum(block_all)
    return float(np.sum(precision * block_pos) / n_pos)


# ----------------------------------------------------------------------------- regression


def rmse(targets: ArrayLike, preds: ArrayLike) -> float:
    """Root mean squared error."""
    t, p = _pair("targets", targets, "preds", preds)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def mae(targets: ArrayLike, preds: ArrayLike) -> float:
    """Mean absolute error."""
    t, p = _pair("targets", targets, "preds", preds)
    return float(np.mean(np.abs(p - t)))


# ----------------------------------------------------------------------------- ranking


def _ranked_groups(
    groups: Sequence[Hashable] | NDArray[Any], labels: ArrayLike, scores: ArrayLike
) -> list[FloatArray]:
    """Each group's labels, ordered by score (highest first, ties in input order)."""
    y, s = _pair("labels", labels, "scores", scores)
    if len(groups) != y.size:
        raise ValueError(f"groups and labels must have the same length; got {len(groups)} and {y.size}")
    # tolist() turns numpy scalars into plain Python values, which hash and compare as expected.
    keys = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    members: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        try:
            members.setdefault(key, []).append(index)
        except TypeError:
            raise ValueError(
                f"groups must hold hashable labels; groups[{index}] is {key!r} ({type(key).__name__})"
            ) from None
    ranked = []
    for indices in members.values():
        idx = np.asarray(indices, dtype=np.intp)
        # Stable sort on the negated score: highest first, equal scores keep input order.
        order = np.argsort(-s[idx], kind="stable")
        ranked.append(y[idx][order])
    return ranked


def _mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def ndcg_at_k(
    groups: Sequence[Hashable] | NDArray[Any], labels: ArrayLike, scores: ArrayLike, *, k: int = 10
) -> float:
    """Mean over groups of NDCG@k, with gain ``2**label - 1`` and discount ``1 / log2(rank + 1)``.

    The exponential gain rewards putting an exact match (grade 3, gain 7) above a substitute
    (grade 2, gain 3) much more than a substitute above a complement (grade 1, gain 1). Groups
    whose ideal DCG is 0 (no item with a positive grade) are skipped: every ordering of them
    is equally good, so they carry no signal. Returns ``nan`` if every group is skipped.
    Labels must be >= 0. Tied scores keep input order (see the module docstring).
    """
    _check_k(k)
    per_group = []
    for ranked in _ranked_groups(groups, labels, scores):
        if (ranked < 0.0).any():
            raise ValueError(f"labels must be >= 0 for NDCG; got {float(ranked.min())}")
        top = min(k, ranked.size)
        discounts = 1.0 / np.log2(np.arange(2, top + 2))
        ideal = np.sort(ranked)[::-1][:top]
        ideal_dcg = float(np.sum((2.0**ideal - 1.0) * discounts))
        if ideal_dcg == 0.0:
            continue
        dcg = float(np.sum((2.0 ** ranked[:top] - 1.0) * discounts))
        per_group.append(dcg / ideal_dcg)
    return _mean_or_nan(per_group)


def mrr(
    groups: Sequence[Hashable] | NDArray[Any],
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    relevant_threshold: float = 1,
) -> float:
    """Mean reciprocal rank of the first item with ``label >= relevant_threshold``.

    Groups with no relevant item are skipped (their reciprocal rank is undefined, not 0: the
    model could not have done better). Returns ``nan`` if every group is skipped.
    """
    _check_threshold("relevant_threshold", relevant_threshold)
    per_group = []
    for ranked in _ranked_groups(groups, labels, scores):
        hits = np.flatnonzero(ranked >= relevant_threshold)
        if hits.size:
            per_group.append(1.0 / (int(hits[0]) + 1))
    return _mean_or_nan(per_group)


def recall_at_k(
    groups: Sequence[Hashable] | NDArray[Any],
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    k: int = 10,
    relevant_threshold: float = 1,
) -> float:
    """Mean over groups of (relevant items in the top k) / (relevant items in the group).

    The denominator is all relevant items, not ``min(k, relevant)``, so a group with more
    relevant items than k cannot reach 1.0; that is the standard definition and keeps values
    comparable with other systems. Groups with no relevant item are skipped; ``nan`` if all are.
    """
    _check_k(k)
    _check_threshold("relevant_threshold", relevant_threshold)
    per_group = []
    for ranked in _ranked_groups(groups, labels, scores):
        relevant = ranked >= relevant_threshold
        n_relevant = int(relevant.sum())
        if n_relevant:
            per_group.append(int(relevant[:k].sum()) / n_relevant)
    return _mean_or_nan(per_group)


def informative(groups: Sequence[Hashable] | NDArray[Any], labels: ArrayLike) -> NDArray[np.bool_]:
    """Which items belong to a group whose items carry at least two distinct labels.

    A group with one grade (all exact matches, all irrelevant) scores NDCG = MRR = recall = 1
    (or nothing) under every ordering: it says nothing about the model and only pulls every
    ranking mean towards 1. The rule of ``benchmarks.utility.informative``; ``task_metrics``
    and ``client.release`` score ranking on these groups only.
    """
    y = _as_1d("labels", labels)
    if len(groups) != y.size:
        raise ValueError(f"groups and labels must have the same length; got {len(groups)} and {y.size}")
    keys = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    grades: dict[Hashable, set[float]] = {}
    for key, label in zip(keys, y.tolist(), strict=True):
        grades.setdefault(key, set()).add(label)
    return np.array([len(grades[key]) > 1 for key in keys], dtype=np.bool_)


def random_order_ndcg(labels: ArrayLike, *, k: int = 10) -> float:
    """One group's expected NDCG@k under a uniformly random order of its items (exact).

    Every item lands on each position with probability 1/n, so E[DCG@k] = Σ_i gain_i ·
    (1/n)·Σ_{pos=1..min(k,n)} 1/log2(pos+1), with ``ndcg_at_k``'s gain ``2**label - 1``; the
    ideal DCG does not depend on the order. ``nan`` when the ideal DCG is 0 (as ``ndcg_at_k``
    skips such a group).
    """
    _check_k(k)
    y = _as_1d("labels", labels)
    if y.size == 0:
        raise ValueError("labels is empty; the metric is undefined")
    if (y < 0.0).any():
        raise ValueError(f"labels must be >= 0 for NDCG; got {float(y.min())}")
    top = min(k, y.size)
    discounts = 1.0 / np.log2(np.arange(2, top + 2))
    ideal_dcg = float(np.sum((2.0 ** np.sort(y)[::-1][:top] - 1.0) * discounts))
    if ideal_dcg == 0.0:
        return float("nan")
    expected_dcg = float(np.sum(2.0**y - 1.0)) * float(discounts.sum()) / y.size
    return expected_dcg / ideal_dcg


def random_order_mrr(labels: ArrayLike, *, relevant_threshold: float = 1) -> float:
    """One group's expected reciprocal rank of its first relevant item under a uniformly random
    order (exact): with r relevant among n, the first relevant item is at position j with
    probability C(n−j, r−1) / C(n, r). ``nan`` when nothing is relevant (as ``mrr`` skips it)."""
    _check_threshold("relevant_threshold", relevant_threshold)
    y = _as_1d("labels", labels)
    n, r = y.size, int(np.sum(y >= relevant_threshold))
    if r == 0:
        return float("nan")
    total = math.comb(n, r)
    return float(sum(math.comb(n - j, r - 1) / total / j for j in range(1, n - r + 2)))


def _random_order_mean(groups: Sequence[Hashable] | NDArray[Any], labels: FloatArray, metric: str) -> float:
    """The mean over groups of ``random_order_ndcg`` (k = 10) or ``random_order_mrr``; groups
    where it is undefined are skipped, as the metric itself skips them."""
    keys = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    members: dict[Hashable, list[float]] = {}
    for key, label in zip(keys, labels.tolist(), strict=True):
        members.setdefault(key, []).append(label)
    per_group = [random_order_ndcg(v, k=10) if metric == "ndcg" else random_order_mrr(v) for v in members.values()]
    return _mean_or_nan([v for v in per_group if not math.isnan(v)])


# ----------------------------------------------------------------------------- per task


def task_metrics(
    task: str,
    *,
    targets: ArrayLike,
    preds: ArrayLike,
    groups: Sequence[Hashable] | NDArray[Any],
) -> dict[str, float]:
    """The evaluation metrics of one task, keyed ``<task>_<metric>`` as in ``HIGHER_IS_BETTER``,
    with the baselines beside them (``BASELINES``) and ctr's threshold (``THRESHOLD_KEY``).

    ``preds`` are on the task's natural scale (``shared.tasks.predictions``): probabilities for
    ctr, stars in [1, 5] for rating, expected grade in [0, 3] for relevance. ``groups`` must be
    aligned with ``targets`` for every task (a mismatch means a bookkeeping bug upstream), but
    only relevance uses it. Empty input gives ``{}``. Metrics that are undefined on this data
    (ctr_auc and ctr_ap with one class; ranking metrics with no informative query) are left
    out rather than reported as NaN, so averaging over merchants only sees real values.

    The same keys as ``client.release.metrics_from_sums`` releases, computed exactly:

    - ctr: precision, recall and F1 at the held-out base rate (``ctr_threshold``: predict
      positive when the model says more likely than average; at 0.5 a base rate of 0.8 makes
      every prediction positive, recall 1); the log-loss of that constant as the baseline.
    - rating, relevance: the RMSE of the constant held-out mean (the targets' standard deviation).
    - relevance ranking: on ``informative`` queries only, each with its random-order expectation.
    """
    if task not in _TASKS:
        raise ValueError(f"task must be one of {', '.join(_TASKS)}; got {task!r}")
    t = _as_1d("targets", targets)
    p = _as_1d("preds", preds)
    if t.shape != p.shape:
        raise ValueError(f"targets and preds must have the same length; got {t.size} and {p.size}")
    if len(groups) != t.size:
        raise ValueError(f"groups and targets must have the same length; got {len(groups)} and {t.size}")
    if t.size == 0:
        return {}

    if task == "ctr":
        base_rate = float(np.mean(t))
        prf = precision_recall_f1(t, p, threshold=base_rate)
        values = {
            "ctr_auc": auc(t, p),
            "ctr_ap": average_precision(t, p),
            "ctr_logloss": log_loss(t, p),
            "ctr_logloss_baseline": log_loss(t, np.full_like(t, base_rate)),
            "ctr_precision": prf["precision"],
            "ctr_recall": prf["recall"],
            "ctr_f1": prf["f1"],
            THRESHOLD_KEY: base_rate,
        }
    elif task == "rating":
        values = {"rating_rmse": rmse(t, p), "rating_rmse_baseline": float(np.std(t)), "rating_mae": mae(t, p)}
    else:
        values = {"relevance_rmse": rmse(t, p), "relevance_rmse_baseline": float(np.std(t))}
        keep = informative(groups, t)
        if keep.any():
            kept = [g for g, k in zip(groups.tolist() if isinstance(groups, np.ndarray) else groups, keep,
                                      strict=True) if k]
            tk, pk = t[keep], p[keep]
            values |= {
                "relevance_ndcg@10": ndcg_at_k(kept, tk, pk, k=10),
                "relevance_ndcg@10_baseline": _random_order_mean(kept, tk, "ndcg"),
                "relevance_mrr": mrr(kept, tk, pk),
                "relevance_mrr_baseline": _random_order_mean(kept, tk, "mrr"),
                "relevance_recall@10": recall_at_k(kept, tk, pk, k=10),
            }
    return {name: value for name, value in values.items() if not math.isnan(value)}
