"""Pooling utility-benchmark runs over held-out splits: per-split figures, their mean, the verdict."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from shared.tasks import Example

ROOT = Path(__file__).resolve().parents[2]


def _results(tmp_path: Path, name: str, seed: int | None, figures: dict[str, tuple[float, float]],
             trainable: str = "heads", fold: str | None = None,
             merchants: dict[str, dict[str, dict[str, float]]] | None = None) -> Path:
    """A utility.py results file for ESCI: arm -> (NDCG@10, MRR). ``seed`` None: a run from
    before ``--split-seed`` (its split only in the scenario config). ``merchants``: arm ->
    merchant -> its figures (default: one merchant, ``esci-0``, at the macro figures)."""
    arms = {arm: {"macro": {"relevance_ndcg@10": ndcg, "relevance_mrr": mrr},
                  "per_merchant": {"esci-0": {"relevance_ndcg@10": ndcg, "relevance_mrr": mrr}}}
            for arm, (ndcg, mrr) in figures.items()}
    for arm, by_merchant in (merchants or {}).items():
        arms[arm]["per_merchant"] = by_merchant
    dataset: dict[str, Any] = {"arms": arms, "repeats": 3, "config": {"split-seed": 0},
                               "merchants": list(next(iter(arms.values()))["per_merchant"]),
                               "test_queries": {"esci-0": 5, "esci-1": 6}}
    if seed is not None:
        dataset["split_seed"] = seed
    if fold is not None:
        dataset["fold"] = fold
    path = tmp_path / name
    path.write_text(json.dumps({"trainable": trainable, "encoder": "minilm", "datasets": {"esci": dataset}}))
    return path


SPLIT_0 = {"centralised": (0.80, 0.90), "local": (0.70, 0.85), "federated": (0.75, 0.88),
           "federated-dp-eps-8": (0.78, 0.84)}
SPLIT_1 = {"centralised": (0.70, 0.90), "local": (0.72, 0.85), "federated": (0.70, 0.86),
           "federated-dp-eps-8": (0.68, 0.90)}


def test_each_arm_is_the_mean_over_splits_and_the_target_is_judged_on_it(splits: ModuleType,
                                                                         tmp_path: Path) -> None:
    runs = splits.load_runs([_results(tmp_path, "a.json", None, SPLIT_0), _results(tmp_path, "b.json", 1, SPLIT_1)])
    esci = splits.pool(runs)["esci"]
    assert esci["splits"] == ["0", "1"]  # the older run's split read from its scenario
    assert esci["per_split"]["centralised"]["relevance_ndcg@10"] == [0.80, 0.70]
    assert esci["mean"]["federated-dp-eps-8"]["relevance_ndcg@10"] == pytest.approx(0.73)
    ndcg, mrr = esci["verdict"]["relevance_ndcg@10"], esci["verdict"]["relevance_mrr"]
    # NDCG@10: mean 0.73 against 0.75 centralised (+2.7 %, within 5 %) and 0.71 alone (better);
    # split 0 alone is within 5 % (+2.5 %), split 1 too (+2.9 %); split 1 is below its local arm.
    assert ndcg["gap_vs_centralised"] == pytest.approx(0.02 / 0.75)
    assert ndcg["within_5pct_of_centralised"] and ndcg["better_than_local"]
    assert ndcg["gap_vs_centralised_per_split"] == [pytest.approx(0.02 / 0.80), pytest.approx(0.02 / 0.70)]
    assert ndcg["splits_within_5pct"] == 2 and ndcg["splits_better_than_local"] == 1
    # MRR: mean 0.87 against 0.90 (+3.3 %) and 0.85 alone; split 0 (0.84) misses by 6.7 %.
    assert mrr["gap_vs_centralised"] == pytest.approx(0.03 / 0.90)
    assert mrr["splits_within_5pct"] == 1 and mrr["splits_better_than_local"] == 1

    # Every arm's mean gap to centralised, not only the judged one's.
    assert esci["gap_vs_centralised"]["local"]["relevance_ndcg@10"] == pytest.approx(0.04 / 0.75)
    assert esci["gap_vs_centralised"]["centralised"]["relevance_mrr"] == 0.0

    text = splits.markdown({"esci": esci})
    row = next(line for line in text.splitlines() if line.startswith("| federated-dp-eps-8 | relevance_ndcg@10 |"))
    assert "| 0.7800 | 0.6800 | **0.7300** | +2.7 % |" in row
    verdict = next(line for line in text.splitlines() if line.startswith("| relevance_mrr | +3.3 %"))
    assert "| 1 / 2 |" in verdict and "+6.7 / +1.2" in verdict
    splits.plot({"esci": esci}, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_each_merchant_is_its_mean_over_the_splits_that_score_it_and_the_worst_is_named(
        splits: ModuleType, tmp_path: Path) -> None:
    """Per merchant: the mean over splits of each arm's figure, skipping a split where the
    merchant had no informative query; the worst merchant's gap to centralised is named."""
    def figures(a: tuple[float, float], b: tuple[float, float] | None) -> dict[str, dict[str, float]]:
        out = {"a": {"relevance_ndcg@10": a[0], "relevance_mrr": a[1]}, "b": {}}
        if b is not None:
            out["b"] = {"relevance_ndcg@10": b[0], "relevance_mrr": b[1]}
        return out

    split_0 = {arm: figures((0.8, 0.9), (0.6, 0.8)) for arm in SPLIT_0}
    split_0["federated-dp-eps-8"] = figures((0.8, 0.9), (0.54, 0.7))
    split_1 = {arm: figures((0.7, 0.9), None) for arm in SPLIT_1}  # b: nothing to rank here
    split_1["federated-dp-eps-8"] = figures((0.77, 0.9), None)
    runs = splits.load_runs([_results(tmp_path, "a.json", 0, SPLIT_0, merchants=split_0),
                             _results(tmp_path, "b.json", 1, SPLIT_1, merchants=split_1)])
    esci = splits.pool(runs)["esci"]
    dp, central = esci["per_merchant"]["federated-dp-eps-8"], esci["per_merchant"]["centralised"]
    assert dp["a"]["relevance_ndcg@10"] == pytest.approx(0.785)
    assert central["a"]["relevance_ndcg@10"] == pytest.approx(0.75)
    assert dp["b"] == {"relevance_ndcg@10": 0.54, "relevance_mrr": 0.7}  # split 0 only
    ndcg, mrr = esci["verdict"]["relevance_ndcg@10"], esci["verdict"]["relevance_mrr"]
    assert ndcg["per_merchant_gap_vs_centralised"] == {"a": pytest.approx(-0.035 / 0.75), "b": pytest.approx(0.1)}
    assert (ndcg["worst_merchant"], ndcg["worst_merchant_gap"]) == ("b", pytest.approx(0.1))
    assert (mrr["worst_merchant"], mrr["worst_merchant_gap"]) == ("b", pytest.approx(0.125))

    text = splits.markdown({"esci": esci})
    row = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert row.startswith("| b | 0.5400 / 0.7000 | 0.6000 / 0.8000 |") and row.endswith("| +10.0 % / +12.5 % |")
    verdict = next(line for line in text.splitlines() if line.startswith("| relevance_mrr |"))
    assert "| b (+12.5 %) |" in verdict


