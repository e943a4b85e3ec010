"""The bundled real datasets, adapted onto the merchant data format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from client.data import DataValidationError, MerchantData, load_merchant, validate_merchant_dir
from client.sources.adapters import (
    ESCI_SOURCE,
    REVIEWS_SOURCE,
    esci_merchant,
    prepare_esci,
    prepare_reviews,
)

ESCI_JUDGMENTS = 1_332


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MerchantData]:
    paths = prepare_reviews(tmp_path_factory.mktemp("reviews") / "merchants")
    for path in paths:
        assert validate_merchant_dir(path) == [], path
    return {path.name: load_merchant(path) for path in paths}


@pytest.fixture(scope="module")
def esci(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MerchantData]:
    paths = prepare_esci(tmp_path_factory.mktemp("esci") / "merchants", merchants=4)
    for path in paths:
        assert validate_merchant_dir(path) == [], path
    return {path.name: load_merchant(path) for path in paths}


def test_reviews_become_one_merchant_per_department(reviews: dict[str, MerchantData]) -> None:
    assert sorted(reviews) == ["bottoms", "dresses", "intimate", "jackets", "tops", "trend"]
    source = pd.read_parquet(REVIEWS_SOURCE)
    has_department = source["Department Name"].notna()
    has_text = source["Review Text"].fillna("").str.strip() != ""
    kept = source[has_department & has_text]
    assert sum(len(m.catalog) for m in reviews.values()) == len(kept) == 23_486 - 14 - 844
    for name, merchant in reviews.items():
        expected = kept[kept["Department Name"].str.lower() == name]
        assert merchant.catalog["product_id"].tolist() == [f"r{row}" for row in expected.index]
        assert merchant.interactions is not None and merchant.judgments is None
        assert len(merchant.interactions) == len(expected)


def test_review_fields_and_labels_are_mapped(reviews: dict[str, MerchantData]) -> None:
    source = pd.read_parquet(REVIEWS_SOURCE)
    dresses = reviews["dresses"]
    assert dresses.interactions is not None
    interactions = dresses.interactions.set_index("product_id")
    catalog = dresses.catalog.set_index("product_id")
    for product_id in catalog.index[:200]:
        row = source.loc[int(product_id[1:])]
        recommended = row["Recommended IND"] == 1
        assert interactions.at[product_id, "label"] == ("purchase" if recommended else "click")
        assert interactions.at[product_id, "rating"] == float(row["Rating"])
        assert interactions.at[product_id, "user_id"] == f"reviewer-{product_id[1:]}"
        assert catalog.at[product_id, "description"] == row["Review Text"].strip()
        assert catalog.at[product_id, "category"] == row["Class Name"]
        assert catalog.at[product_id, "brand"] == "Dresses"
        title = row["Title"] if isinstance(row["Title"], str) and row["Title"].strip() else row["Class Name"]
        assert catalog.at[product_id, "title"] == title.strip()
    labels = pd.concat([m.interactions["label"] for m in reviews.values() if m.interactions is not None])
    assert set(labels) == {"purchase", "click"}


def test_reviews_log_what_was_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="client.sources.adapters"):
        prepare_reviews(tmp_path / "m", file_format="csv")
    assert "dropped 14 without a department and 844 more with blank review text; 22628 kept" in caplog.text


def test_esci_keeps_every_judgment_and_every_query_whole(esci: dict[str, MerchantData]) -> None:
    assert sorted(esci) == ["esci-0", "esci-1", "esci-2", "esci-3"]
    frames = {name: m.judgments for name, m in esci.items()}
    assert all(frame is not None for frame in frames.values())
    total = sum(len(frame) for frame in frames.values() if frame is not None)
    assert total == ESCI_JUDGMENTS
    owner: dict[str, str] = {}
    for name, frame in frames.items():
        assert frame is not None
        for query in frame["query"]:
            assert owner.setdefault(query, name) == name, f"query {query!r} split across merchants"
    assert len(owner) == 500
    source = json.loads(ESCI_SOURCE.read_text(encoding="utf-8"))
    for record in source:
        assert owner[record["query"].strip()] == f"esci-{esci_merchant(record['query_id'], 4)}"


def test_esci_catalogue_is_what_its_queries_judged(esci: dict[str, MerchantData]) -> None:
    for merchant in esci.values():
        assert merchant.judgments is not None and merchant.interactions is None
        assert set(merchant.catalog["product_id"]) == set(merchant.judgments["product_id"])
        assert merchant.catalog["title"].str.len().min() > 0
        assert set(merchant.judgments["label"]) <= {0, 1, 2, 3}


def test_esci_rule_is_crc32_of_the_query_id() -> None:
    assert esci_merchant(1750, 4) == 3  # zlib.crc32(b"1750") % 4, fixed on every machine
    assert {esci_merchant(q, 7) for q in range(200)} == set(range(7))


def test_adapters_refuse_a_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "merchants"
    out.mkdir()
    (out / "keep-me.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_esci(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare_reviews(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep-me.txt"]
    written = prepare_esci(out, merchants=2, overwrite=True)
    assert [p.name for p in written] == ["esci-0", "esci-1"]
    assert (out / "keep-me.txt").read_text() == "mine"
    prepare_esci(out, merchants=2, overwrite=True)  # again: replaces its own merchants


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    source = tmp_path / "esci.json"
    products = [{"product_id": "A", "product_text": "Mug", "relevance": 7}]
    bad = [{"query_id": 1, "query": "mug", "products": products}]
    source.write_text(json.dumps(bad), encoding="utf-8")
    out = tmp_path / "merchants"
    with pytest.raises(DataValidationError, match="7 is not an integer grade 0..3"):
        prepare_esci(out, source=source, merchants=1)
    assert list(out.iterdir()) == []


def test_esci_source_errors_name_the_record(tmp_path: Path) -> None:
    source = tmp_path / "esci.json"
    source.write_text(json.dumps([{"query_id": 1, "query": "mug", "products": [{"product_id": "A"}]}]))
    with pytest.raises(ValueError, match=r"query #0 \(query_id 1\), product #0 has no field 'product_text'"):
        prepare_esci(tmp_path / "out", source=source)
