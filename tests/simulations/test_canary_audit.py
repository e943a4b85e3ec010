"""simulations.canary_audit: the one-run ε lower bound, and an audit that passes DP and fails no noise."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from shared.config import RunConfig
from shared.model import ModelSpec, load_tokenizer
from shared.tasks import Example
from simulations.canary_audit import (
    RESULT_FILE,
    CanaryAuditResult,
    epsilon_lower_bound,
    guesses,
    make_canaries,
    run_canary_audit,
)

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
GOOD = ["premium", "durable", "leather", "handcrafted", "sturdy"]
BAD = ["cheap", "flimsy", "plastic", "fragile", "knockoff"]
NOUNS = ["bag", "wallet", "belt", "shoes", "jacket", "case", "chair", "lamp"]


def product_examples(n: int, seed: int) -> list[Example]:
    """Ordinary merchant records: click iff the product text uses 'good' words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        clicked = i % 2
        words = rng.sample(GOOD if clicked else BAD, 2) + [rng.choice(NOUNS)]
        rng.shuffle(words)
        out.append(Example(task="ctr", context="", product=" ".join(words), target=float(clicked)))
    return out


# 1000 canaries (about 500 included) + 200 ordinary records, batch 64, 3 epochs: 36 steps at
# q = 1/11. σ = 1.0 claims ε ≈ 3.8 at δ = 1e-5; 500 guesses can prove at most ε ≈ 5.09, so
# the no-noise run must get nearly every guess right (≥ ~492/500) to beat the claim.
M = 1000
AUDIT_CONFIG: dict[str, Any] = dict(
    encoder="tiny", trainable="full", dropout=0.0, learning_rate=1e-3, optimizer="adamw",
    batch_size=64, local_epochs=3.0, max_local_steps=0, max_seq_len=16, noise_multiplier=1.0,
    max_grad_norm=1.0, target_delta=1e-5, target_epsilon=1e6,
)


@pytest.fixture(scope="module")
def base_examples() -> list[Example]:
    return product_examples(200, seed=0)


def test_dp_training_passes_the_audit(tmp_path: Path, base_examples: list[Example]) -> None:
    config = RunConfig(**AUDIT_CONFIG)
    result = run_canary_audit(None, config, m=M, noise=True, seed=0, out_dir=tmp_path,
                              base_examples=base_examples)
    assert isinstance(result, CanaryAuditResult)
    assert result.dp and result.noise_multiplier == 1.0 and result.steps == 36
    assert (result.m, result.k_plus, result.k_minus, result.r) == (M, M // 4, M // 4, M // 2)
    assert 2.0 < result.epsilon_claimed < 6.0
    assert result.epsilon_lower_bound <= result.epsilon_claimed
    written = json.loads((tmp_path / RESULT_FILE).read_text())
    assert written == result.to_dict()
    assert not list(tmp_path.glob("*.tmp"))


def test_training_without_noise_fails_the_audit(tmp_path: Path, base_examples: list[Example]) -> None:
    config = RunConfig(**AUDIT_CONFIG)
    result = run_canary_audit(None, config, m=M, noise=False, seed=0, out_dir=tmp_path,
                              base_examples=base_examples)
    assert not result.dp and result.steps == 36
    # The claim is what the DP configuration would report for the same 36 steps.
    assert 2.0 < result.epsilon_claimed < 6.0
    assert result.epsilon_lower_bound > result.epsilon_claimed, result