def test_runs_that_cannot_be_pooled_are_refused_with_the_file_named(splits: ModuleType, tmp_path: Path) -> None:
    a = _results(tmp_path, "a.json", 0, SPLIT_0)
    with pytest.raises(ValueError, match="b.json: esci split 0 is already in .*a.json"):
        splits.load_runs([a, _results(tmp_path, "b.json", None, SPLIT_1)])
    with pytest.raises(ValueError, match="'trainable'.*c.json: lora"):
        splits.load_runs([a, _results(tmp_path, "c.json", 2, SPLIT_1, trainable="lora")])
    with pytest.raises(ValueError, match="at least two"):
        splits.load_runs([a])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: cannot read"):
        splits.load_runs([a, broken])
    no_dp = {k: v for k, v in SPLIT_1.items() if k != "federated-dp-eps-8"}
    runs = splits.load_runs([a, _results(tmp_path, "d.json", 3, no_dp)])
    with pytest.raises(ValueError, match="federated-dp-eps-8 missing from .*d.json"):
        splits.pool(runs)


def test_a_split_seed_holds_out_other_queries_for_every_arm_and_the_simulations(splits: ModuleType,
                                                                                 tmp_path: Path) -> None:
    """``--split-seed``: the benchmark's own split and the scenario its simulations read agree."""
    utility = splits.utility
    held_out = {}
    for seed in (None, 5):
        dataset = utility.Dataset("esci", tmp_path / str(seed), encoder="tiny", quick=True,
                                  setting=utility.SETTINGS["heads"], split_seed=seed)
        assert dataset.config.split_seed == (0 if seed is None else 5)
        assert dataset.scenario.get("split-seed") == seed
        held_out[seed] = {e.group for s in dataset.splits.values() for e in s.test}
        train = {e.group for s in dataset.splits.values() for e in s.train}
        assert held_out[seed] and not held_out[seed] & train  # whole queries on one side
    assert held_out[None] != held_out[5]


