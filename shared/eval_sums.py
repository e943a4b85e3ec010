"""The evaluation release's noised sums: their coordinates, the metrics computed from them, and
the metrics' noise scales, which a merchant (``client.release``) and the server both compute.

A merchant releases its evaluation as noised sums of clipped per-unit statistics (how a unit's
row is built, clipped and noised: ``client.release``). The sums themselves are the DP release
and leave as metric keys ``sum:<task>/<statistic>`` (``shared.metrics.released_sum_key``), with
the noise's standard deviation σ_eval·C_eval (``shared.metrics.SUM_NOISE_SD``: public, the
merchant's choice). Every metric is post-processing of sums: the merchant computes its own from
its sums, and the server pools the merchants' sums (``pool``: every merchant of a run shares the
layout, which depends on the run's task list only) and computes the round's metrics from the
pooled sums with the pooled noise sd sqrt(Σ sd_i²). A mean of merchants' metrics would keep the
bias each takes from its own very noisy sums (a sqrt of a noisy variance, a ratio of noisy
counts); one metric of the pooled sums sees the noise against all the merchants' units.

The statistics (every coordinate in [0, 1] before scaling; ``layout`` names them):

- per task: a count and the sum of the per-example loss clipped to [0, ``LOSS_CLIP``];
- ctr: the predicted probability's histogram (``HIST_BINS`` bins of its logit) per label.
  From it: AUC (of the binned scores, ties counted half); average precision (bins from high
  to low, each bin one threshold: a bin's items are admitted together, at the precision of the
  bin's end, as ``shared.metrics.average_precision`` treats tied scores); the held-out base
  rate (positives / all), and from it the log-loss of the constant base-rate predictor (each
  class's loss clipped at ``LOSS_CLIP``, as the model's) and the threshold of precision,
  recall and F1: the base rate snapped to the nearest bin edge in logit space (predict positive
  when the model says more likely than average; at 0.5, a base rate of 0.8 makes every
  prediction positive and recall 1), released as ``ctr_threshold``;
- rating: the sums of squared and absolute error over the star range (RMSE, MAE), and of the
  target and its square, scaled to [0, 1] over the star range: the constant held-out mean's
  RMSE, sqrt(E[y²] − E[y]²);
- relevance: the squared error over the grade range (RMSE), the grade and its square over the
  grade range (the constant mean's RMSE), and per query a count, its NDCG@10, MRR and
  recall@10, and their expectations under a random order of its candidates (exact, from its
  grades alone: ``shared.metrics.random_order_ndcg`` / ``random_order_mrr``), each in [0, 1].
  Only queries whose candidates carry two distinct grades count (``shared.metrics.informative``:
  a one-grade query scores 1 under any order), as ``shared.metrics.task_metrics`` does.

Every metric and baseline is a function of these sums only: the baselines cost no privacy
beyond the release's. Each coordinate a row adds does cost accuracy: the scale that fits one
row into C_eval shrinks with the row's bound, and the same noise then weighs more.

Noised sums are used as they are, never clipped at 0 before a ratio: each coordinate's noise is
independent and zero-mean, so a sum (a histogram's total, a count) and the AUC's bilinear
numerator Σ_i pos_i·(Σ_{j<i} neg_j + neg_i/2) are unbiased, whereas clipping every bin at 0 adds
|noise| mass to every empty bin (E|N(0, σ²)| ≈ 0.8σ) and pulls the AUC towards 0.5. Only a final
ratio is clamped to its range, and only where its denominator is positive (a figure whose
noised denominator is ≤ 0 is left out, or 0 where ``shared.metrics`` reports an undefined
ratio as 0). The non-linear figures (a square root, a ratio) of very noisy sums are still
biased: pooling sums before taking them is what shrinks that.

Noise scales (``noise_scales``). At σ_eval = 10 and a few hundred held-out units the noise can
dominate a figure (a ratio's denominator is a noised count of about units × scale), so each
figure ``m`` comes with ``m_sd`` (``shared.metrics.noise_scale_key``): the standard deviation
of ``metrics_from_sums(s + n_k)`` over ``NOISE_DRAWS`` fresh draws n_k ~ N(0, sd²) per
coordinate around the noised sums s, sd the noise's (one merchant's σ_eval·C_eval, or the pooled
one). A parametric bootstrap: post-processing of s and the public sd only (no data, no privacy
cost). It is an approximation: centred on the noised point, not the true one, it gives the
spread the noise alone would give a release whose sums were s (for the ratios, about
sd·sqrt(1 + r²) / count); it says nothing of the sampling error of the held-out set itself. A
figure undefined (left out) in more than ``MAX_UNDEFINED_SHARE`` of the draws gets no ``_sd``:
the noise then decides whether it exists at all, and a spread of the draws that happen to
define it would understate that. ``num-examples`` (public, exact) has none.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from shared import metrics as metrics_lib
from shared.metrics import SUM_NOISE_SD, released_sum_key
from shared.tasks import RATING_MAX, RATING_MIN, RELEVANCE_MAX, TASKS
from shared.wire import EVAL_LOSS

LOSS_CLIP = 5.0  # per-example loss (a BCE) clipped to [0, LOSS_CLIP]: a prediction's loss rarely exceeds it
# ctr's score histogram: HIST_BINS equal bins of the logit over [-LOGIT_RANGE, LOGIT_RANGE] (the
# ends open), so that probabilities bunched near a small base rate still spread over bins; the
# middle edge is p = 0.5. More bins, more noise summed into the AUC and AP (and a finer threshold).
HIST_BINS = 20
LOGIT_RANGE = 5.0

# The noise scales' parametric bootstrap (``noise_scales``): how many extra noise draws, and the
# share of them a figure may be undefined in and still get an ``_sd``.
NOISE_DRAWS = 200
MAX_UNDEFINED_SHARE = 0.1

# Per-example coordinates of each task and the bound on their squared norm (each in [0, 1];
# ctr's histogram is one-hot: count, loss and one bin); relevance's per-query block is
# separate (``QUERY_STATISTICS``). ``target`` / ``target_sq``: the target over the task's range,
# squared. The bounds are the merchant's clipping scale's (``client.release.unit_scale``); they
# live here beside the names they bound.
HIST = tuple(f"pos{i}" for i in range(HIST_BINS)) + tuple(f"neg{i}" for i in range(HIST_BINS))
TASK_STATISTICS: dict[str, tuple[tuple[str, ...], float]] = {
    "ctr": (("count", "loss", *HIST), 3.0),
    "rating": (("count", "loss", "sq", "abs", "target", "target_sq"), 6.0),
    "relevance": (("count", "loss", "sq", "target", "target_sq"), 5.0),
}
# Per informative query: a count, the model's NDCG@10, MRR and recall@10, and the NDCG@10 and
# MRR a random order of its candidates is expected to score; the block's norm bound.
QUERY_STATISTICS = ("queries", "ndcg", "mrr", "recall", "ndcg_random", "mrr_random")
QUERY_BLOCK_BOUND = math.sqrt(6.0)


def layout(tasks: Sequence[str]) -> list[str]:
    """The released coordinates, ``<task>/<statistic>``, for the run's task list."""
    names = [f"{t}/{c}" for t in tasks for c in TASK_STATISTICS[t][0]]
    if "relevance" in tasks:
        names += [f"relevance/{c}" for c in QUERY_STATISTICS]
    return names


