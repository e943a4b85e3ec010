"""A merchant's exact view of a run's model (client.held_out, ``fedshop evaluate``): the model's
scores on every held-out record of the merchant, beside the constants it has to beat."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from client import evaluation, held_out, offsets
from client.data import load_merchant
from client.merchant import simulated_state_dir, split_merchant
from shared import atomic
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, export_model, load_exported, load_tokenizer
from shared.run_files import CONFIG_FILE, MODEL_DIR
from shared.tasks import Example
from simulations.cli import main
from tests.helpers.merchants import write_merchants

MERCHANTS = ["shop-a", "shop-b"]


def _ex(task: str, target: float) -> Example:
    return Example(task, "", "a product", target)


def test_the_constants_are_the_held_out_and_the_training_base_rate_or_mean() -> None:
    test = [_ex("ctr", 1.0)] * 3 + [_ex("ctr", 0.0)] + [_ex("rating", 5.0), _ex("rating", 3.0)]
    train = [_ex("ctr", 1.0), _ex("ctr", 0.0), _ex("rating", 4.0)]
    b = held_out.constant_scores(train, test)
    # Held-out base rate 0.75: its log-loss is the entropy H(0.75); the training rate 0.5 gives ln 2.
    assert b["ctr_logloss_held_out"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert b["ctr_logloss_train"] == pytest.approx(math.log(2))
    assert b["rating_rmse_held_out"] == pytest.approx(1.0)  # mean 4, errors ±1
    assert b["rating_rmse_train"] == pytest.approx(1.0)  # the training mean is 4 too
    assert "relevance_rmse_held_out" not in b


def test_a_view_says_which_constants_the_model_beats_and_the_table_shows_it() -> None:
    good = held_out.MerchantView("tops", 100, {"ctr_logloss": 0.30, "rating_rmse": 1.2, "ctr_auc": 0.91},
                                 {"ctr_logloss_held_out": 0.45, "rating_rmse_held_out": 1.1}, offsets=False)
    ranked = held_out.MerchantView("esci-0", 40, {"relevance_ndcg@10": 0.6, "relevance_rmse": 0.3},
                                   {"relevance_ndcg@10_baseline": 0.7, "relevance_rmse_held_out": 0.35}, offsets=False)
    assert good.beats_constants() == {"ctr_logloss": True, "rating_rmse": False}
    assert ranked.beats_constants() == {"relevance_rmse": True, "relevance_ndcg@10": False}
    lines = held_out.table([good, ranked]).splitlines()
    assert lines[0].split()[:2] == ["merchant", "examples"] and "AUC" in lines[0]
    assert "0.300 (0.450) ✓" in lines[1] and "1.200 (1.100) ✗" in lines[1] and lines[1].endswith("0.910")
    assert "0.600 (0.700) ✗" in lines[2] and "0.300 (0.350) ✓" in lines[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's folder as a simulation leaves it: config.json, the exported model (a
    tiny encoder with heads on it), the merchants' data, and shop-a's node folder with its own
    local offsets."""
    root = tmp_path_factory.mktemp("held-out")
    write_merchants(root / "data", MERCHANTS)
    run = root / "run"
    config = RunConfig(encoder="tiny", trainable="heads", tasks="ctr,rating,relevance", max_seq_len=32,
                       test_fraction=0.3, data_dir=str(root / "data"), run_dir=str(run))
    spec = ModelSpec.from_config(config)
    model = build_model(spec)
    torch.manual_seed(0)
    with torch.no_grad():  # heads that score, not zeros
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    export_model(model, load_tokenizer(spec), run / MODEL_DIR, spec=spec)
    atomic.write_json(run / CONFIG_FILE, config.to_mapping())
    shift = offsets.Offsets(config.task_names, {"ctr": 0.4, "rating": -0.2, "relevance": 0.1})
    offsets.save(shift, simulated_state_dir(run, "shop-a") / offsets.OFFSETS_FILE, run_id="r1")
    return run


