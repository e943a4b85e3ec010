"""simulations.canary_audit and ``fedshop audit --empirical``: an audit that fails without noise,
passes with it, and refuses a setting in which it could not fail. (The bounds themselves:
tests/shared/test_auditing.py.)"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import dp
from shared.config import ConfigError, RunConfig
from shared.model import ModelSpec, load_tokenizer
from shared.privacy import accounting
from shared.privacy.budget import PrivacyState
from shared.privacy.events import MechanismEvent
from simulations.canaries import guesses, make_canaries
from simulations.canary_audit import RESULT_FILE, STATE_FILE, run_canary_audit
from simulations.cli import main
from tests.helpers.examples import product_examples

# --------------------------------------------------------------------------- guesses


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
# One synthetic merchant (52 records) + 200 canaries (about 100 inserted): ~150 records,
# batch 32, one epoch per call, so q = 1/5 and 5 steps per call; two consecutive calls. σ = 2
# claims ε ≈ 1.63 for the two calls composed at δ = 1e-5. 100 guesses (50 each way) among 200
# canaries prove at most ε ≈ 7.15 (f-DP) / 3.49 (Steinke); a canary reaches some batch of the
# DP training with probability 1 − (4/5)^10 ≈ 0.89, so the best attack still expects ≈ 95 of
# 100 right, ≈ 4.2: the setting has power. Refuting ε = 1.63 takes 78 of 100 right.
#
# Why neither run can flake. The no-noise run draws nothing unseeded: canaries, coins,
# model and batch order all come from seed 0, so it repeats exactly; it gets 100 of 100
# (seeds 0-7 all did), 22 more than needed, a margin no floating-point difference between
# machines comes near. The DP run draws its noise and Poisson batches from the OS's entropy
# pool (client.dp.private_generators); the test seeds them (a different seed per call, as
# fresh generators would be) so that it repeats exactly too. Unseeded, it scored 45-58 of
# 100 over 8 draws, i.e. chance: at chance, 78 right has probability P[Binomial(100, 1/2) ≥
# 78] ≈ 1e-8.
CALLS = 2
CANARIES = 200
SETTINGS = {
    "encoder": "tiny", "trainable": "full", "dropout": 0.0, "learning-rate": 0.002, "batch-size": 32,
    "local-epochs": 1.0, "max-local-steps": 0, "max-seq-len": 16, "noise-multiplier": 2.0, "max-grad-norm": 1.0,
    "target-delta": 1e-5, "seed": 0,
}


def settings(**changes: Any) -> list[str]:
    merged = {**SETTINGS, **{key.replace("_", "-"): value for key, value in changes.items()}}
    return [arg for key, value in merged.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def audit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["audit", "--empirical", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def merchant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.sources.synthetic import SyntheticFederation, write_merchants

    (folder,) = write_merchants(SyntheticFederation(1, seed=0, products_per_merchant=10,
                                                    interactions_per_merchant=40, judgments_per_merchant=10),
                                tmp_path_factory.mktemp("data"))
    return folder


@pytest.fixture
def seeded_noise(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each private call's sampling and noise generators from seeds 1000, 2000, ... (see above)."""
    fresh = dp.private_generators
    seeds = itertools.count(1000, 1000)
    monkeypatch.setattr(dp, "private_generators", lambda model, seed: fresh(model, next(seeds)))
    yield