def test_folds_hold_out_every_query_once_for_every_arm_and_the_simulations(splits: ModuleType,
                                                                          tmp_path: Path) -> None:
    """``--fold k/K``: K runs hold out disjoint query sets that together are every query."""
    utility = splits.utility
    trained_on = []
    for k in range(3):
        fold = utility.Fold.parse(f"{k}/3")
        dataset = utility.Dataset("esci", tmp_path / str(k), encoder="tiny", quick=True,
                                  setting=utility.SETTINGS["heads"], fold=fold)
        assert dataset.scenario["test-offset"] == dataset.config.test_offset == k / 3
        assert dataset.scenario["test-fraction"] == dataset.config.test_fraction == 1 / 3
        held_out = {e.group for s in dataset.splits.values() for e in s.test}
        trained_on.append({e.group for s in dataset.splits.values() for e in s.train})
        assert held_out and not held_out & trained_on[-1]
    # (--quick caps the held-out sets, never the training sets: count on the training side.)
    queries = set().union(*trained_on)
    assert all(sum(q not in train for train in trained_on) == 1 for q in queries)  # held out exactly once


@pytest.mark.parametrize("text", ["3/3", "1", "a/b", "0/1", "-1/3"])
def test_a_bad_fold_is_refused_with_its_value(splits: ModuleType, text: str) -> None:
    with pytest.raises(ValueError, match=f"fold {text!r}"):
        splits.utility.Fold.parse(text)


def test_the_same_fold_twice_is_refused_but_other_folds_pool(splits: ModuleType, tmp_path: Path) -> None:
    a = _results(tmp_path, "a.json", 0, SPLIT_0, fold="0/3")
    with pytest.raises(ValueError, match="b.json: esci split 0 fold 0/3 is already in .*a.json"):
        splits.load_runs([a, _results(tmp_path, "b.json", 0, SPLIT_1, fold="0/3")])
    runs = splits.load_runs([a, _results(tmp_path, "c.json", 0, SPLIT_1, fold="1/3")])
    assert splits.pool(runs)["esci"]["splits"] == ["0 fold 0/3", "0 fold 1/3"]


def test_runs_of_other_datasets_or_splits_write_other_files(splits: ModuleType, tmp_path: Path) -> None:
    """A reviews run on split 1 must not overwrite the ESCI run on split 1, nor either the full run."""
    stem = splits.utility.output_stem
    names = {stem(tmp_path, "heads", ["esci", "reviews"], None).name,
             stem(tmp_path, "heads", ["reviews", "esci"], None).name,
             stem(tmp_path, "heads", ["esci"], 1).name, stem(tmp_path, "heads", ["reviews"], 1).name,
             stem(tmp_path, "heads", ["esci"], None).name, stem(tmp_path, "lora", ["esci"], 1).name,
             stem(tmp_path, "heads", ["esci"], None, splits.utility.Fold(1, 3)).name,
             stem(tmp_path, "heads", ["reviews"], None, splits.utility.Fold(0, 5), {"max-grad-norm": 1.25}).name,
             stem(tmp_path, "heads", ["esci"], None, None, {"precondition-corpus": "/a b/c.txt"}).name}
    assert names == {"utility-heads", "utility-heads-esci-split1", "utility-heads-reviews-split1",
                     "utility-heads-esci", "utility-esci-split1", "utility-heads-esci-fold1of3",
                     "utility-heads-reviews-max-grad-norm-1.25-fold0of5",
                     "utility-heads-esci-precondition-corpus-_a_b_c.txt"}
    # The files keep the whole stem, dots and all: the folds of a --set run write apart.
    folds = [stem(tmp_path, "heads", ["reviews"], None, splits.utility.Fold(k, 5), {"max-grad-norm": 1.25})
             for k in range(2)]
    assert {splits.utility.with_extension(f, ".json").name for f in folds} == {
        f"utility-heads-reviews-max-grad-norm-1.25-fold{k}of5.json" for k in range(2)}


