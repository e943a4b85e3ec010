"""client.offsets (``local-offsets``): each merchant's own intercepts on the heads' scores, trained
in its DP-SGD calls, kept in its state folder, never sent, and used by its evaluation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import evaluation, release
from client import offsets as offsets_lib
from client.merchant import Merchant, NodeIdentity
from client.trainer import train
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, get_trainable, load_tokenizer
from shared.privacy.budget import PrivacyState
from shared.tasks import Example
from tests.helpers.examples import product_examples
from tests.helpers.heads import heads_config
from tests.helpers.merchants import write_merchant

TASKS = ("ctr", "rating", "relevance")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(ModelSpec(encoder="tiny"))


def config(**changes: object) -> RunConfig:
    """Private heads on the tiny encoder with local offsets, every task the merchant folders hold."""
    base: dict[str, object] = dict(tasks=",".join(TASKS), local_offsets=True, dp=True, noise_multiplier=0.5,
                                   target_epsilon=1000.0, batch_size=32, max_local_steps=4, head_learning_rate=0.1,
                                   eval_max_examples=0)
    return heads_config(**{**base, **changes})


def merchant(tmp_path: Path, cfg: RunConfig) -> Merchant:
    data = tmp_path / "data" / "shop-a"
    if not data.exists():
        write_merchant(tmp_path / "data", "shop-a", seed=1, interactions=120)
    identity = NodeIdentity(merchant_id="shop-a", data_dir=data, synthetic_index=None, state_dir=tmp_path / "state",
                            target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, device="cpu",
                            creates_privacy_state=True)
    return Merchant(identity, cfg)


def saved(shop: Merchant) -> dict[str, float]:
    return dict(json.loads(shop.offsets_path.read_text())["offsets"])


def test_offsets_train_at_the_node_persist_within_a_run_and_never_travel(tmp_path: Path) -> None:
    shop = merchant(tmp_path, config())
    global_params = dict(get_trainable(build_model(ModelSpec.from_config(shop.config))))
    reply = shop.train(global_params, server_round=1, model_version=0, run_id="run-1")
    assert reply.params is not None and sorted(reply.params) == sorted(global_params)  # no local_offsets.*
    first = saved(shop)
    assert sorted(first) == list(TASKS) and all(abs(v) > 1e-3 for v in first.values())  # they trained

    # The next call of the run starts from the saved offsets: a far-off value stays far off
    # after 4 steps at rate 0.01; another run's, or another task list's, are not read.
    offsets_lib.save(offsets_lib.Offsets(TASKS, {"ctr": 4.0}), shop.offsets_path, run_id="run-1")
    slow = merchant(tmp_path, config(head_learning_rate=0.01))
    slow.train(global_params, server_round=2, model_version=1, run_id="run-1")
    assert saved(slow)["ctr"] == pytest.approx(4.0, abs=0.1)
    slow.train(global_params, server_round=1, model_version=0, run_id="run-2")
    assert abs(saved(slow)["ctr"]) < 0.1
    offsets_lib.save(offsets_lib.Offsets(("ctr", "rating"), {"ctr": 4.0}), shop.offsets_path, run_id="run-2")
    slow.train(global_params, server_round=2, model_version=1, run_id="run-2")
    assert abs(saved(slow)["ctr"]) < 0.1 and sorted(saved(slow)) == list(TASKS)

    # Off: nothing is trained or written.
    off = merchant(tmp_path / "off", config(local_offsets=False))
    assert off.train(global_params, server_round=1, model_version=0, run_id="run-1").params is not None
    assert not off.offsets_path.exists()


def skewed(rate: float, seed: int, n: int = 256) -> list[Example]:
    """Clicks at base rate ``rate``, whatever the text says."""
    rng = random.Random(seed)
    return [Example(task="ctr", context="", product=e.product, target=float(rng.random() < rate))
            for e in product_examples(n, seed)]


def test_each_merchant_offset_moves_towards_its_own_base_rate(tokenizer: PreTrainedTokenizerBase,
                                                              tmp_path: Path) -> None:
    cfg = config(tasks="ctr", max_local_steps=12, batch_size=64)
    start = dict(get_trainable(build_model(ModelSpec.from_config(cfg))))
    found = {}
    for name, rate in (("often", 0.9), ("rarely", 0.1)):
        model = build_model(ModelSpec.from_config(cfg))  # the same global model for both
        privacy = PrivacyState.open(tmp_path / name / "privacy.json", merchant_id=name, target_epsilon=1000.0,
                                    target_delta=1e-5)
        path = tmp_path / name / offsets_lib.OFFSETS_FILE
        train(model, skewed(rate, seed=len(name)), tokenizer, cfg, privacy=privacy, run_id="r",
              feature_cache=tmp_path / name / "f", local_offsets=path)
        assert privacy.entries and privacy.entries[-1].event.mechanism.noise_multiplier == 0.5  # a DP call
        assert dict(get_trainable(model)).keys() == start.keys()
        found[name] = offsets_lib.for_node(path.parent, ["ctr"])
    often, rarely = (found[n].values()["ctr"] for n in ("often", "rarely"))  # type: ignore[union-attr]
    # Logit 0.9 = +2.2, logit 0.1 = -2.2 (the heads share the way there): each intercept moves its
    # own way, about 0.5 in 12 steps, where the noise moves it by a few hundredths.
    assert often > 0.25 and rarely < -0.25, (often, rarely)


def test_evaluation_and_release_use_the_offsets(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    cfg = config(dp=False)
    shop = merchant(tmp_path, cfg)
    params = dict(get_trainable(build_model(ModelSpec.from_config(cfg))))
    settings = release.EvalSettings(evaluate=True, noise_multiplier=1.0, min_units=1)
    plain = shop.evaluate(params, settings, run_id="r").metrics
    own = offsets_lib.Offsets(TASKS, {"ctr": 3.0, "rating": -2.0, "relevance": 1.0})
    offsets_lib.save(own, shop.offsets_path, run_id="r")
    shifted = shop.evaluate(params, settings, run_id="r").metrics
    assert shifted["ctr_logloss"] != pytest.approx(plain["ctr_logloss"], rel=1e-3)
    assert shop.evaluate(params, settings, run_id="another run").metrics == plain  # another run's: not used
    # The merchant's exact figures (cached states) are the model's own scores plus the offsets,
    # as scoring the records through the whole model gives them.
    model = build_model(ModelSpec.from_config(cfg))
    test = shop.split().test
    whole = evaluation.evaluate(model, test, tokenizer, cfg, offsets=own)
    assert whole.metrics == pytest.approx({k: v for k, v in shifted.items() if k in whole.metrics}, rel=1e-4)
    # The noised release too (same noise draw: only the offsets differ).
    released = [release.release(model, test, tokenizer, cfg, noise_multiplier=1.0, seed=3, offsets=o)
                for o in (None, own)]
    assert released[0]["sum:ctr/loss"] != pytest.approx(released[1]["sum:ctr/loss"], rel=1e-3)


def test_offsets_add_to_their_tasks_columns_only_and_a_damaged_file_is_clear(tmp_path: Path) -> None:
    own = offsets_lib.Offsets(["rating", "ctr"], {"ctr": 1.5, "rating": -0.5})
    assert own.tasks == ("ctr", "rating")
    scores = torch.zeros(2, 3)
    assert torch.equal(own(scores), torch.tensor([[1.5, -0.5, 0.0]] * 2))
    assert offsets_lib.for_node(tmp_path, ["ctr", "rating"]) is None
    offsets_lib.save(own, tmp_path / offsets_lib.OFFSETS_FILE, run_id="r")
    assert offsets_lib.for_node(tmp_path, ["ctr", "rating"]).values() == own.values()  # type: ignore[union-attr]
    with pytest.raises(offsets_lib.OffsetsError, match="the model trained"):
        offsets_lib.for_node(tmp_path, ["ctr"])
    (tmp_path / offsets_lib.OFFSETS_FILE).write_text("{\"offsets\": 1}")
    with pytest.raises(offsets_lib.OffsetsError, match="unreadable"):
        offsets_lib.for_node(tmp_path, ["ctr", "rating"])
    assert offsets_lib.load(tmp_path / offsets_lib.OFFSETS_FILE, tasks=["ctr"], run_id="r") is None
    assert np.isfinite(list(own.values().values())).all()
