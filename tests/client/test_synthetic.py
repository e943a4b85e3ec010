"""The synthetic federation: deterministic, lazy, non-IID, valid, and learnable."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from client.data import MerchantData, build_examples, load_merchant, split_examples, validate_merchant_dir
from client.sources.synthetic import SyntheticFederation, planted_quality, purchase_probability, write_merchants
from shared.tasks import Example


def assert_same(a: MerchantData, b: MerchantData) -> None:
    assert a.merchant_id == b.merchant_id
    pd.testing.assert_frame_equal(a.catalog, b.catalog)
    for left, right in ((a.interactions, b.interactions), (a.judgments, b.judgments)):
        assert (left is None) == (right is None)
        if left is not None and right is not None:
            pd.testing.assert_frame_equal(left, right)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties given their average rank."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper_matches_hand_computed_values() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5


def test_same_seed_same_merchant_and_merchants_differ() -> None:
    first, again = SyntheticFederation(50, seed=7), SyntheticFederation(50, seed=7)
    assert_same(first.merchant(3), again.merchant(3))
    # Merchant i depends on (seed, i) only, not on the size of the federation.
    assert_same(first.merchant(3), SyntheticFederation(10_000, seed=7).merchant(3))
    other_seed = SyntheticFederation(50, seed=8).merchant(3)
    assert not first.merchant(3).catalog["title"].equals(other_seed.catalog["title"])
    assert not first.merchant(3).catalog["title"].equals(first.merchant(4).catalog["title"])


def test_merchants_are_not_identically_distributed() -> None:
    federation = SyntheticFederation(30, seed=0)
    profiles = [federation.profile(i) for i in range(30)]
    sizes = [p.size_factor for p in profiles]
    assert min(sizes) >= 0.5 and max(sizes) <= 2.0 and max(sizes) / min(sizes) > 2.0
    assert len({max(p.category_mix, key=p.category_mix.__getitem__) for p in profiles}) >= 4
    merchants = [federation.merchant(i) for i in range(6)]
    assert len({len(m.catalog) for m in merchants}) > 1
    rates = [(m.interactions["label"] == "purchase").mean() for m in merchants if m.interactions is not None]
    assert max(rates) - min(rates) > 0.05
    assert federation.profile(2).products == len(merchants[2].catalog)


def test_ten_thousand_merchants_are_described_not_built() -> None:
    started = time.perf_counter()
    federation = SyntheticFederation(10_000, seed=0)
    assert time.perf_counter() - started < 0.05
    assert len(federation) == 10_000
    assert federation.merchant_id(42) == "synth-00042"
    merchant = federation.merchant(9999)
    assert merchant.merchant_id == "synth-09999"
    assert len(merchant.catalog) > 0 and merchant.interactions is not None and merchant.judgments is not None
    with pytest.raises(IndexError):
        federation.merchant(10_000)


def test_interactions_have_histories_timestamps_and_queries() -> None:
    merchant = SyntheticFederation(5, seed=1).merchant(0)
    assert merchant.interactions is not None
    frame = merchant.interactions
    assert frame["timestamp"].is_monotonic_increasing
    assert frame["user_id"].value_counts().max() >= 3
    assert 0.2 < (frame["query"] != "").mean() < 0.5
    assert set(frame["label"]) == {"impression", "click", "purchase"}
    assert frame["rating"].notna().any()
    contexts = [e.context for e in build_examples(merchant, tasks=("ctr",))]
    assert any(" ; " in context for context in contexts)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_written_merchants_validate_and_load_back_identical(tmp_path: Path, fmt: Any) -> None:
    federation = SyntheticFederation(10_000, seed=3, products_per_merchant=20, interactions_per_merchant=60)
    paths = write_merchants(federation, tmp_path / "out", indices=[0, 9999], file_format=fmt)
    assert [p.name for p in paths] == ["synth-00000", "synth-09999"]
    for index, path in zip([0, 9999], paths, strict=True):
        assert validate_merchant_dir(path) == []
        assert_same(load_merchant(path), federation.merchant(index))
    with pytest.raises(FileExistsError):
        write_merchants(federation, tmp_path / "out", indices=[1])


def _words(example: Example) -> set[str]:
    title = example.product.split(" | ")[0]
    return set(re.findall(r"[a-z]+", title.lower()))


def test_planted_truth_is_learnable_from_text() -> None:
    federation = SyntheticFederation(100, seed=0)
    examples = [e for i in range(12) for e in build_examples(federation.merchant(i), tasks=("ctr",))]
    labels = np.array([e.target for e in examples])
    oracle = np.array([planted_quality(e.product.split(" | ")[0]) for e in examples])
    assert auc(oracle, labels) > 0.85

    train, test = split_examples(examples, test_fraction=0.3, seed=0)
    vocabulary = {word: i for i, word in enumerate(sorted(set().union(*(_words(e) for e in train))))}

    def features(batch: list[Example]) -> np.ndarray:
        matrix = np.zeros((len(batch), len(vocabulary) + 1))
        matrix[:, -1] = 1.0  # bias
        for row, example in enumerate(batch):
            for word in _words(example) & vocabulary.keys():
                matrix[row, vocabulary[word]] = 1.0
        return matrix

    x_train, y_train = features(train), np.array([e.target for e in train])
    weights = np.zeros(x_train.shape[1])
    for _ in range(300):  # plain gradient descent on the L2-regularised logistic loss
        predicted = 1.0 / (1.0 + np.exp(-x_train @ weights))
        weights -= 0.5 * (x_train.T @ (predicted - y_train) / len(y_train) + 1e-3 * weights)
    x_test, y_test = features(test), np.array([e.target for e in test])
    assert auc(x_test @ weights, y_test) > 0.75


def test_ratings_and_relevance_follow_the_planted_truth() -> None:
    merchants = [SyntheticFederation(20, seed=0).merchant(i) for i in range(6)]
    examples = [e for m in merchants for e in build_examples(m, tasks=("rating", "relevance"))]
    ratings = [e for e in examples if e.task == "rating"]
    quality = [planted_quality(e.product.split(" | ")[0]) for e in ratings]
    assert np.corrcoef(quality, [e.target for e in ratings])[0, 1] > 0.5
    relevance = [e for e in examples if e.task == "relevance"]
    overlap = [len(set(e.context.split()) & _words(e)) / len(e.context.split()) for e in relevance]
    assert np.corrcoef(overlap, [e.target for e in relevance])[0, 1] > 0.5


def test_purchase_probability_describes_the_generated_labels() -> None:
    federation = SyntheticFederation(40, seed=2)
    expected, observed = [], []
    for i in range(10):
        merchant, offset = federation.merchant(i), federation.profile(i).click_offset
        assert merchant.interactions is not None
        titles = dict(zip(merchant.catalog["product_id"], merchant.catalog["title"], strict=True))
        searchless = merchant.interactions[merchant.interactions["query"] == ""]
        for product_id, label in zip(searchless["product_id"], searchless["label"], strict=True):
            expected.append(purchase_probability(titles[product_id], click_offset=offset))
            observed.append(label == "purchase")
    assert abs(np.mean(expected) - np.mean(observed)) < 0.03
