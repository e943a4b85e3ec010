"""Evaluation metrics released through a Gaussian mechanism on clipped per-unit sums.

An exact metric on a held-out set the server steers is an oracle, not a statistic (DESIGN.md,
"Privacy model"), so a merchant releases evaluation metrics only as functions of *noised
sums*: each unit of its held-out set contributes one vector of bounded statistics, the
vectors are clipped and summed, and Gaussian noise N(0, σ_eval² C_eval²) is added to every
coordinate. The metrics are computed from the noised sums (post-processing), and the release
is accounted as its own ``SpendEvent`` (release ``"evaluation"``, sample_rate 1, steps 1,
σ_eval, C_eval) in the merchant's privacy state, next to its training spend.

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

Sensitivity (one unit). The unit is the training's (``privacy-unit``, grouped by
``client.data.split.unit_keys``: a user's or a record's interactions; a query's judgments,
so a query's NDCG, MRR and recall belong to one unit). Each unit's statistics are summed
over its rows, scaled by a constant that fits one record (one query) into norm C_eval, and the
unit's vector is clipped to C_eval: one unit moves the sum by at most C_eval in L2 norm, a
Gaussian mechanism with noise multiplier σ_eval. The scale is 1/sqrt of the sum of the task
rows' squared-norm bounds (``_OWN``: ctr 3, a count, a loss and one histogram bin; rating 6;
relevance 5) plus ``QUERY_BLOCK_BOUND``² = 6 for relevance's per-query block: one record may
carry a row of several tasks (an interaction's click and rating). It depends on the run's task
list only (public), and clipping scales a unit's whole vector: every ratio the metrics take
(loss sum / count, NDCG sum / queries) keeps its numerator and denominator under the same
factor, so clipping re-weights a many-row unit, it does not move its own ratios (the
baselines' E[y²] − E[y]² is taken over the clipped, re-weighted sums alike). Replacing a unit
(N is public: the accounting's neighbours) moves the sum by up to 2·C_eval, which the
replace-one accountant charges (``shared.privacy.accounting``).

Noise scales (``noise_scales``). At σ_eval = 10 and a few hundred held-out units the noise can
dominate a figure (a ratio's denominator is a noised count of about units × scale), so each
released figure ``m`` comes with ``m_sd`` (``shared.metrics.noise_scale_key``): the standard
deviation of ``metrics_from_sums(s + n_k)`` over ``NOISE_DRAWS`` fresh draws n_k ~ N(0,
(σ_eval·C_eval)²) per coordinate around the released noised sums s. A parametric bootstrap:
post-processing of s and the public σ_eval·C_eval only (no data, no privacy cost). It is an
approximation: centred on the noised point, not the true one, it gives the spread the noise
alone would give a release whose sums were s (for the ratios, about σ·C_eval·sqrt(1 + r²) /
count); it says nothing of the sampling error of the held-out set itself. A figure undefined
(left out) in more than ``MAX_UNDEFINED_SHARE`` of the draws gets no ``_sd``: the noise then
decides whether it exists at all, and a spread of the draws that happen to define it would
understate that. ``num-examples`` (public, exact) has none.

Default σ_eval = 10: one evaluation costs ε ≈ 0.73 at δ = 1e-5 alone (replace-one; 0.34 for
add/remove); composed with the training spend it adds less (see docs/privacy.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client.data.split import unit_keys
from client.evaluation import predict
from shared import metrics as metrics_lib
from shared.config import ConfigError, RunConfig
from shared.privacy.events import MechanismEvent
from shared.tasks import RATING_MAX, RATING_MIN, RELEVANCE_MAX, Example
from shared.wire import EVAL_LOSS, NUM_EXAMPLES

log = logging.getLogger(__name__)

EVAL_CLIP_NORM = 1.0  # C_eval: the scale is immaterial (metrics are ratios), the noise is σ_eval·C_eval
LOSS_CLIP = 5.0  # per-example loss (a BCE) clipped to [0, LOSS_CLIP]: a prediction's loss rarely exceeds it
# ctr's score histogram: HIST_BINS equal bins of the logit over [-LOGIT_RANGE, LOGIT_RANGE] (the
# ends open), so that probabilities bunched near a small base rate still spread over bins; the
# middle edge is p = 0.5. More bins, more noise summed into the AUC and AP (and a finer threshold).
HIST_BINS = 20
LOGIT_RANGE = 5.0
# The norm bound of one query's block (``_QUERY``: six coordinates, each in [0, 1]).
QUERY_BLOCK_BOUND = math.sqrt(6.0)

# The noise scales' parametric bootstrap (``noise_scales``): how many extra noise draws, and the
# share of them a figure may be undefined in and still get an ``_sd``.
NOISE_DRAWS = 200
MAX_UNDEFINED_SHARE = 0.1

# Node-config (deployment) or run-config (simulation) keys: the merchant's.
EVALUATE = "evaluate"
EVAL_NOISE_MULTIPLIER = "eval-noise-multiplier"
EVAL_MIN_UNITS = "eval-min-units"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """The merchant's evaluation choices: whether to evaluate at all, σ_eval, the smallest held-out set."""

    evaluate: bool
    noise_multiplier: float
    min_units: int

    @classmethod
    def resolve(cls, node_config: Mapping[str, Any], config: RunConfig) -> EvalSettings:
        """The node config's keys when present (deployment: the merchant's own), else the run's."""
        def pick(key: str, default: Any) -> Any:
            return node_config[key] if key in node_config else default

        raw_evaluate = pick(EVALUATE, config.evaluate)
        if isinstance(raw_evaluate, str) and raw_evaluate.lower() in ("true", "false", "1", "0"):
            raw_evaluate = raw_evaluate.lower() in ("true", "1")
        if not isinstance(raw_evaluate, bool | int):
            raise ConfigError(f"node-config key {EVALUATE!r} = {raw_evaluate!r}: expected true or false")
        try:
            sigma = float(pick(EVAL_NOISE_MULTIPLIER, config.eval_noise_multiplier))
            min_units = int(pick(EVAL_MIN_UNITS, config.eval_min_units))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node-config keys {EVAL_NOISE_MULTIPLIER!r} / {EVAL_MIN_UNITS!r}: {exc}") from None
        if not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"{EVAL_NOISE_MULTIPLIER!r} = {sigma!r}: must be a finite number > 0")
        if min_units < 1:
            raise ConfigError(f"{EVAL_MIN_UNITS!r} = {min_units!r}: must be >= 1")
        return cls(evaluate=bool(raw_evaluate), noise_multiplier=sigma, min_units=min_units)

    @property
    def mechanism(self) -> MechanismEvent:
        """The release as an accountant composes it: one Gaussian mechanism on the whole held-out set."""
        return MechanismEvent(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=1,
                              max_grad_norm=EVAL_CLIP_NORM)


