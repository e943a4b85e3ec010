"""The heads replica: its closed-form DP-SGD pieces against the system's, and its arms."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from shared.tasks import per_example_loss

ROOT = Path(__file__).resolve().parents[2]


def _batch(records: int = 6, hidden: int = 5) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(records, hidden, generator=g, dtype=torch.float64)
    targets = torch.full((records, 3), math.nan, dtype=torch.float64)
    targets[:, 0] = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.float64)[:records]  # a click label
    targets[::2, 1] = 4.0  # half the records also rated (two tasks, one DP unit)
    targets[-1, :] = math.nan
    targets[-1, 2] = 2.0  # a relevance judgment
    heads = [torch.randn(3, hidden, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    return x, targets, heads


def test_each_records_gradient_is_autograd_of_its_own_loss(replica: ModuleType) -> None:
    x, targets, heads = _batch()
    grad = replica.record_gradients(heads, x, targets)
    for i in range(len(x)):
        weight, bias = (h.clone().requires_grad_(True) for h in heads)
        loss = per_example_loss(x[i:i + 1] @ weight.T + bias, targets[i:i + 1]).sum()
        d_weight, d_bias = torch.autograd.grad(loss, (weight, bias))
        assert torch.allclose(torch.outer(grad[i], x[i]), d_weight) and torch.allclose(grad[i], d_bias)


def test_clipping_bounds_every_records_whole_gradient_and_leaves_small_ones_alone(replica: ModuleType) -> None:
    x, targets, heads = _batch()
    grad = replica.record_gradients(heads, x, targets)
    norms = grad.norm(dim=1) * (x.pow(2).sum(1) + 1).sqrt()  # over every head's weights and bias
    c = float(norms.median())
    clipped = grad * replica.clip_factors(grad, x, c)[:, None]
    clipped_norms = clipped.norm(dim=1) * (x.pow(2).sum(1) + 1).sqrt()
    assert bool((clipped_norms <= c + 1e-9).all())
    small = norms < c
    assert small.any() and torch.equal(clipped[small], grad[small])


def test_weight_decay_is_adamws_and_the_dp_arms_take_their_own(replica: ModuleType) -> None:
    """One step: AdamW's decoupled decay moves each weight by rate x decay x its value, on top of
    the same Adam step; the DP path (σ = 0 here) decays by the private value, the non-private
    path by the other."""
    x, targets, heads = _batch()
    recipe = replica.Recipe(rounds=1, local_steps=1, batch=len(x), rate=0.1, max_grad_norm=1.0, delta=1e-5,
                            central_steps=1, weight_decay=0.0, private_weight_decay=0.5)

    def step(recipe: object, sigma: float | None) -> list[torch.Tensor]:
        return replica.train(heads, (x, targets), 1, None, recipe, torch.Generator().manual_seed(0), sigma=sigma)[0]

    private, undecayed = step(recipe, 0.0), step(dataclasses.replace(recipe, private_weight_decay=0.0), 0.0)
    plain, decayed = step(recipe, None), step(dataclasses.replace(recipe, weight_decay=0.5), None)
    for start, a, b, c, d in zip(heads, private, undecayed, plain, decayed, strict=True):
        assert torch.allclose(b - a, 0.1 * 0.5 * start) and torch.allclose(c - d, 0.1 * 0.5 * start)


def test_a_merchant_plans_its_noise_as_the_system_merchant_does(replica: ModuleType, tmp_path: Path) -> None:
    from shared.privacy.budget import PrivacyState

    recipe = replica.Recipe(rounds=8, local_steps=15, batch=1024, rate=0.1, max_grad_norm=1.0, delta=1e-5,
                            central_steps=720)
    state = PrivacyState.open(tmp_path / "s.json", merchant_id="m", target_epsilon=8.0, target_delta=1e-5)
    planned = {}  # each σ is a bisection over the accountant: computed once, compared twice
    for records in (95, 2939, 18211):
        system = state.planned_noise(sample_rate=1.0 / math.ceil(records / 1024), steps=15, max_grad_norm=1.0,
                                     calls=8, floor=replica.utility.NOISE_FLOOR)
        planned[records] = replica.sigma_for(records, recipe, 8.0, steps=15, calls=8)
        assert planned[records] == pytest.approx(system, rel=1e-6)
    # Fewer records: a larger sample rate, so more noise for the same ε.
    assert planned[95] > planned[18211]


def test_groups_partition_the_merchants_and_bad_ones_are_named(replica: ModuleType) -> None:
    merchants = ["a", "b", "c", "d"]
    assert replica.parse_groups(["a+c"], merchants) == [["a", "c"], ["b"], ["d"]]
    with pytest.raises(ValueError, match=r"'a\+z'.*unknown merchant\(s\) z"):
        replica.parse_groups(["a+z"], merchants)
    with pytest.raises(ValueError, match=r"'b\+a'.*a already in a group"):
        replica.parse_groups(["a+c", "b+a"], merchants)


def test_every_arm_runs_on_a_tiny_dataset_and_merging_lowers_the_merged_merchants_noise(
        replica: ModuleType, tmp_path: Path) -> None:
    utility = replica.utility
    dataset = utility.Dataset("esci", tmp_path, encoder="tiny", quick=True, setting=utility.SETTINGS["heads"])
    merchants, whiten = replica.load(dataset)
    assert whiten is None  # ESCI trains in the plain pooled states (no public corpus)
    # Batches smaller than a merchant (as 1,024 is for the reviews merchants): then more records
    # mean a lower sample rate.
    recipe = dataclasses.replace(replica.recipe_of(dataset, None), batch=32)
    assert all(len(m.states) > 32 for m in merchants.values())
    names = dataset.merchants
    partition = replica.parse_groups([f"{names[0]}+{names[1]}"], names)
    assert partition == [[names[0], names[1]], *([m] for m in names[2:])]
    results = replica.run(merchants, recipe, epsilon=8.0, seeds=1, partitions=[partition])
    merged = f"federated-dp-eps-8 merged {names[0]}+{names[1]},{','.join(names[2:])}"
    assert set(results) == {"centralised", "federated", "federated-dp-eps-8", "centralised-dp-eps-8", merged}
    for arm in results.values():
        assert all(math.isfinite(arm["macro"][k]) for k in utility.HEADLINE["esci"])
    alone = results["federated-dp-eps-8"]["sigma"]
    together = results[merged]["sigma"][f"{names[0]}+{names[1]}"]
    assert together < min(alone[names[0]], alone[names[1]])
    assert results["centralised-dp-eps-8"]["sigma"]["all"] <= max(alone.values())
    text = replica.markdown("esci", results, "cmd")
    assert "| centralised | " in text and "(+0.0 %)" in text
    assert recipe.weight_decay == dataset.config.weight_decay
    assert recipe.private_weight_decay == dataset.private_config(8.0, calls=1).weight_decay  # the setting's
    assert replica.recipe_of(dataset, None, private_weight_decay=0.3).private_weight_decay == 0.3
    # A federation that samples some merchants a round is not what the replica models.
    dataset.config = dataset.config.replace(merchants_per_round=2)
    with pytest.raises(ValueError, match="merchants-per-round = 2 of 4"):
        replica.recipe_of(dataset, None)


@pytest.mark.parametrize(("args", "message"), [(["--merge", "esci-0+nope"], "unknown merchant(s) nope"),
                                                (["--fold", "3/3"], "fold '3/3'"),
                                                (["--seeds", "0"], "--seeds 0"),
                                                (["--private-weight-decay", "-1"], "--private-weight-decay -1.0")])
def test_bad_arguments_are_refused_with_their_value(args: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "heads_replica.py"), "--dataset", "esci",
                           "--encoder", "tiny", "--work", str(tmp_path), "--out", str(tmp_path / "r"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and message in done.stderr
    assert not list(tmp_path.glob("r.*"))  # nothing written


def test_runs_on_folds_pool_to_each_arms_mean_and_a_fold_counts_once(replica: ModuleType, tmp_path: Path) -> None:
    def run_file(name: str, fold: str, dataset: str = "esci", ndcg: float = 0.7) -> Path:
        arms = {"centralised": {"sigma": None, "macro": {"relevance_ndcg@10": 0.8, "relevance_mrr": 0.9,
                                                         "ctr_auc": None}},  # NaN, as written
                "federated-dp-eps-8": {"sigma": {"esci-0": 1.0 + ndcg, "esci-1": 2.0},
                                       "macro": {"relevance_ndcg@10": ndcg, "relevance_mrr": 0.85}}}
        path = tmp_path / name
        path.write_text(json.dumps({"dataset": dataset, "fold": fold, "arms": arms}))
        return path

    name, pooled = replica.pool([run_file("a.json", "0/2", ndcg=0.7), run_file("b.json", "1/2", ndcg=0.6)])
    assert name == "esci"
    assert pooled["federated-dp-eps-8"]["macro"]["relevance_ndcg@10"] == pytest.approx(0.65)
    assert pooled["federated-dp-eps-8"]["sigma"] == {"least": 1.6, "most": 2.0}
    assert math.isnan(pooled["centralised"]["macro"]["ctr_auc"])
    text = replica.markdown(name, pooled, "cmd", averaged="folds")
    assert "| federated-dp-eps-8 | 0.6500 (+18.8 %) | 0.8500 (+5.6 %) | 1.60-2.00 |" in text
    with pytest.raises(ValueError, match="a fold appears twice"):
        replica.pool([run_file("a.json", "0/2"), run_file("c.json", "0/2")])
    with pytest.raises(ValueError, match="different datasets"):
        replica.pool([run_file("a.json", "0/2"), run_file("d.json", "1/2", dataset="reviews")])
