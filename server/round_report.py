"""What one round did (``RoundReport``: who was sampled, accepted, rejected, refused, failed,
the evaluation, the time) and what a whole run did (``FederationResult``); ``server.run_log``
writes the first, ``server.report`` sums them up."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from shared import eval_sums
from shared.metrics import BASELINES, THRESHOLD_KEY, baseline_key, is_noise_scale, is_released_sum, noise_scale_key
from shared.wire import NUM_EXAMPLES

# The metrics ctr's threshold applies to: shown "at p ≥ threshold" rather than on a line of its own.
_AT_THRESHOLD = ("ctr_precision", "ctr_recall", "ctr_f1")


@dataclasses.dataclass
class RoundReport:
    round: int
    sampled: list[str] = dataclasses.field(default_factory=list)
    accepted: list[str] = dataclasses.field(default_factory=list)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    bytes_received: int = 0
    slowest_train_s: float = 0.0  # the slowest accepted merchant's DP training loop
    slowest_client_s: float = 0.0  # ... and its whole train handler (loading data and model too)
    total_client_s: float = 0.0  # all accepted merchants' handler time (clients run one by one by default)
    wall_s: float = 0.0
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # merchant -> the metrics it computed from its own noised sums (its sums left out: the
    # round's ``eval_metrics`` are computed from them, pooled): for per-merchant views only.
    eval_per_merchant: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    epsilon: dict[str, float] = dataclasses.field(default_factory=dict)
    aggregated: bool = False  # False when every sampled merchant refused (budgets spent, or pins)

    def outcome_text(self) -> str:
        parts = [f"{m}: accepted" for m in self.accepted]
        parts += [f"{m}: rejected ({r})" for m, r in self.rejected.items()]
        parts += [f"{m}: refused ({r})" for m, r in self.refused.items()]
        parts += [f"{m}: failed ({r})" for m, r in self.failed.items()]
        return "; ".join(parts) or "no replies"

    def stopping_value(self, metric: str) -> float | None:
        """The round's value of ``metric`` for early stopping, None where it has none; a noise
        scale (``<key>_sd``) or a released sum (``sum:``) is no metric and never has one."""
        if is_noise_scale(metric) or is_released_sum(metric):
            return None
        return self.eval_metrics.get(metric)

    def eval_text(self) -> str:
        """The round's evaluation on one line, each baseline beside its metric and each figure
        with its noise scale (``shown_metrics``)."""
        shown = shown_metrics(self.eval_metrics)
        return ", ".join(f"{k} {text}" + (f" {note}" if note else "") for k, text, note in shown)


def combine_metrics(released: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The merchants' evaluation releases combined into one round's metrics: those of their
    pooled noised sums (``pooled_metrics``) when every merchant sent its sums; otherwise (a
    non-private run's exact metrics, a merchant that sent no sums) the unit-weighted mean of
    their metrics (``mean_metrics``)."""
    pooled = pooled_metrics(released)
    return pooled if pooled is not None else mean_metrics(released)


def pooled_metrics(released: Sequence[Mapping[str, float]], *, seed: int | None = None) -> dict[str, float] | None:
    """The metrics of the merchants' noised sums added up (``shared.eval_sums.pool``: the same
    layout for every merchant of a run), each with its noise scale at the pooled noise sd
    sqrt(Σ sd_i²): post-processing of the merchants' DP releases. One metric of the pooled sums
    sees the noise against every merchant's units; a mean of per-merchant metrics would keep
    each one's bias from its own very noisy sums (a ratio of noisy counts, a sqrt). None
    unless every merchant sent a complete release of the same tasks. ``seed`` fixes the noise
    scales' bootstrap draws (tests); otherwise they are fresh."""
    pooled = eval_sums.pool(released)
    if pooled is None:
        return None
    sums, tasks, noise_sd = pooled
    return {**eval_sums.metrics_from_sums(sums, tasks, noise_sd),
            **eval_sums.noise_scales(sums, tasks, noise_sd, seed=seed)}