# Per-example coordinates of each task and the bound on their squared norm (each in [0, 1];
# ctr's histogram is one-hot: count, loss and one bin); relevance's per-query block is
# separate (``_QUERY``). ``target`` / ``target_sq``: the target over the task's range, squared.
_HIST = tuple(f"pos{i}" for i in range(HIST_BINS)) + tuple(f"neg{i}" for i in range(HIST_BINS))
_OWN: dict[str, tuple[tuple[str, ...], float]] = {
    "ctr": (("count", "loss", *_HIST), 3.0),
    "rating": (("count", "loss", "sq", "abs", "target", "target_sq"), 6.0),
    "relevance": (("count", "loss", "sq", "target", "target_sq"), 5.0),
}
# Per informative query: a count, the model's NDCG@10, MRR and recall@10, and the NDCG@10 and
# MRR a random order of its candidates is expected to score.
_QUERY = ("queries", "ndcg", "mrr", "recall", "ndcg_random", "mrr_random")


def layout(tasks: Sequence[str]) -> list[str]:
    """The released coordinates, ``<task>/<statistic>``, for the run's task list."""
    names = [f"{t}/{c}" for t in tasks for c in _OWN[t][0]]
    if "relevance" in tasks:
        names += [f"relevance/{c}" for c in _QUERY]
    return names


