"""``fedshop rank`` / ``fedshop recommend`` on a tiny exported model, and their refusal of a head
the model's run never trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from client.data import DataValidationError
from client.serving import UntrainedHeadError, rank, recommend, score_pairs
from shared.model import HEADS_FILE, MANIFEST_FILE, ModelSpec, build_model, export_model, load_tokenizer
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


# ------------------------------------------------------------------ only trained heads are served
def _export(spec: ModelSpec, out: Path) -> Path:
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return export_model(model, load_tokenizer(spec), out, spec=spec)


@pytest.fixture(scope="module")
def ctr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the default demo exports: a run whose tasks are ``ctr`` only."""
    spec = ModelSpec(encoder="tiny", trainable="heads", dropout=0.0, tasks="ctr")
    return _export(spec, tmp_path_factory.mktemp("ctr") / "run" / "model")


def test_the_manifest_lists_only_the_trained_heads(ctr_model: Path) -> None:
    manifest = json.loads((ctr_model / MANIFEST_FILE).read_text())
    assert manifest["format"] == "fedshop-model/2"
    assert manifest["heads"] == ["ctr"] and list(manifest["score_scales"]) == ["ctr"]
    assert manifest["trained_as"]["tasks"] == "ctr"
    assert sorted(load_file(str(ctr_model / HEADS_FILE))) == ["ctr.bias", "ctr.weight"]


def test_rank_refuses_a_head_the_run_never_trained(ctr_model: Path, catalog: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UntrainedHeadError, match="the relevance head was never trained .*trained tasks = ctr"):
        rank(ctr_model, catalog, "warm scarf")
    with pytest.raises(UntrainedHeadError, match="rating head was never trained"):
        score_pairs(ctr_model, contexts=["q"], products=["p"], task="rating")
    assert main(["rank", "--model", str(ctr_model), "--catalog", str(catalog), "--query", "scarf"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no table of meaningless scores
    assert "relevance head was never trained (fedshop rank scores with it)" in captured.err
    assert "trained tasks = ctr; use a model whose run config's tasks include relevance" in captured.err


def test_recommend_serves_the_trained_head(ctr_model: Path, catalog: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    history = tmp_path / "history.csv"
    history.write_text("user_id,product_id,label\nu1,p1,click\n")
    assert main(["recommend", "--model", str(ctr_model), "--catalog", str(catalog), "--history", str(history),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["product_id"] for r in rows} == {"p2", "p3", "p4", "p5"}
    assert all(0.0 < r["score"] < 1.0 for r in rows)


def test_a_version_1_manifest_is_judged_by_its_runs_config(tmp_path: Path, catalog: Path) -> None:
    """``fedshop-model/1`` listed every head, trained or not: the run's config.json beside the
    model decides, and without one every head is refused."""
    spec = ModelSpec(encoder="tiny", trainable="heads", dropout=0.0)  # all heads exported, as version 1 did
    model_dir = _export(spec, tmp_path / "run" / "model")
    manifest_path = model_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = "fedshop-model/1"
    del manifest["trained_as"]["tasks"]
    manifest_path.write_text(json.dumps(manifest))
    history = tmp_path / "history.csv"
    history.write_text("user_id,product_id,label\nu1,p1,click\n")

    for call in (lambda: rank(model_dir, catalog, "scarf"), lambda: recommend(model_dir, catalog, history)):
        with pytest.raises(UntrainedHeadError, match="lists every head whether its run trained it or not"):
            call()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"tasks": "ctr", "dp": True}))
    with pytest.raises(UntrainedHeadError, match="relevance head was never trained.*trained tasks = ctr"):
        rank(model_dir, catalog, "scarf")
    assert len(recommend(model_dir, catalog, history)) == 4


def test_offsets_move_the_scores_not_the_order(model_dir: Path, catalog: Path, tmp_path: Path) -> None:
    from client import offsets as offsets_lib

    state = tmp_path / "state"
    own = offsets_lib.Offsets(("ctr", "rating", "relevance"), {"relevance": 1.0})
    offsets_lib.save(own, state / offsets_lib.OFFSETS_FILE, run_id="r")
    plain, shifted = (rank(model_dir, catalog, "warm scarf", k=5, offsets=o) for o in (None, state))
    assert [r.product_id for r in shifted] == [r.product_id for r in plain]
    grade = np.array([r.score for r in plain]) / 3.0  # 3 * sigmoid(score): the score is logit(grade / 3)
    expected = 3.0 / (1.0 + np.exp(-(np.log(grade / (1 - grade)) + 1.0)))
    assert np.allclose([r.score for r in shifted], expected, atol=1e-5)
    with pytest.raises(offsets_lib.OffsetsError, match="no local offsets"):
        rank(model_dir, catalog, "warm scarf", offsets=tmp_path)
    assert main(["rank", "--model", str(model_dir), "--catalog", str(catalog), "--query", "x",
                 "--offsets", str(tmp_path / "nowhere")]) == 2
