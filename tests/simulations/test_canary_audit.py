"""simulations.canary_audit: the one-run ε lower bound, and an audit that passes DP and fails no noise."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from shared.config import RunConfig
from shared.model import ModelSpec, load_tokenizer
from simulations.canary_audit import (
    RESULT_FILE,
    CanaryAuditResult,
    epsilon_lower_bound,
    guesses,
    make_canaries,
    run_canary_audit,
)
from tests.helpers.examples import product_examples

# --------------------------------------------------------------------------- the bound


def test_chance_level_guessing_proves_nothing() -> None:
    assert epsilon_lower_bound(m=100, r=100, v=50, delta=0.0) == 0.0
    assert epsilon_lower_bound(m=1000, r=500, v=250, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=1000, r=0, v=0, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=100, r=100, v=10, delta=0.0) == 0.0  # worse than chance


def test_all_correct_matches_the_hand_computed_value() -> None:
    # r = v = 100, δ = 0: the p-value is P[Binomial(100, p) >= 100] = p^100 with
    # p = e^ε / (1 + e^ε). It is < 0.05 while p < 0.05^(1/100) = exp(ln(0.05) / 100)
    # = exp(-0.0299573) = 0.9704870, so ε < ln(p / (1 - p)) = ln(0.9704870 / 0.0295130)
    # = ln(32.8834) = 3.49297.
    expected = math.log(0.05 ** (1 / 100) / (1 - 0.05 ** (1 / 100)))
    assert expected == pytest.approx(3.49297, abs=1e-5)
    assert epsilon_lower_bound(m=100, r=100, v=100, delta=0.0) == pytest.approx(expected, abs=1e-6)


def test_confidence_level_is_honoured() -> None:
    # At 99% the same 100/100 must reject less: p < 0.01^(1/100).
    p = 0.01 ** (1 / 100)
    assert epsilon_lower_bound(m=100, r=100, v=100, delta=0.0, confidence=0.99) == pytest.approx(
        math.log(p / (1 - p)), abs=1e-6
    )


def test_more_correct_guesses_give_a_larger_bound() -> None:
    bounds = [epsilon_lower_bound(m=1000, r=500, v=v, delta=1e-5) for v in range(250, 501, 10)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0.0 and bounds[-1] > 5.0  # 500/500 at δ = 1e-5: about 5.09


def test_delta_term_lowers_the_bound() -> None:
    pure = epsilon_lower_bound(m=1000, r=500, v=450, delta=0.0)
    approx = epsilon_lower_bound(m=1000, r=500, v=450, delta=1e-5)
    loose = epsilon_lower_bound(m=1000, r=500, v=450, delta=1e-4)
    assert pure > approx > loose > 0.0
    # The δ term carries a factor 2·m: more canaries at the same r, v and δ prove less.
    assert epsilon_lower_bound(m=10_000, r=500, v=450, delta=1e-5) < approx


@pytest.mark.parametrize("bad", [dict(m=10, r=11, v=5), dict(m=10, r=5, v=6), dict(m=10, r=5, v=-1)])
def test_impossible_counts_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(delta=1e-5, **bad)


def test_guesses_take_the_extremes_and_abstain_in_between() -> None:
    import numpy as np

    scores = np.array([0.5, -2.0, 3.0, 0.1, 1.0, -1.0])
    assert guesses(scores, k_plus=2, k_minus=1).tolist() == [0, -1, 1, 0, 1, 0]
    with pytest.raises(ValueError):
        guesses(scores, k_plus=4, k_minus=3)


def test_stratified_guesses_rank_within_each_stratum() -> None:
    import numpy as np

    # Stratum 1 sits far above stratum 0 (a shared shift); each still gets its own extremes.
    scores = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    strata = np.array([0, 0, 0, 1, 1, 1])
    assert guesses(scores, k_plus=2, k_minus=2, strata=strata).tolist() == [-1, 0, 1, -1, 0, 1]
    # Shares follow stratum sizes and always sum to exactly k_plus and k_minus, even with no
    # room left to abstain.
    uneven = np.array([0, 0, 0, 0, 0, 1])
    guess = guesses(np.arange(6.0), k_plus=3, k_minus=3, strata=uneven)
    assert (guess == 1).sum() == 3 and (guess == -1).sum() == 3


# --------------------------------------------------------------------------- canaries


def test_canaries_use_unique_whole_words_not_in_the_data() -> None:
    tokenizer = load_tokenizer(ModelSpec(encoder="tiny"))
    base = product_examples(50, seed=0)
    canaries = make_canaries(300, tokenizer, seed=3, avoid=base)
    assert canaries == make_canaries(300, tokenizer, seed=3, avoid=base)  # seeded
    base_words = {w for e in base for w in e.product.split()}
    seen: set[str] = set()
    for canary in canaries:
        words = canary.product.split()
        assert canary.task == "ctr" and canary.context == "" and canary.target in (0.0, 1.0)
        assert 3 <= len(words) <= 4
        assert tokenizer.tokenize(canary.product) == words  # each word is one vocabulary token
        assert not any(w.startswith("##") for w in words)
        assert not (set(words) & seen) and not (set(words) & base_words)
        seen.update(words)
    assert 0.3 < sum(c.target for c in canaries) / len(canaries) < 0.7  # random labels


# --------------------------------------------------------------------------- the audit




# 1000 canaries (about 500 included) + 200 ordinary records, batch 64, 2 epochs: 22-24 steps
# at q = 1/11 or 1/10 (the count of included canaries decides). σ = 1.0 claims ε ≈ 3.3-3.4
# at δ = 1e-5; 500 guesses can prove at most ε ≈ 5.09, so the no-noise run must get at least
# ~491 of 500 guesses right to beat the claim. Observed (no noise, seeds 0-14, this config):
# 500/500 every time; with DP: 235-263 of 500 (chance), bound 0.
M = 1000
AUDIT_CONFIG: dict[str, Any] = dict(
    encoder="tiny", trainable="full", dropout=0.0, learning_rate=2e-3, optimizer="adamw",
    batch_size=64, local_epochs=2.0, max_local_steps=0, max_seq_len=16, noise_multiplier=1.0,
    max_grad_norm=1.0, target_delta=1e-5, target_epsilon=1e6,
)


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[CanaryAuditResult, Path]]:
    """The same audit (config, canaries, coins, data) run with DP noise and without."""
    base = product_examples(200, seed=0)
    config = RunConfig(**AUDIT_CONFIG)
    out: dict[bool, tuple[CanaryAuditResult, Path]] = {}
    for noise in (True, False):
        out_dir = tmp_path_factory.mktemp("dp" if noise else "no-noise")
        out[noise] = (run_canary_audit(None, config, m=M, noise=noise, seed=0, out_dir=out_dir,
                                       base_examples=base), out_dir)
    return out


def test_dp_training_passes_the_audit(audits: dict[bool, tuple[CanaryAuditResult, Path]]) -> None:
    result, out_dir = audits[True]
    assert result.dp and result.noise_multiplier == 1.0 and result.confidence == 0.95
    assert (result.m, result.k_plus, result.k_minus, result.r) == (M, M // 4, M // 4, M // 2)
    assert 2.0 < result.epsilon_claimed < 5.0
    assert result.epsilon_lower_bound <= result.epsilon_claimed, result
    assert json.loads((out_dir / RESULT_FILE).read_text()) == result.to_dict()
    # No temp file left; the audit's own spend is on record beside the result.
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([RESULT_FILE, "canary-privacy-state.json"])
    state = json.loads((out_dir / "canary-privacy-state.json").read_text())
    assert len(state["entries"]) == 1 and state["entries"][0]["event"]["steps"] == result.steps


def test_training_without_noise_fails_the_audit(audits: dict[bool, tuple[CanaryAuditResult, Path]]) -> None:
    result, out_dir = audits[False]
    private, _ = audits[True]
    assert not result.dp
    # Same data and steps as the DP run, and the claim is what the DP configuration's
    # accountant reported for them.
    assert result.steps == private.steps
    assert result.epsilon_claimed == pytest.approx(private.epsilon_claimed, rel=1e-6)
    assert result.epsilon_lower_bound > result.epsilon_claimed, result
    assert json.loads((out_dir / RESULT_FILE).read_text())["dp"] is False


def test_audit_reads_a_merchant_folder(tmp_path: Path) -> None:
    from client.sources.synthetic import SyntheticFederation, write_merchants

    (merchant,) = write_merchants(SyntheticFederation(1, seed=0, products_per_merchant=10,
                                                      interactions_per_merchant=40, judgments_per_merchant=10),
                                  tmp_path / "data")
    config = RunConfig(**{**AUDIT_CONFIG, "max_local_steps": 2})
    result = run_canary_audit([merchant], config, m=40, k_plus=5, k_minus=5, noise=False, seed=1,
                              out_dir=tmp_path / "out")
    assert (result.m, result.r, result.steps) == (40, 10, 2) and 0 <= result.v <= 10
    assert (tmp_path / "out" / RESULT_FILE).is_file()


def test_guess_counts_are_checked_before_training(tmp_path: Path) -> None:
    config = RunConfig(**AUDIT_CONFIG)
    with pytest.raises(ValueError, match="k_plus"):
        run_canary_audit(None, config, m=10, k_plus=6, k_minus=5, out_dir=tmp_path,
                         base_examples=product_examples(4, seed=0))
    with pytest.raises(ValueError, match="data_dirs"):
        run_canary_audit(None, config, m=10, out_dir=tmp_path)