def score_bin(probability: float) -> int:
    """The ctr histogram bin of a predicted probability (by its logit; see ``HIST_BINS``)."""
    p = min(max(probability, 1e-7), 1 - 1e-7)
    logit = math.log(p / (1 - p))
    width = 2 * LOGIT_RANGE / HIST_BINS
    return min(max(int(math.floor((logit + LOGIT_RANGE) / width)), 0), HIST_BINS - 1)


def bin_edge_probability(edge: int) -> float:
    """The probability at the lower edge of histogram bin ``edge`` (1 .. HIST_BINS - 1): a score
    at or above it falls in bin ``edge`` or higher (``score_bin``)."""
    width = 2 * LOGIT_RANGE / HIST_BINS
    return 1.0 / (1.0 + math.exp(-(-LOGIT_RANGE + edge * width)))


def threshold_edge(base_rate: float) -> int:
    """The interior bin edge (1 .. HIST_BINS - 1) nearest ``base_rate`` in logit space: the
    histogram can only split predictions at its edges, and the bins are equal in the logit."""
    p = min(max(base_rate, 1e-7), 1 - 1e-7)
    width = 2 * LOGIT_RANGE / HIST_BINS
    edge = round((math.log(p / (1 - p)) + LOGIT_RANGE) / width)
    return min(max(edge, 1), HIST_BINS - 1)


def _clamp(value: float, low: float = 0.0, high: float = 1.0) -> float:
    return min(max(value, low), high)


# The histogram's figures (AUC, AP, base rate, threshold, P/R/F1) need each class's noised
# total well above the noise summed over its bins (noise_sd·sqrt(HIST_BINS)): at σ_eval = 10 a
# few hundred negative units give a total of ~60 against a noise of ~45, and the AUC then comes
# out clamped at 1 or undefined in half the rounds (the default scenario, measured). Below this
# many noise sds they are left out: the noise, not the model, would decide them.
ESTIMABLE_SDS = 3.0


