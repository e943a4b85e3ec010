"""The evaluation release's sums (``shared.eval_sums``): metrics from noised sums without the
bias clipping noised bins at 0 gave the AUC, the sums on the wire, and their pooling across
merchants (Σ sums, noise sd sqrt(Σ sd²))."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared import eval_sums
from shared.metrics import SUM_NOISE_SD, is_released_sum, released_sum_key

CTR = ("ctr",)
SCALE = 1 / math.sqrt(3.0)  # ctr alone: client.release.unit_scale(("ctr",))


def ctr_sums(positives: int, negatives: int, *, seed: int = 0) -> np.ndarray:
    """Exact ctr sums of one-record units: positives spread over the high bins, negatives over
    the low ones, overlapping (an AUC near 0.91); many bins empty, as a real model's are."""
    names = eval_sums.layout(CTR)
    index = {n: i for i, n in enumerate(names)}
    rng = np.random.default_rng(seed)
    s = np.zeros(len(names))
    for b in rng.integers(9, 18, positives):
        s[index[f"ctr/pos{b}"]] += 1
    for b in rng.integers(3, 13, negatives):
        s[index[f"ctr/neg{b}"]] += 1
    s[index["ctr/count"]], s[index["ctr/loss"]] = positives + negatives, 0.1 * (positives + negatives)
    return s * SCALE


def clipped_bins(sums: np.ndarray) -> np.ndarray:
    """The earlier rule: every noised histogram bin clipped at 0 before the AUC."""
    names = eval_sums.layout(CTR)
    out = sums.copy()
    bins = [i for i, n in enumerate(names) if n.startswith(("ctr/pos", "ctr/neg"))]
    out[bins] = np.clip(out[bins], 0.0, None)
    return out


def test_the_released_auc_is_unbiased_where_clipping_bins_was_not() -> None:
    """4,000 held-out units at σ_eval = 10: over many releases the mean released AUC is the
    exact (binned) one within 0.01; clipping each noised bin at 0 adds |noise| mass to every
    empty bin (≈ 0.8σ each) and pulls the AUC about 0.05 towards 0.5."""
    sums = ctr_sums(1000, 3000)
    exact = eval_sums.metrics_from_sums(sums, CTR)["ctr_auc"]
    assert 0.85 < exact < 0.95
    rng = np.random.default_rng(1)
    noised = [sums + rng.normal(0.0, 10.0, sums.shape) for _ in range(500)]
    unclipped = [eval_sums.metrics_from_sums(n, CTR)["ctr_auc"] for n in noised]
    clipped = [eval_sums.metrics_from_sums(clipped_bins(n), CTR)["ctr_auc"] for n in noised]
    assert np.mean(unclipped) == pytest.approx(exact, abs=0.01)
    assert exact - np.mean(clipped) > 0.03  # the earlier rule's bias, well outside that tolerance
    assert all(0.0 <= v <= 1.0 for v in unclipped)  # only the final ratio is clamped to its range


def test_negative_noised_bins_give_figures_in_range() -> None:
    """A noised bin may be negative: every ratio is clamped to its range at the end, and a
    figure whose noised denominator is ≤ 0 is left out (precision and recall are 0, as
    ``shared.metrics`` reports an undefined ratio)."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        noised = ctr_sums(20, 60) + rng.normal(0.0, 10.0, len(eval_sums.layout(CTR)))
        got = eval_sums.metrics_from_sums(noised, CTR)
        for key in ("ctr_auc", "ctr_ap", "ctr_precision", "ctr_recall", "ctr_f1"):
            if key in got:
                assert 0.0 <= got[key] <= 1.0, (key, got[key])


def test_sums_travel_as_metric_keys_and_come_back() -> None:
    tasks = ("ctr", "rating", "relevance")
    names = eval_sums.layout(tasks)
    sums = np.arange(len(names), dtype=float) - 3.0  # negative coordinates too: noised sums
    keys = eval_sums.as_metrics(sums, tasks, 10.0)
    assert set(keys) == {released_sum_key(n) for n in names} | {SUM_NOISE_SD}
    assert all(is_released_sum(k) for k in keys)
    back = eval_sums.from_metrics({**keys, "ctr_auc": 0.7, "num-examples": 400.0})
    assert back is not None
    assert back[0].tolist() == sums.tolist() and back[1] == tasks and back[2] == 10.0
    # Incomplete: no sd, a coordinate missing, no sums at all (a non-private merchant's metrics).
    assert eval_sums.from_metrics({k: v for k, v in keys.items() if k != SUM_NOISE_SD}) is None
    assert eval_sums.from_metrics({k: v for k, v in keys.items() if k != released_sum_key("rating/abs")}) is None
    assert eval_sums.from_metrics({"ctr_auc": 0.7, "num-examples": 400.0}) is None


def test_pooling_adds_the_sums_and_the_noise_variances() -> None:
    tasks = ("ctr", "rating")
    n = len(eval_sums.layout(tasks))
    rng = np.random.default_rng(3)
    parts = [(rng.normal(50.0, 10.0, n), sd) for sd in (10.0, 5.0, 2.0)]
    pooled = eval_sums.pool([eval_sums.as_metrics(s, tasks, sd) for s, sd in parts])
    assert pooled is not None
    sums, got_tasks, sd = pooled
    assert sums == pytest.approx(sum(s for s, _ in parts)) and got_tasks == tasks
    assert sd == pytest.approx(math.sqrt(10.0**2 + 5.0**2 + 2.0**2))
    # One merchant without sums, or with other tasks: nothing to pool.
    assert eval_sums.pool([eval_sums.as_metrics(parts[0][0], tasks, 10.0), {"ctr_auc": 0.7}]) is None
    other = eval_sums.as_metrics(np.zeros(len(eval_sums.layout(CTR))), CTR, 10.0)
    assert eval_sums.pool([eval_sums.as_metrics(parts[0][0], tasks, 10.0), other]) is None
    assert eval_sums.pool([]) is None


def test_histogram_figures_are_left_out_when_the_noise_would_decide_them() -> None:
    """A class total within ESTIMABLE_SDS noise sds (summed over its bins) of zero: no AUC, AP,
    base rate, threshold or P/R/F1; the loss-based figures stay."""
    sums = np.zeros(len(eval_sums.layout(CTR)))
    names = eval_sums.layout(CTR)
    for name, value in (("ctr/count", 100.0), ("ctr/loss", 6.0), ("ctr/pos15", 80.0), ("ctr/neg5", 20.0)):
        sums[names.index(name)] = value
    exact = eval_sums.metrics_from_sums(sums, CTR)
    assert exact["ctr_auc"] == 1.0 and "ctr_threshold" in exact
    floor_sd = 20.0 / (eval_sums.ESTIMABLE_SDS * math.sqrt(eval_sums.HIST_BINS))  # the negatives' total sits on it
    noisy = eval_sums.metrics_from_sums(sums, CTR, noise_sd=floor_sd * 1.01)
    assert "ctr_logloss" in noisy
    assert not {"ctr_auc", "ctr_ap", "ctr_threshold", "ctr_precision", "ctr_logloss_baseline"} & set(noisy)
    assert "ctr_auc" in eval_sums.metrics_from_sums(sums, CTR, noise_sd=floor_sd * 0.99)
    # Their noise scales go with them: a figure left out in most draws gets no _sd.
    scales = eval_sums.noise_scales(sums, CTR, floor_sd * 1.01, seed=1)
    assert "ctr_auc_sd" not in scales and "ctr_logloss_sd" in scales