def test_audit_without_noise_exits_non_zero(merchant: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = audit(capsys, "--data", str(merchant), "--canaries", str(CANARIES), "--calls", str(CALLS),
                           "--no-noise", "--out", str(tmp_path), *settings())
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert status == 1, out
    assert "FAILED" in out and "EXCEEDS" in out
    assert result["dp"] is False and result["passed"] is False
    assert (result["m"], result["r"], result["calls"], result["steps"]) == (CANARIES, CANARIES // 2, CALLS, 10)
    # 100 of 100 here (see above); refuting the claim takes 78, which is all this asserts.
    assert result["v"] >= 78
    assert result["epsilon_lower_bound_fdp"] <= result["power_fdp"]
    assert result["epsilon_lower_bound_steinke"] <= result["power_steinke"]
    assert result["epsilon_lower_bound"] > result["epsilon_claimed"]
    # The claim is the DP configuration's for both calls composed, not for one.
    (mechanism,) = {json.dumps(m, sort_keys=True) for m in result["mechanisms"]}
    one = MechanismEvent.from_dict(json.loads(mechanism))
    assert len(result["mechanisms"]) == CALLS and one.noise_multiplier == 2.0 and one.steps == 5
    # What the canaries test is add/remove (each canary is in or out), the smaller, stricter claim.
    assert result["epsilon_claimed"] == pytest.approx(
        accounting.epsilon_pld([one] * CALLS, 1e-5, neighbours="add-remove"))
    assert result["epsilon_claimed"] < accounting.epsilon([one] * CALLS, 1e-5)
    assert result["epsilon_claimed"] > accounting.epsilon_pld([one], 1e-5, neighbours="add-remove")
    assert not (tmp_path / STATE_FILE).exists()  # nothing private was released
    for shown in ("lower bound ε ≥", "f-DP", "Steinke", "claimed ε =", "power:"):
        assert shown in out


def test_the_same_audit_with_noise_exits_zero(merchant: Path, tmp_path: Path, seeded_noise: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = audit(capsys, "--data", str(merchant), "--canaries", str(CANARIES), "--calls", str(CALLS),
                           "--out", str(tmp_path), *settings())
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert status == 0, out
    assert "PASSED" in out
    assert result["dp"] is True and result["passed"] is True
    assert (result["m"], result["r"], result["calls"]) == (CANARIES, CANARIES // 2, CALLS)
    assert result["epsilon_lower_bound"] <= result["epsilon_claimed"]
    assert result["v"] < 78  # what refuting the claim would take (see above)
    # Each call was checked and committed through the audit's PrivacyState, one run, two
    # entries; the claim is those two calls composed, which a fresh state reports too.
    state = PrivacyState.open(tmp_path / STATE_FILE, merchant_id="canary-audit", target_epsilon=float("inf"),
                              target_delta=1e-5)
    assert len(state.entries) == CALLS and len({entry.run_id for entry in state.entries}) == 1
    assert [m.to_dict() for m in state.events] == result["mechanisms"]
    # The claim tested is those calls' add/remove ε; the state reports their replace-one ε.
    assert result["epsilon_claimed"] == pytest.approx(
        accounting.epsilon_pld(state.events, 1e-5, neighbours="add-remove"))
    assert result["epsilon_state"] == pytest.approx(accounting.epsilon(state.events, 1e-5))
    assert result["epsilon_state"] > result["epsilon_claimed"]
    assert result["epsilon_claimed"] > accounting.epsilon_pld(state.events[:1], 1e-5, neighbours="add-remove")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([RESULT_FILE, STATE_FILE])  # no temp file left


def test_a_trainable_set_without_token_embeddings_is_refused(merchant: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = audit(capsys, "--data", str(merchant), "--out", str(tmp_path), *settings(trainable="lora"))
    assert status == 2
    assert "'trainable' = 'lora'" in err and "trainable = 'full'" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before anything ran


def test_a_claim_beyond_what_the_canaries_can_prove_is_refused(merchant: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # 40 canaries, 20 guesses: at most ε ≈ 3.92 (f-DP) / 1.82 (Steinke) whatever happens; σ = 1
    # over 2 calls of 3 steps at q = 1/3 claims ε ≈ 6.05. 160 canaries could prove more.
    status, _, err = audit(capsys, "--data", str(merchant), "--canaries", "40", "--out", str(tmp_path),
                           *settings(noise_multiplier=1.0))
    assert status == 2
    assert "beyond what this audit can ever prove" in err and "--canaries 160" in err
    assert not any(tmp_path.iterdir())


def test_training_that_samples_too_few_canaries_is_refused(merchant: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # One step of one call: a canary reaches the batch with probability 1/5, so even a perfect
    # attack expects about 55 of 100 guesses right, which proves less than the claim.
    status, _, err = audit(capsys, "--data", str(merchant), "--canaries", str(CANARIES), "--calls", "1",
                           "--out", str(tmp_path), *settings(max_local_steps=1, noise_multiplier=0.7))
    assert status == 2
    assert "probability only 20.0%" in err and "'max-local-steps'" in err and "'local-epochs'" in err
    assert not any(tmp_path.iterdir())


def test_bad_arguments_are_refused_before_training(tmp_path: Path) -> None:
    config = RunConfig.from_mapping(SETTINGS)
    base = product_examples(4, seed=0)
    with pytest.raises(ValueError, match="k_plus"):
        run_canary_audit(None, config, m=10, k_plus=6, k_minus=5, out_dir=tmp_path, base_examples=base)
    with pytest.raises(ValueError, match="calls"):
        run_canary_audit(None, config, m=10, calls=0, out_dir=tmp_path, base_examples=base)
    with pytest.raises(ValueError, match="data_dirs"):
        run_canary_audit(None, config, m=10, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="noise-multiplier"):
        run_canary_audit(None, config.replace(noise_multiplier=0.0), m=10, out_dir=tmp_path, base_examples=base)
