"""User-level DP-SGD (ULS, k = 1): units are Poisson-sampled, each sampled unit contributes one
record chosen with the call's private generator, and the spend says so (unit "user", N units)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import client.dp as dp
from client.trainer import train
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, load_tokenizer
from shared.privacy.budget import PrivacyState
from shared.tasks import Example, PerExampleLoss
from tests.helpers.examples import product_examples

UNITS = [list(range(0, 10)), [10], list(range(11, 15)), list(range(15, 30))]


def test_one_record_per_unit_draws_one_of_each_units_records_privately() -> None:
    dataset = TensorDataset(torch.arange(30))
    global_state = torch.get_rng_state()
    picks = [dp.one_record_per_unit(dataset, UNITS, torch.Generator().manual_seed(s)).indices for s in range(40)]
    assert torch.equal(torch.get_rng_state(), global_state)  # never torch's global generator
    for chosen in picks:
        assert len(chosen) == len(UNITS) and all(i in unit for i, unit in zip(chosen, UNITS, strict=True))
    assert len({chosen[0] for chosen in picks}) > 5  # a unit's record varies from call to call
    assert picks[3] == dp.one_record_per_unit(dataset, UNITS, torch.Generator().manual_seed(3)).indices


def test_a_step_takes_at_most_one_record_of_a_unit() -> None:
    """k = 1 caps a unit's records per step: the private loader samples units, each as one record."""
    unit_of = torch.tensor([u for u, unit in enumerate(UNITS) for _ in unit])
    dataset = TensorDataset(torch.randn(30, 3), unit_of)
    model = torch.nn.Linear(3, 1)
    private = dp.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              data_loader=DataLoader(dataset, batch_size=2), criterion=PerExampleLoss(),
                              noise_multiplier=1.0, max_grad_norm=1.0, mode="hooks", seed=0, units=UNITS)
    assert len(private.data_loader.dataset) == len(UNITS)  # Poisson sampling over units
    assert private.data_loader.batch_sampler.sample_rate == 1 / math.ceil(len(UNITS) / 2)
    sampled = 0
    for _ in range(20):
        for _, units in private.data_loader:
            assert len(units) == len(set(units.tolist()))
            sampled += len(units)
    assert sampled > 0


def user_examples(n: int = 60, users: int = 7) -> list[Example]:
    return [dataclasses.replace(e, record=f"r{i}", unit=f"user:u{i % users}")
            for i, e in enumerate(product_examples(n, seed=0))]


def config(**changes: Any) -> RunConfig:
    return RunConfig(**{"encoder": "tiny", "trainable": "heads", "batch_size": 4, "max_local_steps": 3,
                        "max_seq_len": 16, "noise_multiplier": 1.0, "target_epsilon": 1e6, **changes})


def run(cfg: RunConfig, tmp_path: Path, examples: list[Example]) -> tuple[Any, PrivacyState]:
    spec = ModelSpec.from_config(cfg)
    privacy = PrivacyState.open(tmp_path / "state.json", merchant_id="shop", target_epsilon=1e6, target_delta=1e-5)
    result = train(build_model(spec), examples, load_tokenizer(spec), cfg, privacy=privacy)
    return result, privacy


def test_uls_spend_is_per_user(tmp_path: Path) -> None:
    result, privacy = run(config(), tmp_path, user_examples())
    event = privacy.entries[-1].event
    assert (event.unit, event.unit_count) == ("user", 7)
    assert event.mechanism.sample_rate == 1 / math.ceil(7 / 4)
    assert event.expected_batch == pytest.approx(event.mechanism.sample_rate * 7)  # in units
    assert result.num_examples == 7 and result.steps == 2  # one epoch over 7 units at q = 1/2


def test_record_unit_samples_records(tmp_path: Path) -> None:
    _, privacy = run(config(privacy_unit="record"), tmp_path, user_examples())
    event = privacy.entries[-1].event
    assert (event.unit, event.unit_count) == ("record", 60)
    assert event.mechanism.sample_rate == 1 / math.ceil(60 / 4)


def test_more_than_one_record_per_unit_is_refused_without_per_sample_gradients(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"max-records-per-unit = 2: trainable = 'full'.*'bk'"):
        run(config(trainable="full", max_records_per_unit=2), tmp_path, user_examples())
    assert not (tmp_path / "state.json").exists() or not PrivacyState.open(
        tmp_path / "state.json", merchant_id="shop", target_epsilon=1e6, target_delta=1e-5).entries


# ----------------------------------------------------------------- k > 1 (ew, hooks)
def test_k_caps_a_units_records_per_step() -> None:
    sampler = dp.UnitPoissonSampler(dp.chosen_records(UNITS, 3, torch.Generator().manual_seed(0)), 0.5, 200,
                                    torch.Generator().manual_seed(1))
    seen_empty = False
    for batch in sampler:
        owners = sampler.owners.tolist()
        assert len(owners) == len(batch)
        for position in set(owners):
            records = [r for r, o in zip(batch, owners, strict=True) if o == position]
            assert 1 <= len(records) <= 3 and any(set(records) <= set(unit) for unit in UNITS)
        seen_empty |= not batch
    assert seen_empty  # an empty Poisson batch is a step too
    assert [len(c) for c in dp.chosen_records(UNITS, 3, torch.Generator().manual_seed(0))] == [3, 1, 3, 3]


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_k_sums_a_units_gradients_then_clips_it(mode: str) -> None:
    """k = 3: the update is -lr · Σ_units clip_C(Σ_unit's records ∇ℓ) / expected units (σ ≈ 0)."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 3) * 3, torch.randn(30)
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    private = dp.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                              data_loader=DataLoader(TensorDataset(x, y), batch_size=2), criterion=PerExampleLoss(),
                              noise_multiplier=1e-9, max_grad_norm=1.0, mode=mode, seed=3, units=UNITS,
                              records_per_unit=3)
    xb, yb = next(batch for batch in private.data_loader if len(batch[0]))
    owners = private.data_loader.batch_sampler.owners
    private.optimizer.zero_grad(set_to_none=True)
    ((private.model(xb).squeeze(1) - yb) ** 2).mean().backward()
    private.optimizer.step()

    expected = [torch.zeros_like(b) for b in before]
    for position in owners.unique().tolist():
        rows = owners == position
        reference = torch.nn.Linear(3, 1)
        with torch.no_grad():
            for p, b in zip(reference.parameters(), before, strict=True):
                p.copy_(b)
        ((reference(xb[rows]).squeeze(1) - yb[rows]) ** 2).sum().backward()
        grads = [p.grad for p in reference.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        for e, g in zip(expected, grads, strict=True):
            e += g * min(1.0, 1.0 / (float(norm) + 1e-6))
    units_expected = private.optimizer.expected_batch_size
    assert units_expected == int(len(UNITS) / 2)  # q = 1/ceil(4/2), in units
    for p, b, e in zip(private.model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e / units_expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("trainable", ["heads", "lora"])
def test_uls_with_k_above_one_trains(trainable: str, tmp_path: Path) -> None:
    result, privacy = run(config(trainable=trainable, max_records_per_unit=4, max_local_steps=6, local_epochs=3.0),
                          tmp_path, user_examples())
    event = privacy.entries[-1].event
    assert (event.unit, event.unit_count) == ("user", 7) and result.steps == 6  # 3 epochs at q = 1/2
    assert result.losses and all(math.isfinite(loss) for loss in result.losses)