def mean_metrics(released: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The merchants' released metrics combined as each figure's mean weighted by the public
    held-out unit counts (``num-examples``) of the merchants that released it, Σ w_i m_i / Σ w_i;
    each noise scale (``<key>_sd``) that mean's, sqrt(Σ w_i² sd_i²) / Σ w_i (independent
    merchants' noise), not a mean of the scales. A figure's scale is given only when every
    merchant that released the figure released its scale: one without would make the
    combination too small. Released sums (``sum:``, ``sum-noise-sd``) are no figures and are
    left out, and so are non-finite values."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    variances: dict[str, float] = {}
    scaled: dict[str, float] = {}  # figure -> Σ w of the merchants that sent its scale
    for metrics in released:
        weight = float(metrics.get(NUM_EXAMPLES, 0.0))
        if not (math.isfinite(weight) and weight > 0):
            continue
        values = {k: float(v) for k, v in metrics.items()
                  if k != NUM_EXAMPLES and not is_released_sum(k) and math.isfinite(v)}
        for key, value in values.items():
            if is_noise_scale(key):
                continue
            totals[key] = totals.get(key, 0.0) + value * weight
            weights[key] = weights.get(key, 0.0) + weight
            sd = values.get(noise_scale_key(key))
            if sd is not None and sd >= 0:
                variances[key] = variances.get(key, 0.0) + (weight * sd) ** 2
                scaled[key] = scaled.get(key, 0.0) + weight
    out = {k: totals[k] / weights[k] for k in totals}
    out |= {noise_scale_key(k): math.sqrt(variances[k]) / weights[k] for k in variances if scaled[k] == weights[k]}
    return out


# Beside a noised figure that came without a noise scale: the re-noised sums left it undefined
# too often for one (``shared.eval_sums.noise_scales``; the ctr histogram's figures when a
# class's total is near the noise), so its spread is unknown, not zero.
NO_SCALE = "± ?"


def _with_scale(values: Mapping[str, float], key: str, noised: bool = False) -> str:
    """``0.6962 ± 0.2500``: a figure and its noise scale where one was released; ``, within its
    noise`` after a figure smaller than its scale (a constant's RMSE from noised sums can come
    out as 0: the noise, not the data, decided it). ``noised``: the figures are a DP release, so
    one without a scale gets ``NO_SCALE`` instead of passing for exact."""
    sd = values.get(noise_scale_key(key))
    if sd is None:
        return f"{values[key]:.4f}" + (f" {NO_SCALE}" if noised else "")
    return f"{values[key]:.4f} ± {sd:.4f}" + (", within its noise" if abs(values[key]) < sd else "")


def shown_metrics(metrics: Mapping[str, float | None]) -> list[tuple[str, str, str]]:
    """(metric, value text, note) in name order, for a person to read: each baseline goes into
    its metric's note (``ctr_logloss 0.3600 (constant base rate 0.4700)``), ctr's threshold into
    the notes of the metrics taken at it, rather than on lines of their own; each figure's noise
    scale (``<key>_sd``, ``shared.eval_sums.noise_scales``) beside it as ``± sd`` (``rating_rmse
    0.6962 ± 0.2500 (constant mean 0.5469 ± 0.3000)``), never on a line of its own; released sums
    (``sum:``, ``sum-noise-sd``) are not shown at all. A baseline
    or threshold whose metric is missing keeps its own entry; undefined values (None, NaN) are
    left out, and so is a scale whose figure is."""
    values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    noised = any(is_noise_scale(k) for k in values)  # a DP release (exact figures carry no scales)
    folded: set[str] = set()
    shown = []
    for key in sorted(values):
        if is_noise_scale(key) or is_released_sum(key):
            continue
        notes = []
        if key in BASELINES and baseline_key(key) in values:
            notes.append(f"{BASELINES[key]} {_with_scale(values, baseline_key(key), noised)}")
            folded.add(baseline_key(key))
        if key in _AT_THRESHOLD and THRESHOLD_KEY in values:
            notes.append(f"at p ≥ {_with_scale(values, THRESHOLD_KEY, noised)}")
            folded.add(THRESHOLD_KEY)
        shown.append((key, _with_scale(values, key, noised), f"({'; '.join(notes)})" if notes else ""))
    return [entry for entry in shown if entry[0] not in folded]


@dataclasses.dataclass(frozen=True)
class FederationResult:
    rounds_completed: int
    params: dict[str, np.ndarray]
    reports: list[RoundReport]
    stopped_because: str