def contributions(examples: Sequence[Example], losses: np.ndarray, preds: np.ndarray, tasks: Sequence[str], *,
                  unit: str) -> np.ndarray:
    """One row per privacy unit (``client.data.split.unit_keys``: a user's or a record's rows, a
    query's judgments), its statistics summed over its rows and clipped to ``EVAL_CLIP_NORM``,
    so that adding or removing one unit moves their sum by at most that."""
    names = layout(tasks)
    index = {n: i for i, n in enumerate(names)}
    position = {id(e): i for i, e in enumerate(examples)}
    scale = unit_scale(tasks)
    units: dict[object, list[Example]] = {}
    for key, members in unit_keys(examples, unit=unit):
        units.setdefault(key, []).extend(members)
    rows = [_clip(_statistics(members, losses, preds, index, position) * scale, EVAL_CLIP_NORM)
            for members in units.values()]
    return np.stack(rows) if rows else np.zeros((0, len(names)))


def unit_scale(tasks: Sequence[str]) -> float:
    """The factor a unit's statistics are scaled by before clipping: one record's rows (one of
    each task at most) and one query's block fit in norm ``EVAL_CLIP_NORM`` after it, so a
    one-record unit is never clipped. The task list's only, never the data's."""
    bound = sum(_OWN[t][1] for t in tasks) + (QUERY_BLOCK_BOUND ** 2 if "relevance" in tasks else 0.0)
    return EVAL_CLIP_NORM / math.sqrt(bound)


def unit_count(examples: Sequence[Example], *, unit: str) -> int:
    """How many privacy units ``examples`` hold (as ``contributions`` groups them)."""
    return len({key for key, _ in unit_keys(examples, unit=unit)})


def _statistics(members: Sequence[Example], losses: np.ndarray, preds: np.ndarray, index: dict[str, int],
                position: dict[int, int]) -> np.ndarray:
    """One unit's unscaled statistics: each row's, plus each of its queries' block."""
    v = np.zeros(len(index))
    queries: dict[str, list[int]] = {}
    for e in members:
        if f"{e.task}/count" not in index:
            continue
        i = position[id(e)]
        v[index[f"{e.task}/count"]] += 1.0
        v[index[f"{e.task}/loss"]] += min(max(float(losses[i]), 0.0), LOSS_CLIP) / LOSS_CLIP
        if e.task == "ctr":
            v[index[f"ctr/{'pos' if e.target >= 0.5 else 'neg'}{score_bin(float(preds[i]))}"]] += 1.0
        elif e.task == "rating":
            span = RATING_MAX - RATING_MIN
            err = min(abs(float(preds[i]) - e.target) / span, 1.0)
            y = min(max((e.target - RATING_MIN) / span, 0.0), 1.0)
            v[index["rating/sq"]] += err * err
            v[index["rating/abs"]] += err
            v[index["rating/target"]] += y
            v[index["rating/target_sq"]] += y * y
        else:
            err = min(abs(float(preds[i]) - e.target) / RELEVANCE_MAX, 1.0)
            y = min(max(e.target / RELEVANCE_MAX, 0.0), 1.0)
            v[index["relevance/sq"]] += err * err
            v[index["relevance/target"]] += y
            v[index["relevance/target_sq"]] += y * y
            queries.setdefault(e.group, []).append(i)
    for rows in queries.values():
        block = query_block(_targets(members, rows, position), preds[rows])
        v[[index[f"relevance/{c}"] for c in _QUERY]] += block
    return v


def query_block(targets: Sequence[float], scores: np.ndarray) -> np.ndarray:
    """One query's ``_QUERY`` statistics (each in [0, 1]): zeros unless its candidates carry two
    distinct grades (``shared.metrics.informative``; such a query always has a relevant item)."""
    if len(set(targets)) < 2:
        return np.zeros(len(_QUERY))
    groups = [0] * len(targets)
    ndcg = metrics_lib.ndcg_at_k(groups, targets, scores, k=10)
    if math.isnan(ndcg):  # no positive grade: unreachable for integer grades, kept for safety
        return np.zeros(len(_QUERY))
    return np.array([
        1.0,
        ndcg,
        _or_zero(metrics_lib.mrr(groups, targets, scores)),
        _or_zero(metrics_lib.recall_at_k(groups, targets, scores, k=10)),
        metrics_lib.random_order_ndcg(targets, k=10),
        _or_zero(metrics_lib.random_order_mrr(targets)),
    ])


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


