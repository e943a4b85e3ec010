"""``fedshop rank`` / ``fedshop recommend`` on a tiny exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.data import DataValidationError
from client.serving import rank, recommend, score_pairs
from shared.model import ModelSpec, build_model, export_model, load_tokenizer
from simulations.cli import main

CATALOG = """product_id,title,category,brand
p1,Red wool scarf,apparel,Acme
p2,Steel kettle,kitchen,Brewco
p3,Blue cotton scarf,apparel,Acme
p4,Ceramic mug,kitchen,
p5,Leather gloves,apparel,Handly
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec(encoder="tiny", trainable="lora", dropout=0.0)
    model = build_model(spec)
    with torch.no_grad():  # distinct, non-trivial scores per product
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return export_model(model, load_tokenizer(spec), tmp_path_factory.mktemp("m") / "model", spec=spec)


@pytest.fixture()
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.csv"
    path.write_text(CATALOG)
    return path


def test_rank_orders_the_catalogue_by_relevance_score(model_dir: Path, catalog: Path) -> None:
    results = rank(model_dir, catalog, "warm scarf", k=10)
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 3.0 for s in scores)  # expected grade
    # The same scores as scoring every (query, product) pair directly.
    texts = {"p1": "Red wool scarf | apparel | Acme", "p2": "Steel kettle | kitchen | Brewco",
             "p3": "Blue cotton scarf | apparel | Acme", "p4": "Ceramic mug | kitchen",
             "p5": "Leather gloves | apparel | Handly"}
    direct = score_pairs(model_dir, contexts=["warm scarf"] * 5, products=list(texts.values()), task="relevance")
    expected_order = [list(texts)[i] for i in np.argsort(-direct, kind="stable")]
    assert [r.product_id for r in results] == expected_order
    assert len(rank(model_dir, catalog, "warm scarf", k=2)) == 2


def test_recommend_skips_seen_products_and_uses_the_conversion_head(model_dir: Path, catalog: Path,
                                                                   tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    history.write_text('{"user_id": "u1", "product_id": "p1", "label": "purchase", "timestamp": 2}\n'
                       '{"user_id": "u1", "product_id": "p4", "label": "click", "timestamp": 1}\n')
    results = recommend(model_dir, catalog, history, k=10)
    assert {r.product_id for r in results} == {"p2", "p3", "p5"}
    assert all(0.0 <= r.score <= 1.0 for r in results)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    # Context = most recent product first, as in training.
    direct = score_pairs(model_dir, contexts=["Red wool scarf ; Ceramic mug"],
                         products=["Steel kettle | kitchen | Brewco"], task="ctr")
    assert next(r.score for r in results if r.product_id == "p2") == pytest.approx(float(direct[0]), abs=1e-6)


def test_cli_json_output_and_table(model_dir: Path, catalog: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rank", "--model", str(model_dir), "--catalog", str(catalog), "--query", "kettle", "-k", "3",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"rank", "product_id", "title", "score"}
    assert main(["rank", "--model", str(model_dir), "--catalog", str(catalog), "--query", "kettle"]) == 0
    table = capsys.readouterr().out
    assert "product_id" in table and "relevance" in table and table.count("\n") == 6


def test_clear_errors(model_dir: Path, catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rank", "--model", str(tmp_path / "nope"), "--catalog", str(catalog), "--query", "q"]) == 2
    assert "not an exported fedshop model" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("product_id,title\n")
    with pytest.raises(DataValidationError, match="no data rows"):
        rank(model_dir, empty, "q")
    history = tmp_path / "h.csv"
    history.write_text("user_id,product_id,label\nu1,p9,click\n")
    with pytest.raises(DataValidationError, match="'p9' is not in catalog.csv"):
        recommend(model_dir, catalog, history)
    assert main(["recommend", "--model", str(model_dir), "--catalog", str(catalog), "--history", str(history)]) == 2
    assert "h.csv row 1, field 'product_id'" in capsys.readouterr().err
