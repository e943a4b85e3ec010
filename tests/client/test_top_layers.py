"""client.top_layers: the top k layers trained on cached lower-layer states are the same
training as the whole model's, and encoder-rounds trains heads first, then the top layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import top_layers
from client.bookkeeping import BookKeepingLoss, BookKeepingModule
from client.encoding import PairDataset, trim
from client.trainer import train
from shared.config import ConfigError, RunConfig
from shared.model import ModelSpec, build_model, get_trainable, load_tokenizer
from shared.privacy.budget import PrivacyState
from shared.tasks import PerExampleLoss
from tests.helpers.grads import clipped_mean, median_norm, per_example_grads
from tests.helpers.heads import TRAIN, heads_config

CPU = torch.device("cpu")


def config(**changes: Any) -> RunConfig:
    """trainable = top-k (the last of the tiny encoder's 2 layers) on unit-length states."""
    return heads_config(**{"trainable": "top-k", "top_k_layers": 1, **changes})


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(ModelSpec(encoder="tiny"))


def batch(tokenizer: PreTrainedTokenizerBase, n: int = 24) -> tuple[PairDataset, list[torch.Tensor]]:
    records = PairDataset(TRAIN, tokenizer, max_seq_len=16)
    rows = [records[i] for i in range(n)]
    return records, list(trim([torch.stack([r[j] for r in rows]) for j in range(4)], CPU))


def top_name(name: str) -> str:
    """A whole-model parameter name as ``TopLayers`` names it (layer 1 of 2 is its layer 0)."""
    return name.replace("encoder.encoder.layer.1.", "layers.0.")


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (top_layers.STORAGE_DTYPE, 2e-4)])
def test_top_layers_score_as_the_whole_model(tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype,
                                             tolerance: float) -> None:
    model = build_model(ModelSpec.from_config(config()))
    model.eval()
    records, (ids, mask, types, _) = batch(tokenizer)
    states, cached_mask = top_layers.encode_lower(model, tokenizer, records.pairs[:24], depth=1, max_seq_len=16,
                                                  device=CPU, dtype=dtype)
    assert states.dtype == dtype and states.shape[:2] == cached_mask.shape
    view_batch = top_layers.TopLayersView.batch((states, cached_mask, torch.zeros(24)), CPU)
    with torch.no_grad():
        whole = model(ids, mask, types)
        top = top_layers.TopLayers(model, 1)(view_batch[0], view_batch[1])
    torch.testing.assert_close(top, whole, atol=tolerance, rtol=0)
    assert {n for n, _ in top_layers.TopLayers(model, 1).named_parameters()} == {
        top_name(n) for n in get_trainable(model)}


def test_clipped_gradients_match_the_whole_models(tokenizer: PreTrainedTokenizerBase) -> None:
    """Book-keeping clipping on the top layers from cached states (what a call runs) gives the
    clipped gradient sum of the whole model's per-example gradients, at a C that clips half."""
    model = build_model(ModelSpec.from_config(config()))
    records, x = batch(tokenizer)
    reference = per_example_grads(model, x)
    max_grad_norm = median_norm(reference)
    expected, factor = clipped_mean(reference, max_grad_norm)
    assert 0 < int((factor < 1).sum()) < len(factor)  # some records clipped, some not
    model.zero_grad(set_to_none=True)
    states, mask = top_layers.encode_lower(model, tokenizer, records.pairs[:24], depth=1, max_seq_len=16,
                                           device=CPU, dtype=torch.float32)
    states, mask, _ = top_layers.TopLayersView.batch((states, mask, x[3]), CPU)
    private = BookKeepingModule(top_layers.TopLayers(model, 1), max_grad_norm=max_grad_norm)
    BookKeepingLoss(private, PerExampleLoss())(private(states, mask), x[3]).backward()
    got = {name: p.grad / len(factor) for name, p in private._module.named_parameters() if p.grad is not None}
    for name, value in expected.items():
        torch.testing.assert_close(got[top_name(name)], value, atol=1e-6, rtol=1e-4, msg=name)
    private.remove_hooks()