def _targets(members: Sequence[Example], rows: list[int], position: dict[int, int]) -> list[float]:
    by_position = {position[id(e)]: e.target for e in members}
    return [by_position[i] for i in rows]


def _or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _clip(v: np.ndarray, bound: float = 1.0) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v * (bound / norm) if norm > bound else v


def noised_sums(rows: np.ndarray, noise_multiplier: float, *, seed: int | None = None) -> np.ndarray:
    """Σ rows + N(0, (σ·C_eval)²) per coordinate, the noise from a fresh generator (the OS's
    entropy unless a test passes ``seed``; never torch's global one: see ``client.dp.private_generators``)."""
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    noise = torch.normal(0.0, noise_multiplier * EVAL_CLIP_NORM, size=(rows.shape[1],), generator=generator,
                         dtype=torch.float64)
    return rows.sum(axis=0) + noise.numpy()


def metrics_from_sums(sums: np.ndarray, tasks: Sequence[str]) -> dict[str, float]:
    """The metrics the summary shows, computed from (noised) sums only; keyed as ``shared.metrics``."""
    s = dict(zip(layout(tasks), sums.tolist(), strict=True))
    out: dict[str, float] = {}

    def ratio(num: float, den: float) -> float:
        return min(max(num, 0.0) / max(den, 1e-12), 1.0) if den > 0 else float("nan")

    counts = {t: s[f"{t}/count"] for t in tasks}
    loss_sum = sum(s[f"{t}/loss"] for t in tasks)
    total = sum(counts.values())
    if total > 0:
        out[EVAL_LOSS] = LOSS_CLIP * ratio(loss_sum, total)
    if "ctr" in tasks and counts["ctr"] > 0:
        out["ctr_logloss"] = LOSS_CLIP * ratio(s["ctr/loss"], counts["ctr"])
        out.update(_ctr_from_histogram(np.clip([s[f"ctr/pos{i}"] for i in range(HIST_BINS)], 0.0, None),
                                       np.clip([s[f"ctr/neg{i}"] for i in range(HIST_BINS)], 0.0, None)))
    for task, span in (("rating", RATING_MAX - RATING_MIN), ("relevance", RELEVANCE_MAX)):
        if task not in tasks or counts[task] <= 0:
            continue
        out[f"{task}_rmse"] = span * math.sqrt(ratio(s[f"{task}/sq"], counts[task]))
        if task == "rating":
            out["rating_mae"] = span * ratio(s["rating/abs"], counts["rating"])
        # The constant held-out mean's RMSE: sqrt(E[y²] − E[y]²), the noise may make it negative.
        mean, mean_sq = ratio(s[f"{task}/target"], counts[task]), ratio(s[f"{task}/target_sq"], counts[task])
        out[f"{task}_rmse_baseline"] = span * math.sqrt(max(mean_sq - mean * mean, 0.0))
    if "relevance" in tasks and s["relevance/queries"] > 0:
        queries = s["relevance/queries"]
        out["relevance_ndcg@10"] = ratio(s["relevance/ndcg"], queries)
        out["relevance_ndcg@10_baseline"] = ratio(s["relevance/ndcg_random"], queries)
        out["relevance_mrr"] = ratio(s["relevance/mrr"], queries)
        out["relevance_mrr_baseline"] = ratio(s["relevance/mrr_random"], queries)
        out["relevance_recall@10"] = ratio(s["relevance/recall"], queries)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def noise_scales(sums: np.ndarray, tasks: Sequence[str], noise_multiplier: float, *, draws: int = NOISE_DRAWS,
                 seed: int | None = None) -> dict[str, float]:
    """``<key>_sd`` for every figure ``metrics_from_sums(sums, tasks)`` gives: the standard
    deviation (ddof 1) of that figure over ``draws`` re-noisings ``sums + n_k``, n_k ~ N(0,
    (σ·C_eval)²) per coordinate (see the module docstring: post-processing of the released sums
    and the public σ, an approximation centred on the noised point). A figure undefined in more
    than ``MAX_UNDEFINED_SHARE`` of the draws gets none. The draws come from a fresh generator
    (the OS's entropy unless a test passes ``seed``; never torch's global one, and never the
    release's own noise: ``release`` passes a seed other than the one it noised with)."""
    if draws < 2:
        raise ValueError(f"draws must be >= 2; got {draws!r}")
    point = metrics_from_sums(sums, tasks)
    if not point:
        return {}
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    noise = torch.normal(0.0, noise_multiplier * EVAL_CLIP_NORM, size=(draws, sums.shape[0]), generator=generator,
                         dtype=torch.float64).numpy()
    samples: dict[str, list[float]] = {k: [] for k in point}
    for n in noise:
        for key, value in metrics_from_sums(sums + n, tasks).items():  # undefined figures are left out
            if key in samples:
                samples[key].append(value)
    need = max(2, math.ceil((1.0 - MAX_UNDEFINED_SHARE) * draws))
    return {metrics_lib.noise_scale_key(k): float(np.std(v, ddof=1)) for k, v in samples.items() if len(v) >= need}