def test_set_keys_reach_every_arm_and_runs_with_other_keys_are_not_pooled(splits: ModuleType,
                                                                           tmp_path: Path) -> None:
    """``--set``: the key reaches the config and the scenario the simulations read; pooling
    refuses to mix runs made with different keys, naming the files."""
    utility = splits.utility
    setting = utility.with_overrides(utility.SETTINGS["heads"], {"max-grad-norm": 0.7})
    assert utility.SETTINGS["heads"].overrides.get("max-grad-norm") is None  # the shared setting untouched
    dataset = utility.Dataset("esci", tmp_path / "d", encoder="tiny", quick=True, setting=setting)
    assert dataset.config.max_grad_norm == 0.7 and dataset.scenario["max-grad-norm"] == 0.7
    assert dataset.config.batch_size == 1024  # the setting's own keys stay

    plain = _results(tmp_path, "a.json", 0, SPLIT_0)
    varied = _results(tmp_path, "b.json", 1, SPLIT_1)
    data = json.loads(varied.read_text())
    varied.write_text(json.dumps({**data, "set": {"max-grad-norm": 0.7}}))
    with pytest.raises(ValueError, match=r"'set'.*b.json: \{'max-grad-norm': 0.7\}"):
        splits.load_runs([plain, varied])
    same = _results(tmp_path, "c.json", 2, SPLIT_1)
    same.write_text(json.dumps({**json.loads(same.read_text()), "set": {}}))  # no keys = a run from before --set
    assert len(splits.load_runs([plain, same])) == 2


def test_private_keys_reach_the_dp_arms_alone_and_runs_with_other_ones_are_not_pooled(splits: ModuleType,
                                                                                      tmp_path: Path) -> None:
    """``Setting.private`` (and ``--set-private``): on top of the setting in the DP arms' keys
    and config only; a ``--set`` key the private arms also set replaces theirs too."""
    utility = splits.utility
    setting = utility.with_overrides(utility.SETTINGS["heads"], {}, {"weight-decay": 0.2})
    dataset = utility.Dataset("esci", tmp_path / "d", encoder="tiny", quick=True, setting=setting)
    assert dataset.config.weight_decay == 0.0 and "weight-decay" not in dataset.scenario  # non-private arms
    keys = dataset.private_keys(3.0, calls=8)  # what a DP simulation gets as --set keys
    assert keys["weight-decay"] == 0.2 and keys["clipping"] == "flat"
    assert keys["dp"] is True and keys["target-epsilon"] == 3.0 and keys["noise-plan-calls"] == 8
    private = dataset.private_config(3.0, calls=1)  # the centralised private arm's config
    assert private.dp and private.weight_decay == 0.2 and private.noise_plan_calls == 1
    assert private.batch_size == dataset.config.batch_size == 1024  # the setting's own keys stay
    assert utility.SETTINGS["heads"].private.get("weight-decay") != 0.2  # the shared setting untouched
    everywhere = utility.with_overrides(utility.SETTINGS["heads"], {"clipping": "heads-apart"})
    assert everywhere.private["clipping"] == everywhere.overrides["clipping"] == "heads-apart"
    # A dataset's own private keys go on top of the setting's, for that dataset's DP arms only.
    per_dataset = dataclasses.replace(utility.SETTINGS["heads"], dataset_private={"esci": {"weight-decay": 0.3},
                                                                                 "reviews": {"weight-decay": 0.4}})
    esci = utility.Dataset("esci", tmp_path / "p", encoder="tiny", quick=True, setting=per_dataset)
    assert esci.private == {"clipping": "flat", "weight-decay": 0.3} and esci.config.weight_decay == 0.0
    assert utility.with_overrides(per_dataset, {}, {"weight-decay": 0.2}).dataset_private == {
        "esci": {"weight-decay": 0.2}, "reviews": {"weight-decay": 0.2}}  # --set-private wins everywhere
    with pytest.raises(utility.ConfigError, match="'weight-decay' = -1"):
        utility.Dataset("esci", tmp_path / "e", encoder="tiny", quick=True,
                        setting=utility.with_overrides(utility.SETTINGS["heads"], {}, {"weight-decay": -1}))
    stem = utility.output_stem(tmp_path, "heads", ["esci"], None, utility.Fold(1, 3), {}, {"weight-decay": 0.2})
    assert stem.name == "utility-heads-esci-private-weight-decay-0.2-fold1of3"

    plain = _results(tmp_path, "a.json", 0, SPLIT_0)
    varied = _results(tmp_path, "b.json", 1, SPLIT_1)
    private = {"clipping": "flat", "weight-decay": 0.2}
    varied.write_text(json.dumps({**json.loads(varied.read_text()), "private": private}))
    with pytest.raises(ValueError, match=r"'private'.*b.json: \{'clipping': 'flat', 'weight-decay': 0.2\}"):
        splits.load_runs([plain, varied])


@pytest.mark.parametrize("pair, message", [("max-grad-norm", "expected KEY=VALUE"),
                                           ("no-such-key=1", "unknown run-config key 'no-such-key'")])