def metrics_from_sums(sums: np.ndarray, tasks: Sequence[str], noise_sd: float = 0.0) -> dict[str, float]:
    """The metrics the summary shows, computed from (noised) sums only; keyed as ``shared.metrics``.
    The sums are used unclipped and only each final ratio is clamped (module docstring).
    ``noise_sd``: the sums' noise per coordinate (public), which decides whether the ctr
    histogram's figures are estimable at all (``ESTIMABLE_SDS``); 0 for exact sums."""
    s = dict(zip(layout(tasks), sums.tolist(), strict=True))
    out: dict[str, float] = {}

    def ratio(num: float, den: float) -> float:
        # A mean of [0, 1] statistics: the final ratio clamped to [0, 1], undefined unless den > 0.
        return _clamp(num / den) if den > 0 else float("nan")

    counts = {t: s[f"{t}/count"] for t in tasks}
    loss_sum = sum(s[f"{t}/loss"] for t in tasks)
    total = sum(counts.values())
    if total > 0:
        out[EVAL_LOSS] = LOSS_CLIP * ratio(loss_sum, total)
    if "ctr" in tasks and counts["ctr"] > 0:
        out["ctr_logloss"] = LOSS_CLIP * ratio(s["ctr/loss"], counts["ctr"])
        pos = np.array([s[f"ctr/pos{i}"] for i in range(HIST_BINS)])
        neg = np.array([s[f"ctr/neg{i}"] for i in range(HIST_BINS)])
        floor = ESTIMABLE_SDS * noise_sd * math.sqrt(HIST_BINS)
        if min(float(pos.sum()), float(neg.sum())) > floor:
            out.update(_ctr_from_histogram(pos, neg))
    for task, span in (("rating", RATING_MAX - RATING_MIN), ("relevance", RELEVANCE_MAX)):
        if task not in tasks or counts[task] <= 0:
            continue
        # The sqrt of a clamped mean: the mean is unbiased, its sqrt is not (Jensen; pooling helps).
        out[f"{task}_rmse"] = span * math.sqrt(ratio(s[f"{task}/sq"], counts[task]))
        if task == "rating":
            out["rating_mae"] = span * ratio(s["rating/abs"], counts["rating"])
        # The constant held-out mean's RMSE, sqrt(E[y²] − E[y]²) on [0, 1] targets: the variance
        # is the final ratio, (Q·n − T²) / n², clamped to its range [0, 1/4]. Clamping E[y] and
        # E[y²] to [0, 1] first would zero it whenever a small noised count pushes both past 1.
        n = counts[task]
        mean, mean_sq = s[f"{task}/target"] / n, s[f"{task}/target_sq"] / n
        out[f"{task}_rmse_baseline"] = span * math.sqrt(_clamp(mean_sq - mean * mean, 0.0, 0.25))
    if "relevance" in tasks and s["relevance/queries"] > 0:
        queries = s["relevance/queries"]
        out["relevance_ndcg@10"] = ratio(s["relevance/ndcg"], queries)
        out["relevance_ndcg@10_baseline"] = ratio(s["relevance/ndcg_random"], queries)
        out["relevance_mrr"] = ratio(s["relevance/mrr"], queries)
        out["relevance_mrr_baseline"] = ratio(s["relevance/mrr_random"], queries)
        out["relevance_recall@10"] = ratio(s["relevance/recall"], queries)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _ctr_from_histogram(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """ctr's histogram metrics from the (noised, unclipped) per-label bin counts: every sum and
    the AUC's bilinear numerator are unbiased; each final ratio is clamped to [0, 1]."""
    out: dict[str, float] = {}
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos > 0 and n_neg > 0:
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
        out["ctr_auc"] = _clamp(float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg)))
    if n_pos > 0:
        # Bins from the highest down, each one threshold (its items tie): the precision at the
        # bin's cumulative point times the recall the bin adds. Each precision is a ratio of its
        # own, clamped to [0, 1] where its noised denominator is positive (0 elsewhere, as an
        # undefined precision is); a noised bin may subtract recall, the sum is clamped at the end.
        tp, admitted = np.cumsum(pos[::-1]), np.cumsum(pos[::-1] + neg[::-1])
        precision = np.clip(np.divide(tp, admitted, out=np.zeros_like(tp), where=admitted > 0), 0.0, 1.0)
        out["ctr_ap"] = _clamp(float(np.sum(precision * pos[::-1]) / n_pos))
    if n_pos + n_neg <= 0:
        return out
    base_rate = _clamp(n_pos / (n_pos + n_neg))
    b = min(max(base_rate, 1e-7), 1 - 1e-7)  # as shared.metrics.log_loss clips
    out["ctr_logloss_baseline"] = (base_rate * min(-math.log(b), LOSS_CLIP)
                                   + (1 - base_rate) * min(-math.log1p(-b), LOSS_CLIP))
    edge = threshold_edge(base_rate)  # bins from ``edge`` up: predicted positive
    out["ctr_threshold"] = bin_edge_probability(edge)
    tp_, fp, fn = float(pos[edge:].sum()), float(neg[edge:].sum()), float(pos[:edge].sum())
    # Undefined ratios (a denominator ≤ 0) are 0, as shared.metrics.precision_recall_f1 reports them.
    precision_ = _clamp(tp_ / (tp_ + fp)) if tp_ + fp > 0 else 0.0
    recall = _clamp(tp_ / (tp_ + fn)) if tp_ + fn > 0 else 0.0
    out["ctr_precision"], out["ctr_recall"] = precision_, recall
    out["ctr_f1"] = 2 * precision_ * recall / (precision_ + recall) if precision_ + recall > 0 else 0.0
    return out