def test_each_merchant_sees_the_models_exact_scores_on_its_whole_held_out_split(run_dir: Path) -> None:
    found = {v.merchant: v for v in held_out.views(run_dir)}
    assert sorted(found) == MERCHANTS
    config = held_out.run_config(run_dir)
    assert config.eval_max_examples == 0  # every held-out unit, not the run's evaluation sample
    model, tokenizer, manifest = load_exported(run_dir / MODEL_DIR)
    for name, view in found.items():
        split = split_merchant(load_merchant(run_dir.parent / "data" / name), config)
        own = offsets.for_node(simulated_state_dir(run_dir, name), manifest["heads"]) \
            if simulated_state_dir(run_dir, name).is_dir() else None
        exact = evaluation.evaluate(model, split.test, tokenizer, config, offsets=own)
        assert view.held_out_examples == len(split.test) > 0
        assert view.offsets is (name == "shop-a")  # its node folder's offsets, on its own scores
        for key in ("ctr_logloss", "rating_rmse", "ctr_auc"):  # shop-a's from its node's cached states (bfloat16)
            assert view.metrics[key] == pytest.approx(exact.metrics[key], abs=1e-3), (name, key)
        constants = {k: v for k, v in view.constants.items() if k not in held_out.RANDOM_ORDER}
        assert constants == pytest.approx(held_out.constant_scores(split.train, split.test))
        for key in held_out.RANDOM_ORDER:  # ranking's constant: a random order of the same candidates
            assert view.constants.get(key) == exact.metrics.get(key)
        assert view.constants["ctr_logloss_held_out"] == pytest.approx(exact.metrics["ctr_logloss_baseline"])
    # The offsets move shop-a's scores: without them its figures differ.
    plain = evaluation.evaluate(model, split_merchant(load_merchant(run_dir.parent / "data" / "shop-a"),
                                                      config).test, tokenizer, config)
    assert not np.isclose(plain.metrics["ctr_logloss"], found["shop-a"].metrics["ctr_logloss"])


def test_fedshop_evaluate_prints_the_table_or_json(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(run_dir), "--data", str(run_dir.parent / "data" / "shop-b"), "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["merchant"] == "shop-b" and only["offsets"] is False
    # shop-b's held-out queries carry two grades or more: NDCG@10 is judged against a random order.
    assert set(only["beats_constants"]) == {"ctr_logloss", "rating_rmse", "relevance_rmse", "relevance_ndcg@10"}
    assert only["metrics"]["ctr_logloss"] > 0 and only["constants"]["ctr_logloss_held_out"] > 0
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "released nowhere" in out and all(any(line.startswith(m) for line in out.splitlines()) for m in MERCHANTS)


def test_a_merchants_own_split_keys_decide_its_held_out_records(run_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A deployed merchant may pin its split (client.policy): its held-out records are those of
    its own split, so ``--set`` gives ``fedshop evaluate`` the keys its node config pins."""
    config = held_out.run_config(run_dir, {"test-fraction": 0.5, "split-seed": 7})
    assert (config.test_fraction, config.split_seed, config.eval_max_examples) == (0.5, 7, 0)
    split = split_merchant(load_merchant(run_dir.parent / "data" / "shop-b"), config)
    argv = ["evaluate", str(run_dir), "--data", str(run_dir.parent / "data" / "shop-b"), "--json"]
    assert main([*argv, "--set", "test-fraction=0.5", "--set", "split-seed=7"]) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["held_out_examples"] == len(split.test)
    assert main([*argv, "--set", "test-fraction=2"]) == 2
    assert "test-fraction" in capsys.readouterr().err


def test_a_merchant_that_cannot_be_scored_is_named_and_the_others_are_still_scored(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder that fails validation (a run skips it too) gets a line saying why; the exit
    status says that not every merchant was scored."""
    data = tmp_path / "data"
    shutil.copytree(run_dir.parent / "data", data)
    (data / "shop-a" / "catalog.csv").write_text("product_id,title\np1,\n")  # a title missing
    found = {v.merchant: v for v in held_out.views(run_dir, [data])}
    assert found["shop-a"].problem and not found["shop-a"].metrics and not found["shop-b"].problem
    assert found["shop-b"].metrics["ctr_logloss"] > 0
    lines = held_out.table(list(found.values())).splitlines()
    assert lines[1].startswith("shop-a") and "not scored: " in lines[1] and "✓" not in lines[1]
    assert main(["evaluate", str(run_dir), "--data", str(data)]) == 1
    out = capsys.readouterr().out
    assert "not scored" in out and any(line.startswith("shop-b") and "(" in line for line in out.splitlines())


def test_what_cannot_be_scored_is_refused_by_name(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path)]) == 2
    assert f"{tmp_path}: no {CONFIG_FILE} (not a fedshop run folder)" in capsys.readouterr().err
    (tmp_path / CONFIG_FILE).write_text("{}")
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no exported model in model/ (the run did not finish)" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--offsets", str(tmp_path)]) == 2
    assert "one merchant's state folder, but --data holds 2 merchants" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--data", str(tmp_path / "nowhere")]) == 2
    assert f"--data {tmp_path / 'nowhere'}: not a folder" in capsys.readouterr().err
    moved = tmp_path / "moved-run"  # a copy of the run whose data-dir (relative, say) does not resolve here
    shutil.copytree(run_dir, moved)
    saved = json.loads((moved / CONFIG_FILE).read_text())
    (moved / CONFIG_FILE).write_text(json.dumps({**saved, "data-dir": "merchants/elsewhere"}))
    assert main(["evaluate", str(moved)]) == 2
    assert "the run's data-dir 'merchants/elsewhere' is not a folder from here; name the merchants' folders with " \
           "--data" in capsys.readouterr().err
