"""The utility benchmark's paired bootstrap: the interval it reports for an arm's gap to a reference."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from shared.tasks import Example


def _ctr(n: int, seed: int) -> tuple[list[Example], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(float)
    return [Example(task="ctr", context="", product=f"p{i}", target=y) for i, y in enumerate(labels)], labels


def _arm(utility: ModuleType, name: str, *preds: dict[str, np.ndarray]) -> object:
    """An arm with one repeat per ``preds`` (each: merchant -> per-example predictions)."""
    return utility.Arm(name, runs=[{} for _ in preds], seconds=0.0, preds=list(preds))


def test_identical_arms_have_a_zero_gap_in_every_resample(utility: ModuleType) -> None:
    tests = {"a": _ctr(80, 0)[0], "b": _ctr(50, 1)[0]}
    rng = np.random.default_rng(2)
    preds = {m: rng.random(len(t)) for m, t in tests.items()}
    ci = utility.bootstrap_gaps(tests, _arm(utility, "x", preds), _arm(utility, "ref", preds),
                                ("ctr_auc", "ctr_logloss"), resamples=50)
    assert ci == {"ctr_auc": [0.0, 0.0], "ctr_logloss": [0.0, 0.0]}


def test_a_clearly_worse_arm_has_an_interval_above_zero_and_a_small_test_set_a_wider_one(utility: ModuleType) -> None:
    rng = np.random.default_rng(3)

    def interval(n: int) -> list[float]:
        examples, labels = _ctr(n, 4)
        good = np.clip(labels * 0.6 + 0.2 + rng.normal(0, 0.15, n), 0.01, 0.99)  # informative
        noise = rng.random(n)  # uninformative
        return utility.bootstrap_gaps({"m": examples}, _arm(utility, "x", {"m": noise}),
                                      _arm(utility, "ref", {"m": good}), ("ctr_auc",), resamples=200)["ctr_auc"]

    small, large = interval(40), interval(400)
    assert 0 < large[0] < large[1]  # worse AUC: positive gap, and the whole interval says so
    assert large[1] - large[0] < small[1] - small[0]


def test_relevance_resamples_whole_queries(utility: ModuleType) -> None:
    # Two queries; the arm ranks query q0 perfectly and q1 backwards. Any resample holds whole
    # queries, so every resampled MRR is an average of 1.0 and 0.5 values: never a broken query.
    examples = [Example(task="relevance", context=q, product=f"{q}-{j}", target=g, group=q)
                for q in ("q0", "q1") for j, g in enumerate((3.0, 0.0))]
    arm = np.array([2.0, 0.0, 0.0, 2.0])  # q0: relevant first; q1: relevant second
    ref = np.array([2.0, 0.0, 2.0, 0.0])  # both relevant first: MRR 1
    units = utility.HeldOut.of({"m": examples}, {}).units("m")
    assert sorted(map(list, units)) == [[0, 1], [2, 3]]
    ci = utility.bootstrap_gaps({"m": examples}, _arm(utility, "x", {"m": arm}), _arm(utility, "ref", {"m": ref}),
                                ("relevance_mrr",), resamples=200)["relevance_mrr"]
    # Gap = 1 - MRR(arm) with MRR over two drawn queries in {1.0, 0.75, 0.5}: gaps 0, 0.25, 0.5.
    assert ci[0] == pytest.approx(0.0) and ci[1] == pytest.approx(0.5)


def test_an_arm_with_repeats_is_scored_on_the_mean_of_its_repeats(utility: ModuleType) -> None:
    """Two repeats, one as good as the reference and one uninformative: on every resample the
    arm's AUC is their mean, so its gap lies between the gaps of each repeat alone."""
    rng = np.random.default_rng(5)
    examples, labels = _ctr(300, 6)
    good = np.clip(labels * 0.6 + 0.2 + rng.normal(0, 0.15, 300), 0.01, 0.99)
    noise = rng.random(300)
    tests, ref = {"m": examples}, _arm(utility, "ref", {"m": good})

    def interval(*runs: np.ndarray) -> list[float]:
        arm = _arm(utility, "x", *({"m": r} for r in runs))
        return utility.bootstrap_gaps(tests, arm, ref, ("ctr_auc",), resamples=100)["ctr_auc"]

    alone_good, alone_noise, both = interval(good), interval(noise), interval(good, noise)
    assert alone_good == [0.0, 0.0]
    assert 0 < both[0] < alone_noise[0] and both[1] < alone_noise[1]