def test_states_are_cached_and_keyed_by_the_lower_layers_only(tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(ModelSpec.from_config(config()))
    pairs = PairDataset(TRAIN, tokenizer, max_seq_len=16).pairs[:40]
    states, mask = top_layers.layer_states(model, tokenizer, pairs, depth=1, max_seq_len=16, device=CPU,
                                           cache_dir=tmp_path)
    assert states.shape == (40, mask.shape[1], 64) and states.dtype == top_layers.STORAGE_DTYPE
    [cached] = tmp_path.glob(f"{top_layers.CACHE_PREFIX}*.pt")
    key = top_layers.cache_key(model, tokenizer, pairs, depth=1, max_seq_len=16)
    with torch.no_grad():  # the top layer trains every round: its states below do not change
        model.get_parameter("encoder.encoder.layer.1.output.dense.weight").add_(1.0)
    assert top_layers.cache_key(model, tokenizer, pairs, depth=1, max_seq_len=16) == key

    def no_encoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("encoded again although the cache holds these records")

    monkeypatch.setattr(top_layers, "encode_lower", no_encoding)
    again, _ = top_layers.layer_states(model, tokenizer, pairs, depth=1, max_seq_len=16, device=CPU,
                                       cache_dir=tmp_path)
    assert torch.equal(again, states)
    with torch.no_grad():
        model.get_parameter("encoder.encoder.layer.0.output.dense.weight").add_(1.0)
    assert top_layers.cache_key(model, tokenizer, pairs, depth=1, max_seq_len=16) != key
    assert top_layers.cache_key(model, tokenizer, pairs[:39], depth=1, max_seq_len=16) != key
    assert cached.is_file()


def test_encoder_rounds_train_heads_first_then_the_top_layers(tokenizer: PreTrainedTokenizerBase,
                                                               tmp_path: Path) -> None:
    cfg = config(dp=True, noise_multiplier=1.0, batch_size=128, local_epochs=1.0, max_local_steps=2,
                 target_epsilon=50.0, num_server_rounds=3, encoder_rounds=1, keep_optimizer_state=True,
                 learning_rate=1e-2)
    model = build_model(ModelSpec.from_config(cfg))
    privacy = PrivacyState.open(tmp_path / "privacy-state.json", merchant_id="shop-1", target_epsilon=50.0,
                                target_delta=1e-5)
    kept = tmp_path / "optimizer.pt"

    def call(server_round: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]:
        before = get_trainable(model)
        result = train(model, TRAIN, tokenizer, cfg, privacy=privacy, round=server_round, run_id="run-1",
                       feature_cache=tmp_path / "features", optimizer_state=kept)
        return before, get_trainable(model), result

    def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray], part: str) -> list[bool]:
        return [not np.array_equal(before[n], after[n]) for n in after if n.startswith(part)]

    spent = []
    for server_round, trains_layers in ((1, False), (2, False), (3, True)):
        before, after, result = call(server_round)
        layers = changed(before, after, "encoder.")
        assert layers and all(layers) if trains_layers else not any(layers), server_round
        assert all(changed(before, after, "heads.ctr")), server_round
        assert result.grad_sample_mode == ("bk" if trains_layers else "ew")
        spent.append(result.mechanism)
    # The same mechanism in every phase: the accounting does not depend on the phase.
    assert {(m.sample_rate, m.steps, m.max_grad_norm) for m in spent} == {(spent[0].sample_rate, 2, 1.0)}
    # One cache for both phases: the lower layers', encoded once; no pooled states keyed by the
    # top layers (which FedAvg's rounding changes every round).
    assert [p.name.startswith(top_layers.CACHE_PREFIX) for p in (tmp_path / "features").glob("*.pt")] == [True]


def test_heads_rounds_pool_as_the_whole_model(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    cfg = config(num_server_rounds=2, encoder_rounds=1)
    model = build_model(ModelSpec.from_config(cfg))
    records, (ids, mask, types, _) = batch(tokenizer)
    round_one = top_layers.round_config(cfg, 1)
    assert top_layers.heads_round(round_one) and not top_layers.heads_round(top_layers.round_config(cfg, 2))
    view = top_layers.heads_view(model, tokenizer, records.pairs[:24], records.targets[:24], top_k_layers=1,
                                 max_seq_len=16, device=CPU, cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(view.dataset.tensors[0], model.pool(ids, mask, types), atol=2e-4, rtol=0)
    assert {n for n, _ in view.model.named_parameters()} == {n for n in get_trainable(model) if n.startswith("heads.")}


@pytest.mark.parametrize(("changes", "named"), [
    ({"trainable": "lora", "encoder_rounds": 2}, "'encoder-rounds' = 2: needs trainable = 'top-k'"),
    ({"trainable": "top-k", "num_server_rounds": 3, "encoder_rounds": 4}, "'encoder-rounds' = 4: must be <= "
     "num-server-rounds (3)"),
    ({"trainable": "top-k", "encoder_rounds": -1}, "'encoder-rounds' = -1: must be >= 0"),
])
def test_encoder_rounds_is_validated(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        RunConfig(**changes).validate()
    RunConfig(trainable="top-k", num_server_rounds=3, encoder_rounds=3).validate()
