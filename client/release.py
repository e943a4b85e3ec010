"""Evaluation metrics released through a Gaussian mechanism on clipped per-unit sums.

An exact metric on a held-out set the server steers is an oracle, not a statistic (DESIGN.md,
"Privacy model"), so a merchant releases evaluation metrics only as functions of *noised
sums*: each unit of its held-out set contributes one vector of bounded statistics, the
vectors are clipped and summed, and Gaussian noise N(0, σ_eval² C_eval²) is added to every
coordinate. The metrics are computed from the noised sums (post-processing), and the release
is accounted as its own ``SpendEvent`` (release ``"evaluation"``, sample_rate 1, steps 1,
σ_eval, C_eval) in the merchant's privacy state, next to its training spend.

What is released (``shared.eval_sums``, which names the coordinates and computes every metric
and its noise scale from sums, here and on the server alike): the noised sums themselves, as
metric keys ``sum:<task>/<statistic>`` with their noise sd σ_eval·C_eval (``sum-noise-sd``,
public) — the DP release proper, which the server pools across merchants — and, as
post-processing, the metrics ``shared.eval_sums.metrics_from_sums`` takes from them, each with
its noise scale ``<key>_sd``. This module builds, clips and noises the per-unit rows.

Sensitivity (one unit). The unit is the training's (``privacy-unit``, grouped by
``client.data.split.unit_keys``: a user's or a record's interactions; a query's judgments,
so a query's NDCG, MRR and recall belong to one unit). Each unit's statistics are summed
over its rows, scaled by a constant that fits one record (one query) into norm C_eval, and the
unit's vector is clipped to C_eval: one unit moves the sum by at most C_eval in L2 norm, a
Gaussian mechanism with noise multiplier σ_eval. The scale is 1/sqrt of the sum of the task
rows' squared-norm bounds (``shared.eval_sums.TASK_STATISTICS``: ctr 3, a count, a loss and one
histogram bin; rating 6; relevance 5) plus ``QUERY_BLOCK_BOUND``² = 6 for relevance's per-query
block: one record may carry a row of several tasks (an interaction's click and rating). It
depends on the run's task list only (public), and clipping scales a unit's whole vector: every
ratio the metrics take (loss sum / count, NDCG sum / queries) keeps its numerator and
denominator under the same factor, so clipping re-weights a many-row unit, it does not move its
own ratios (the baselines' E[y²] − E[y]² is taken over the clipped, re-weighted sums alike). Replacing a unit
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
from client.offsets import Offsets
from shared import eval_sums
from shared import metrics as metrics_lib
from shared.config import ConfigError, RunConfig
from shared.eval_sums import (  # noqa: F401  (re-exported: callers read the release's names here)
    HIST_BINS,
    LOGIT_RANGE,
    LOSS_CLIP,
    MAX_UNDEFINED_SHARE,
    NOISE_DRAWS,
    QUERY_BLOCK_BOUND,
    QUERY_STATISTICS,
    TASK_STATISTICS,
    bin_edge_probability,
    layout,
    metrics_from_sums,
    score_bin,
    threshold_edge,
)
from shared.privacy.events import MechanismEvent
from shared.tasks import RATING_MAX, RATING_MIN, RELEVANCE_MAX, Example
from shared.wire import NUM_EXAMPLES

log = logging.getLogger(__name__)

EVAL_CLIP_NORM = 1.0  # C_eval: the scale is immaterial (metrics are ratios), the noise is σ_eval·C_eval

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
    bound = sum(TASK_STATISTICS[t][1] for t in tasks) + (QUERY_BLOCK_BOUND ** 2 if "relevance" in tasks else 0.0)
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
        v[[index[f"relevance/{c}"] for c in QUERY_STATISTICS]] += block
    return v


def query_block(targets: Sequence[float], scores: np.ndarray) -> np.ndarray:
    """One query's ``QUERY_STATISTICS`` (each in [0, 1]): zeros unless its candidates carry two
    distinct grades (``shared.metrics.informative``; such a query always has a relevant item)."""
    if len(set(targets)) < 2:
        return np.zeros(len(QUERY_STATISTICS))
    groups = [0] * len(targets)
    ndcg = metrics_lib.ndcg_at_k(groups, targets, scores, k=10)
    if math.isnan(ndcg):  # no positive grade: unreachable for integer grades, kept for safety
        return np.zeros(len(QUERY_STATISTICS))
    return np.array([
        1.0,
        ndcg,
        _or_zero(metrics_lib.mrr(groups, targets, scores)),
        _or_zero(metrics_lib.recall_at_k(groups, targets, scores, k=10)),
        metrics_lib.random_order_ndcg(targets, k=10),
        _or_zero(metrics_lib.random_order_mrr(targets)),
    ])


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


def noise_scales(sums: np.ndarray, tasks: Sequence[str], noise_multiplier: float, *, draws: int = NOISE_DRAWS,
                 seed: int | None = None) -> dict[str, float]:
    """``shared.eval_sums.noise_scales`` of this merchant's release: its noise sd is σ_eval·C_eval."""
    return eval_sums.noise_scales(sums, tasks, noise_multiplier * EVAL_CLIP_NORM, draws=draws, seed=seed)


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
    offsets: Offsets | None = None,
) -> dict[str, float]:
    """What a merchant releases from its held-out ``examples``: the noised sums themselves
    (``sum:<task>/<statistic>``) and their noise sd σ_eval·C_eval (``sum-noise-sd``), which the
    server pools across merchants; the metrics computed from them, each with its noise scale
    ``<key>_sd`` (``noise_scales``: post-processing), for this merchant's own view; and
    ``num-examples`` = the held-out unit count (declared public, like the training N). The
    caller accounts the release (``EvalSettings.mechanism``) before it leaves. ``offsets``: the
    merchant's own (``client.offsets``) on the heads' scores, so the release describes the model
    it serves; they are the output of its accounted training calls, so using them costs nothing."""
    tasks = config.task_names
    losses, preds = predict(model, examples, tokenizer, config, device=device, feature_cache=feature_cache,
                            offsets=offsets)
    unit = config.privacy_unit
    sums = noised_sums(contributions(examples, losses, preds, tasks, unit=unit), noise_multiplier, seed=seed)
    scales = noise_scales(sums, tasks, noise_multiplier, seed=None if seed is None else seed + 1)
    noise_sd = noise_multiplier * EVAL_CLIP_NORM
    return {NUM_EXAMPLES: float(unit_count(examples, unit=unit)), **metrics_from_sums(sums, tasks, noise_sd),
            **scales, **eval_sums.as_metrics(sums, tasks, noise_sd)}