def test_an_arms_figures_are_the_mean_over_repeats_with_each_repeat_kept(utility: ModuleType) -> None:
    runs = [{"a": {"ctr_auc": 0.8}, "b": {"ctr_auc": 0.6}}, {"a": {"ctr_auc": 0.9}, "b": {"ctr_auc": 0.7}}]
    arm = utility.Arm("x", runs=runs, seconds=0.0)
    assert arm.per_merchant == {"a": {"ctr_auc": pytest.approx(0.85)}, "b": {"ctr_auc": pytest.approx(0.65)}}
    assert arm.run_macros("ctr_auc") == [pytest.approx(0.7), pytest.approx(0.8)]
    assert arm.macro("ctr_auc") == pytest.approx(0.75)
    assert utility._spread(arm.run_macros("ctr_auc")) == " (0.700-0.800)"
    assert utility._spread([0.7]) == ""


def test_the_report_gives_each_arms_spread_and_how_many_dp_runs_meet_the_target(utility: ModuleType,
                                                                                 tmp_path: Path) -> None:
    """From repeats to the Markdown table, the verdict and the plot: the mean with the lowest and
    highest run, σ over every repeat, the target judged on the mean and counted per run."""
    merchants = ("a", "b")

    def arm(values: list[float], sigmas: list[float] | None = None) -> object:
        runs = [{m: {"ctr_auc": v} for m in merchants} for v in values]
        notes = {} if sigmas is None else {"per_repeat": [{"noise_multiplier": {"a": s, "b": 2 * s}}
                                                          for s in sigmas]}
        return utility.Arm("x", runs=runs, seconds=1.0, notes=notes)

    arms = {"untrained": arm([0.5]), "centralised": arm([0.90, 0.90]), "local": arm([0.80, 0.82]),
            # Three equal runs: their mean lies a rounding error below 0.7, which the plot's bar
            # from the lowest run must not turn into a (refused) negative length.
            "federated": arm([0.7, 0.7, 0.7]), "federated-dp-eps-8": arm([0.88, 0.84], sigmas=[1.0, 1.5])}
    result = {"merchants": list(merchants), "repeats": 2, "train_records": {"a": 10, "b": 20},
              "test_examples": {"a": 5, "b": 6},
              "arms": {name: {"seconds": a.seconds, "notes": a.notes, "per_merchant": a.per_merchant,
                              "macro": {"ctr_auc": a.macro("ctr_auc")},
                              "macro_runs": {"ctr_auc": a.run_macros("ctr_auc")}} for name, a in arms.items()},
              "cold_start": {"held_out_merchant": "b", "epsilon": 8.0, **{k: {"ctr_auc": 0.7} for k in (
                  "untrained", "metrics_federated", "metrics", "federated_with_it", "dp_with_it", "local")},
                             "runs": [{"ctr_auc": 0.65}, {"ctr_auc": 0.75}]}}
    original = dict(utility.HEADLINE)
    utility.HEADLINE["toy"] = ("ctr_auc",)
    try:
        result["verdict"] = utility.judge("toy", result)
        verdict = result["verdict"]["metrics"]["ctr_auc"]
        # Mean 0.86 against 0.90: 4.4 % worse, within 5 %; alone, the second run (0.84) is not.
        assert verdict["gap_vs_centralised"] == pytest.approx(0.04 / 0.90)
        assert verdict["within_5pct_of_centralised"] and verdict["better_than_local"]
        assert verdict["gap_vs_centralised_runs"] == [pytest.approx(0.02 / 0.90), pytest.approx(0.06 / 0.90)]
        results = {"machine": "test", "encoder": "tiny", "trainable": "heads", "total_seconds": 60.0,
                   "command": "utility.py", "datasets": {"toy": result}}
        text = utility.markdown(results)
        utility.plot(results, tmp_path / "u.png")
    finally:
        utility.HEADLINE.clear()
        utility.HEADLINE.update(original)
    row = next(line for line in text.splitlines() if line.startswith("| federated-dp-eps-8 |"))
    assert "0.8600 (0.840-0.880)" in row and "1.00-3.00" in row  # σ over both repeats, both merchants
    verdict_row = next(line for line in text.splitlines() if line.startswith("| ctr_auc | +4.4 %"))
    assert "| 1 / 2 |" in verdict_row
    # Cold start: the DP federation without `b` ran twice (its spread shown); the rest once.
    cold_rows = [line for line in text.splitlines() if "without it" in line]
    assert cold_rows[0].endswith("| 0.7000 |") and cold_rows[1].endswith("| 0.7000 (0.650-0.750) |")
    assert (tmp_path / "u.png").stat().st_size > 0