def _ctr_from_histogram(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """ctr's histogram metrics from the (noised, clipped at 0) per-label bin counts."""
    out: dict[str, float] = {}
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos > 0 and n_neg > 0:
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
        out["ctr_auc"] = float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))
    if n_pos > 0:
        # Bins from the highest down, each one threshold (its items tie): the precision at the
        # bin's cumulative point times the recall the bin adds.
        tp, admitted = np.cumsum(pos[::-1]), np.cumsum(pos[::-1] + neg[::-1])
        precision = np.divide(tp, admitted, out=np.zeros_like(tp), where=admitted > 0)
        out["ctr_ap"] = float(np.sum(precision * pos[::-1]) / n_pos)
    if n_pos + n_neg <= 0:
        return out
    base_rate = n_pos / (n_pos + n_neg)
    b = min(max(base_rate, 1e-7), 1 - 1e-7)  # as shared.metrics.log_loss clips
    out["ctr_logloss_baseline"] = (base_rate * min(-math.log(b), LOSS_CLIP)
                                   + (1 - base_rate) * min(-math.log1p(-b), LOSS_CLIP))
    edge = threshold_edge(base_rate)  # bins from ``edge`` up: predicted positive
    out["ctr_threshold"] = bin_edge_probability(edge)
    tp_, fp, fn = float(pos[edge:].sum()), float(neg[edge:].sum()), float(pos[:edge].sum())
    # Undefined ratios are 0, as shared.metrics.precision_recall_f1 reports them.
    precision_ = tp_ / (tp_ + fp) if tp_ + fp > 0 else 0.0
    recall = tp_ / (tp_ + fn) if tp_ + fn > 0 else 0.0
    out["ctr_precision"], out["ctr_recall"] = precision_, recall
    out["ctr_f1"] = 2 * precision_ * recall / (precision_ + recall) if precision_ + recall > 0 else 0.0
    return out


def release(
    model: nn.Module,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    config: RunConfig,
    *,
    noise_multiplier: float,
    device: torch.device | None = None,
    seed: int | None = None,
    feature_cache: Path | None = None,
) -> dict[str, float]:
    """The metrics a merchant releases from its held-out ``examples``: noised, each with its
    noise scale ``<key>_sd`` (``noise_scales``: post-processing), plus ``num-examples`` = the
    held-out unit count (declared public, like the training N). The caller accounts the release
    (``EvalSettings.mechanism``) before it leaves."""
    tasks = config.task_names
    losses, preds = predict(model, examples, tokenizer, config, device=device, feature_cache=feature_cache)
    unit = config.privacy_unit
    sums = noised_sums(contributions(examples, losses, preds, tasks, unit=unit), noise_multiplier, seed=seed)
    scales = noise_scales(sums, tasks, noise_multiplier, seed=None if seed is None else seed + 1)
    return {NUM_EXAMPLES: float(unit_count(examples, unit=unit)), **metrics_from_sums(sums, tasks), **scales}
