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
- ctr: the predicted probability's histogram (``HIST_BINS`` bins of its logit) per label:
  AUC (of the binned scores, ties counted half), precision, recall and F1 at 0.5 come from it;
- rating: the sums of squared and absolute error over the star range (RMSE, MAE);
- relevance: the squared error over the grade range (RMSE), and per query a count and its
  NDCG@10, MRR and recall@10 (each in [0, 1]; a query with no relevant item counts nothing,
  as ``shared.metrics`` leaves it out).

Sensitivity (one unit). The unit is the training's (``privacy-unit``, grouped by
``client.data.split.unit_keys``: a user's or a record's interactions; a query's judgments,
so a query's NDCG, MRR and recall belong to one unit). Each unit's statistics are summed
over its rows, scaled by a constant that fits one row (one query) into norm C_eval, and the
unit's vector is clipped to C_eval: one unit moves the sum by at most C_eval in L2 norm, a
Gaussian mechanism with noise multiplier σ_eval. The scale depends on the run's task list
only (public), and clipping scales a unit's whole vector: every ratio the metrics take (loss
sum / count, NDCG sum / queries) keeps its numerator and denominator under the same factor,
so clipping re-weights a many-row unit, it does not move its own ratios. Replacing a unit
(N is public: the accounting's neighbours) moves the sum by up to 2·C_eval, which the
replace-one accountant charges (``shared.privacy.accounting``).

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
# middle edge is p = 0.5 (precision / recall). More bins, more noise summed into the AUC.
HIST_BINS = 20
LOGIT_RANGE = 5.0
QUERY_BLOCK_BOUND = 2.0  # the norm of one query's (count, NDCG, MRR, recall), each in [0, 1]

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
# ctr's histogram is one-hot); relevance's per-query block is separate (``_QUERY``).
_HIST = tuple(f"pos{i}" for i in range(HIST_BINS)) + tuple(f"neg{i}" for i in range(HIST_BINS))
_OWN: dict[str, tuple[tuple[str, ...], float]] = {
    "ctr": (("count", "loss", *_HIST), 3.0),
    "rating": (("count", "loss", "sq", "abs"), 4.0),
    "relevance": (("count", "loss", "sq"), 3.0),
}
_QUERY = ("queries", "ndcg", "mrr", "recall")


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
    # One row's (and one query's) statistics fit in norm 1 after this scale, so a single-row
    # unit is never clipped; the scale depends on the task list only, never on the data.
    bound = sum(_OWN[t][1] for t in tasks) + (QUERY_BLOCK_BOUND ** 2 if "relevance" in tasks else 0.0)
    scale = EVAL_CLIP_NORM / math.sqrt(bound)
    units: dict[object, list[Example]] = {}
    for key, members in unit_keys(examples, unit=unit):
        units.setdefault(key, []).extend(members)
    rows = [_clip(_statistics(members, losses, preds, index, position) * scale, EVAL_CLIP_NORM)
            for members in units.values()]
    return np.stack(rows) if rows else np.zeros((0, len(names)))


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
            err = min(abs(float(preds[i]) - e.target) / (RATING_MAX - RATING_MIN), 1.0)
            v[index["rating/sq"]] += err * err
            v[index["rating/abs"]] += err
        else:
            err = min(abs(float(preds[i]) - e.target) / RELEVANCE_MAX, 1.0)
            v[index["relevance/sq"]] += err * err
            queries.setdefault(e.group, []).append(i)
    for rows in queries.values():
        groups = [0] * len(rows)
        targets = _targets(members, rows, position)
        scores = preds[rows]
        ndcg = metrics_lib.ndcg_at_k(groups, targets, scores, k=10)
        if math.isnan(ndcg):  # no relevant item: the query counts nothing (as in shared.metrics)
            continue
        v[index["relevance/queries"]] += 1.0
        v[index["relevance/ndcg"]] += ndcg
        v[index["relevance/mrr"]] += _or_zero(metrics_lib.mrr(groups, targets, scores))
        v[index["relevance/recall"]] += _or_zero(metrics_lib.recall_at_k(groups, targets, scores, k=10))
    return v


def score_bin(probability: float) -> int:
    """The ctr histogram bin of a predicted probability (by its logit; see ``HIST_BINS``)."""
    p = min(max(probability, 1e-7), 1 - 1e-7)
    logit = math.log(p / (1 - p))
    width = 2 * LOGIT_RANGE / HIST_BINS
    return min(max(int(math.floor((logit + LOGIT_RANGE) / width)), 0), HIST_BINS - 1)


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
        pos = np.clip([s[f"ctr/pos{i}"] for i in range(HIST_BINS)], 0.0, None)
        neg = np.clip([s[f"ctr/neg{i}"] for i in range(HIST_BINS)], 0.0, None)
        if pos.sum() > 0 and neg.sum() > 0:
            below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
            out["ctr_auc"] = float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
        half = HIST_BINS // 2  # bins from logit 0 (p = 0.5) up: predicted positive
        tp, fp, fn = pos[half:].sum(), neg[half:].sum(), pos[:half].sum()
        if tp + fp > 0:
            out["ctr_precision"] = float(tp / (tp + fp))
        if tp + fn > 0:
            out["ctr_recall"] = float(tp / (tp + fn))
        if "ctr_precision" in out and "ctr_recall" in out:
            p, r = out["ctr_precision"], out["ctr_recall"]
            out["ctr_f1"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    if "rating" in tasks and counts["rating"] > 0:
        span = RATING_MAX - RATING_MIN
        out["rating_rmse"] = span * math.sqrt(ratio(s["rating/sq"], counts["rating"]))
        out["rating_mae"] = span * ratio(s["rating/abs"], counts["rating"])
    if "relevance" in tasks:
        if counts["relevance"] > 0:
            out["relevance_rmse"] = RELEVANCE_MAX * math.sqrt(ratio(s["relevance/sq"], counts["relevance"]))
        if s["relevance/queries"] > 0:
            out["relevance_ndcg@10"] = ratio(s["relevance/ndcg"], s["relevance/queries"])
            out["relevance_mrr"] = ratio(s["relevance/mrr"], s["relevance/queries"])
            out["relevance_recall@10"] = ratio(s["relevance/recall"], s["relevance/queries"])
    return {k: v for k, v in out.items() if math.isfinite(v)}


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
    """The metrics a merchant releases from its held-out ``examples``: noised, plus
    ``num-examples`` = the held-out unit count (declared public, like the training N). The
    caller accounts the release (``EvalSettings.mechanism``) before it leaves."""
    tasks = config.task_names
    losses, preds = predict(model, examples, tokenizer, config, device=device, feature_cache=feature_cache)
    unit = config.privacy_unit
    sums = noised_sums(contributions(examples, losses, preds, tasks, unit=unit), noise_multiplier, seed=seed)
    return {NUM_EXAMPLES: float(unit_count(examples, unit=unit)), **metrics_from_sums(sums, tasks)}