def test_the_public_corpus_is_the_other_shops_text_and_reads_as_one(utility: ModuleType, tmp_path: Path) -> None:
    """The reviews federation's preconditioning corpus (the benchmark's and the default
    scenario's, ``bundled:esci``): every ESCI query-product text, once each; written as a file,
    it reads back as the same pairs; none of it is a reviews record."""
    from client.precondition import read_corpus
    from tests.helpers.heads import write_public_corpus

    assert utility.SETTINGS["heads"].public_corpus == {"reviews": "esci"}
    pairs = read_corpus("bundled:esci")
    assert len(pairs) > 1000 and len(set(pairs)) == len(pairs)
    assert sum(1 for c, _ in pairs if c) > 0.9 * len(pairs)  # queries with their products
    assert all("\t" not in c and "\t" not in p and "\n" not in p for c, p in pairs)
    assert read_corpus(write_public_corpus("esci", tmp_path / "esci.txt")) == pairs
    reviews = {p for _, p in read_corpus("bundled:reviews")}
    assert reviews and not reviews & {p for _, p in pairs}
    with pytest.raises(ValueError, match="ships esci, reviews.*'imdb'"):
        read_corpus("bundled:imdb")


def test_a_pooled_interval_is_on_the_mean_over_splits_and_survives_its_file(utility: ModuleType,
                                                                             tmp_path: Path) -> None:
    """Split 1: the arm ranks like the reference (MRR 1 everywhere); split 2: it ranks one of two
    queries backwards. Pooled, each resample's arm MRR is (1 + MRR on split 2) / 2 against 1, so
    the gap takes the values 0, 0.125 and 0.25 only (half split 2's alone: 0, 0.25, 0.5)."""
    examples = [Example(task="relevance", context=q, product=f"{q}-{j}", target=g, group=q)
                for q in ("q0", "q1") for j, g in enumerate((3.0, 0.0))]
    right, backwards = np.array([2.0, 0.0, 2.0, 0.0]), np.array([2.0, 0.0, 0.0, 2.0])
    split1 = utility.HeldOut.of({"m": examples}, {"dp": [{"m": right}], "central": [{"m": right}]})
    split2 = utility.HeldOut.of({"m": examples}, {"dp": [{"m": backwards}], "central": [{"m": right}]})
    alone = utility.pooled_bootstrap_gaps([split2], "dp", "central", ("relevance_mrr",), resamples=200)
    pooled = utility.pooled_bootstrap_gaps([split1, split2], "dp", "central", ("relevance_mrr",), resamples=200)
    assert alone["relevance_mrr"] == [pytest.approx(0.0), pytest.approx(0.5)]
    assert pooled["relevance_mrr"] == [pytest.approx(0.0), pytest.approx(0.25)]
    # What a run writes beside its results (JSON) gives the same interval back.
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(split2.to_json()))
    again = utility.HeldOut.from_json(json.loads(path.read_text()))
    assert utility.pooled_bootstrap_gaps([split1, again], "dp", "central", ("relevance_mrr",),
                                         resamples=200) == pooled