def test_a_bad_set_is_refused_with_its_key(pair: str, message: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "utility.py"), "--trainable", "heads",
                           "--datasets", "esci", "--encoder", "tiny", "--quick", "--set", pair,
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_folds_with_their_held_out_predictions_get_a_pooled_interval(splits: ModuleType, tmp_path: Path) -> None:
    """Two folds, each with its held-out predictions: the pooled gaps carry the interval of the
    pooled bootstrap; without one fold's predictions there is no interval, and the report says why."""
    utility = splits.utility
    examples = [Example(task="relevance", context=q, product=f"{q}-{j}", target=g, group=q)
                for q in ("q0", "q1", "q2") for j, g in enumerate((3.0, 0.0))]
    right = {"esci-0": np.array([2.0, 0.0, 2.0, 0.0, 2.0, 0.0])}
    backwards = {"esci-0": np.array([0.0, 2.0, 0.0, 2.0, 0.0, 2.0])}
    paths = []
    for k, dp in enumerate((right, backwards)):
        path = _results(tmp_path, f"fold{k}.json", 0, SPLIT_0, fold=f"{k}/2")
        held = utility.HeldOut.of({"esci-0": examples}, {utility.JUDGED_ARM: [dp], "centralised": [right],
                                                         "local": [right]})
        utility.write_held_out(utility.held_out_path(path.with_suffix("")), {"esci": held})
        paths.append(path)
    verdict = splits.pool(splits.load_runs(paths))["esci"]["verdict"]["relevance_mrr"]
    # Fold 0 ranks like centralised, fold 1 puts every relevant product second (MRR 0.5): every
    # resample's pooled MRR is (1 + 0.5) / 2 against 1, a gap of 0.25 exactly.
    assert verdict["gap_vs_centralised_ci95"] == [pytest.approx(0.25), pytest.approx(0.25)]
    assert verdict["gap_vs_local_ci95"] == [pytest.approx(0.25), pytest.approx(0.25)]
    assert "| relevance_mrr | " in (text := splits.markdown({"esci": splits.pool(splits.load_runs(paths))["esci"]}))
    assert "[+25.0, +25.0]" in text

    utility.held_out_path(paths[1].with_suffix("")).unlink()
    pooled = splits.pool(splits.load_runs(paths))
    assert pooled["esci"]["verdict"]["relevance_mrr"]["gap_vs_centralised_ci95"] is None
    assert "No pooled interval" in splits.markdown(pooled)


def test_a_damaged_held_out_file_is_refused_with_its_path(splits: ModuleType, tmp_path: Path) -> None:
    paths = [_results(tmp_path, f"fold{k}.json", 0, SPLIT_0, fold=f"{k}/2") for k in range(2)]
    for path in paths:
        splits.utility.held_out_path(path.with_suffix("")).write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"fold0\.heldout\.json\.gz: cannot read esci's held-out predictions"):
        splits.pool(splits.load_runs(paths))


def test_the_centralised_private_arm_spends_its_budget_once_in_a_fresh_state(splits: ModuleType,
                                                                            tmp_path: Path) -> None:
    """``centralised-dp-eps-E``: DP-SGD on every merchant's records as one learner, its σ planned
    for the whole run and its spend recorded, within ε, in a privacy state of its own."""
    from shared.model import ModelSpec, build_model, get_trainable
    from shared.privacy.budget import PrivacyState
    from shared.tasks import count_records

    utility = splits.utility
    dataset = utility.Dataset("esci", tmp_path / "w", encoder="tiny", quick=True, setting=utility.SETTINGS["heads"])
    state = tmp_path / "privacy" / "central.json"
    params, notes = utility.train_private(dataset, dataset.merchants, steps=4, epsilon=3.0, state=state)
    untrained = get_trainable(build_model(ModelSpec.from_config(dataset.config)))
    assert any(not np.array_equal(params[k], untrained[k]) for k in params)

    name = "+".join(dataset.merchants)
    recorded = PrivacyState.open(state, merchant_id=name, target_epsilon=3.0, target_delta=dataset.config.target_delta)
    [event] = recorded.events
    records = count_records([e for m in dataset.merchants for e in dataset.splits[m].train])
    assert event.steps == 4 and event.sample_rate == 1.0 / math.ceil(records / dataset.config.batch_size)
    assert event.noise_multiplier == notes["noise_multiplier"][name] >= utility.NOISE_FLOOR
    # One call planned to fill the budget: it spends most of ε and never more.
    assert notes["epsilon_spent"][name] == pytest.approx(recorded.epsilon())
    assert 0.5 * 3.0 < notes["epsilon_spent"][name] <= 3.0
    with pytest.raises(FileExistsError, match="central.json"):
        utility.train_private(dataset, dataset.merchants, steps=4, epsilon=3.0, state=state)