def noise_scales(sums: np.ndarray, tasks: Sequence[str], noise_sd: float, *, draws: int = NOISE_DRAWS,
                 seed: int | None = None) -> dict[str, float]:
    """``<key>_sd`` for every figure ``metrics_from_sums(sums, tasks)`` gives: the standard
    deviation (ddof 1) of that figure over ``draws`` re-noisings ``sums + n_k``, n_k ~ N(0,
    noise_sd²) per coordinate (see the module docstring: post-processing of the noised sums and
    the public sd, an approximation centred on the noised point). A figure undefined in more
    than ``MAX_UNDEFINED_SHARE`` of the draws gets none. The draws come from a fresh generator
    (the OS's entropy unless a test passes ``seed``; never torch's global one, and never a
    release's own noise: ``client.release.release`` passes a seed other than the one it noised with)."""
    if draws < 2:
        raise ValueError(f"draws must be >= 2; got {draws!r}")
    point = metrics_from_sums(sums, tasks, noise_sd)
    if not point:
        return {}
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    noise = torch.normal(0.0, noise_sd, size=(draws, sums.shape[0]), generator=generator,
                         dtype=torch.float64).numpy()
    samples: dict[str, list[float]] = {k: [] for k in point}
    for n in noise:
        for key, value in metrics_from_sums(sums + n, tasks, noise_sd).items():  # undefined figures are left out
            if key in samples:
                samples[key].append(value)
    need = max(2, math.ceil((1.0 - MAX_UNDEFINED_SHARE) * draws))
    return {metrics_lib.noise_scale_key(k): float(np.std(v, ddof=1)) for k, v in samples.items() if len(v) >= need}


# ----------------------------------------------------------------------------- on the wire


def as_metrics(sums: np.ndarray, tasks: Sequence[str], noise_sd: float) -> dict[str, float]:
    """The noised sums as metric keys, ``sum:<task>/<statistic>``, and their noise sd
    (``SUM_NOISE_SD``): what a merchant sends beside the metrics it computed from them."""
    out = {released_sum_key(name): float(v) for name, v in zip(layout(tasks), sums.tolist(), strict=True)}
    out[SUM_NOISE_SD] = float(noise_sd)
    return out


def from_metrics(metrics: Mapping[str, float]) -> tuple[np.ndarray, tuple[str, ...], float] | None:
    """(sums, tasks, noise sd) from one merchant's released metrics, or None when it sent no
    complete release: no sums (a non-private merchant's exact metrics; an older merchant), no
    or a negative sd, or a key set that is no task list's layout. The tasks are read from the
    keys (each task's ``count``), in ``shared.tasks.TASKS`` order, and the key set must be
    exactly their layout."""
    sd = metrics.get(SUM_NOISE_SD)
    if sd is None or not (math.isfinite(sd) and sd >= 0):
        return None
    tasks = tuple(t for t in TASKS if released_sum_key(f"{t}/count") in metrics)
    names = layout(tasks)
    keys = {k for k in metrics if metrics_lib.is_released_sum(k) and k != SUM_NOISE_SD}
    if not tasks or keys != {released_sum_key(n) for n in names}:
        return None
    sums = np.array([float(metrics[released_sum_key(n)]) for n in names])
    if not np.isfinite(sums).all():
        return None
    return sums, tasks, float(sd)


def pool(released: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, tuple[str, ...], float] | None:
    """The merchants' noised sums added up, their tasks, and the sum's noise sd sqrt(Σ sd_i²)
    (independent merchants' noise); None unless every merchant sent a complete release of the
    same tasks (``from_metrics``), or none was sent."""
    parts = []
    for metrics in released:
        part = from_metrics(metrics)
        if part is None:
            return None
        parts.append(part)
    if not parts or any(tasks != parts[0][1] for _, tasks, _ in parts):
        return None
    sums = np.sum([s for s, _, _ in parts], axis=0)
    return sums, parts[0][1], math.sqrt(sum(sd ** 2 for _, _, sd in parts))
