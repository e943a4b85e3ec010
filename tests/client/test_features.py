"""client.features: heads trained on cached frozen-encoder states are the same training, cheaper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import features
from client.encoding import PairDataset
from client.trainer import train
from shared.model import ModelSpec, build_model, get_trainable, load_tokenizer
from shared.privacy.budget import PrivacyState
from tests.helpers.heads import TRAIN
from tests.helpers.heads import heads_config as config


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(ModelSpec(encoder="tiny"))


def pairs(n: int = 40) -> list[tuple[str, str]]:
    return PairDataset(TRAIN, load_tokenizer(ModelSpec(encoder="tiny")), max_seq_len=16).pairs[:n]


def test_heads_only_shares_the_models_heads(tokenizer: PreTrainedTokenizerBase) -> None:
    model = build_model(ModelSpec.from_config(config()))
    model.eval()
    heads = features.HeadsOnly(model)
    enc = tokenizer(["a red scarf", "oak table"], ["wool scarf, red", "solid oak dining table"],
                    padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        pooled = model.pool(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        torch.testing.assert_close(heads(pooled), full)
    assert {n for n, _ in heads.named_parameters()} == {n for n in get_trainable(model)}
    with torch.no_grad():
        heads.heads["ctr"].bias.add_(1.0)  # the same tensor, not a copy
        assert model.heads["ctr"].bias.item() == heads.heads["ctr"].bias.item()


def test_states_are_cached_and_reused(tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(ModelSpec.from_config(config()))
    records = pairs()
    first = features.pooled_states(model, tokenizer, records, max_seq_len=16, device=torch.device("cpu"),
                                   cache_dir=tmp_path)
    assert first.shape == (len(records), 64)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(len(records)))  # mean-l2
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]  # one file, no temporary left

    def no_encoding(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("encoded again although the cache holds these records")

    monkeypatch.setattr(features, "encode_pairs", no_encoding)
    again = features.pooled_states(model, tokenizer, records, max_seq_len=16, device=torch.device("cpu"),
                                   cache_dir=tmp_path)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_cache_key_follows_records_encoder_and_pooling(tokenizer: PreTrainedTokenizerBase) -> None:
    model = build_model(ModelSpec.from_config(config()))
    records = pairs()
    key = features.cache_key(model, tokenizer, records, max_seq_len=16)
    assert features.cache_key(model, tokenizer, list(records), max_seq_len=16) == key
    assert features.cache_key(model, tokenizer, records[:-1], max_seq_len=16) != key
    assert features.cache_key(model, tokenizer, [("x", "y")] + records[1:], max_seq_len=16) != key
    assert features.cache_key(model, tokenizer, records, max_seq_len=32) != key
    plain = build_model(ModelSpec.from_config(config(pooling="mean")))
    assert features.cache_key(plain, tokenizer, records, max_seq_len=16) != key
    with torch.no_grad():
        next(model.encoder.parameters()).add_(1e-3)  # a different encoder: its states differ
    assert features.cache_key(model, tokenizer, records, max_seq_len=16) != key


def test_a_new_record_set_replaces_the_folders_old_states(tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A merchant deletes a record: the states derived from the old set must not stay behind.
    model = build_model(ModelSpec.from_config(config()))
    before, after = pairs(), pairs()[1:]
    kwargs: dict[str, Any] = dict(max_seq_len=16, device=torch.device("cpu"), cache_dir=tmp_path)
    features.pooled_states(model, tokenizer, before, **kwargs)
    (old,) = tmp_path.iterdir()
    (tmp_path / "shop-b").mkdir()  # another owner's subfolder is not this folder's to prune

    states = features.pooled_states(model, tokenizer, after, **kwargs)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert old.name not in files and len(files) == 2 and "shop-b" in files
    (new,) = [p for p in tmp_path.iterdir() if p.is_file()]
    assert torch.equal(torch.load(new, weights_only=True)["states"], states)
    encoded: list[int] = []
    real = features.encode_pairs
    monkeypatch.setattr(features, "encode_pairs", lambda m, t, p, **kw: encoded.append(len(p)) or real(m, t, p, **kw))
    features.pooled_states(model, tokenizer, before, **kwargs)  # the deleted record's state is gone: encoded anew
    assert encoded == [1]


def test_a_new_set_encodes_only_the_records_the_folders_set_lacks(
        tokenizer: PreTrainedTokenizerBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A superset (a merchant's whole held-out split after the run evaluated part of it) takes the
    shared records' states from the folder's current set and encodes the rest; the states are
    those a fresh encoding gives, in the new set's order. A set made with another encoding
    (here: another sequence length) lends nothing."""
    model = build_model(ModelSpec.from_config(config()))
    records = pairs()
    part = records[1::2]
    kwargs: dict[str, Any] = dict(max_seq_len=16, device=torch.device("cpu"), cache_dir=tmp_path)
    features.pooled_states(model, tokenizer, part, **kwargs)
    encoded: list[list[tuple[str, str]]] = []
    real = features.encode_pairs
    monkeypatch.setattr(features, "encode_pairs", lambda m, t, p, **kw: encoded.append(list(p)) or real(m, t, p, **kw))

    states = features.pooled_states(model, tokenizer, records, **kwargs)

    assert encoded == [records[0::2]]
    # Up to float32 rounding: a record padded to another batch's length goes through matrix
    # products of another shape (as with any set whose batches differ).
    fresh = real(model, tokenizer, records, max_seq_len=16, device=torch.device("cpu"))
    torch.testing.assert_close(states, fresh, atol=2e-4, rtol=0)
    (only,) = tmp_path.iterdir()  # the superset replaced the part
    assert torch.equal(torch.load(only, weights_only=True)["states"], states)
    features.pooled_states(model, tokenizer, part, **{**kwargs, "max_seq_len": 32})
    assert encoded[-1] == part


def test_damaged_cache_is_encoded_again(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    model = build_model(ModelSpec.from_config(config()))
    records = pairs()
    good = features.pooled_states(model, tokenizer, records, max_seq_len=16, device=torch.device("cpu"),
                                  cache_dir=tmp_path)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"not a tensor")
    again = features.pooled_states(model, tokenizer, records, max_seq_len=16, device=torch.device("cpu"),
                                   cache_dir=tmp_path)
    torch.testing.assert_close(again, good)
    assert torch.equal(torch.load(cached, weights_only=True)["states"], again)  # and the file is whole again


def test_cached_states_train_the_heads_exactly_as_the_full_forward(tokenizer: PreTrainedTokenizerBase,
                                                                   tmp_path: Path) -> None:
    """Same records, same batches, same steps: training on cached states ends at the heads the
    full forward pass reaches (the reference trains the same heads with the encoder run at each
    step, as every other trainable set does). In float32: bfloat16 states (encode-precision) are
    compared with float32 ones below."""
    cfg = config(encode_precision="float32")
    model = build_model(ModelSpec.from_config(cfg))
    reference = build_model(ModelSpec.from_config(cfg))
    result = train(model, TRAIN, tokenizer, cfg, privacy=None, feature_cache=tmp_path)

    # The reference: the trainer's own loop with the frozen path switched off.
    from client import encoding, trainer

    records = PairDataset(TRAIN, tokenizer, max_seq_len=16)
    optimizer = trainer.make_optimizer(reference, cfg)
    loader = torch.utils.data.DataLoader(records, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed * 1_000_003))
    criterion = trainer.PerExampleLoss()
    done = 0
    while done < result.steps:
        for batch in loader:
            if done >= result.steps:
                break
            input_ids, attention_mask, token_type_ids, packed = encoding.trim(batch, torch.device("cpu"))
            optimizer.zero_grad()
            criterion(reference(input_ids, attention_mask, token_type_ids), packed).backward()
            optimizer.step()
            done += 1
    got, want = get_trainable(model), get_trainable(reference)
    assert result.steps == 8  # 2 epochs of 256 records in batches of 64
    fresh = get_trainable(build_model(ModelSpec.from_config(cfg)))
    assert any(not torch.equal(torch.as_tensor(want[n]), torch.as_tensor(fresh[n])) for n in want)  # it trained
    for name in want:
        torch.testing.assert_close(torch.as_tensor(got[name]), torch.as_tensor(want[name]), atol=2e-5, rtol=1e-4)


def test_private_heads_on_cached_states_spend_and_leave_the_encoder(tokenizer: PreTrainedTokenizerBase,
                                                                    tmp_path: Path) -> None:
    cfg = config(dp=True, noise_multiplier=1.0, batch_size=128, local_epochs=3.0, max_local_steps=6,
                 target_epsilon=50.0)
    model = build_model(ModelSpec.from_config(cfg))
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    heads_before = get_trainable(model)
    privacy = PrivacyState.open(tmp_path / "privacy-state.json", merchant_id="shop-1", target_epsilon=50.0,
                                target_delta=1e-5)
    result = train(model, TRAIN, tokenizer, cfg, privacy=privacy, feature_cache=tmp_path / "features")
    assert result.steps == 6 and result.mechanism is not None
    assert result.mechanism.sample_rate == pytest.approx(0.5)  # 1 / ceil(256 records / 128)
    assert result.epsilon > 0
    reopened = PrivacyState.open(tmp_path / "privacy-state.json", merchant_id="shop-1", target_epsilon=50.0,
                                 target_delta=1e-5)
    assert reopened.epsilon() == pytest.approx(result.epsilon)  # the spend is on disk
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    after = get_trainable(model)
    assert any(not torch.equal(torch.as_tensor(after[n]), torch.as_tensor(heads_before[n])) for n in after)
    assert len(list((tmp_path / "features").glob("features-*.pt"))) == 1
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and p.grad is None  # no Opacus leftovers


def test_held_out_predictions_from_cached_states_match_the_full_model(tokenizer: PreTrainedTokenizerBase,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from client import evaluation

    model = build_model(ModelSpec.from_config(config()))
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.normal_()  # heads that discriminate, so a wrong row would show
    examples = TRAIN[:60]  # records with several tasks appear once per task
    exact_loss, exact_pred = evaluation.predict(model, examples, tokenizer, config())
    loss, pred = evaluation.predict(model, examples, tokenizer, config(), feature_cache=tmp_path)
    assert (tmp_path / evaluation.HELD_OUT_FOLDER).is_dir()
    torch.testing.assert_close(torch.from_numpy(pred), torch.from_numpy(exact_pred), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(loss), torch.from_numpy(exact_loss), rtol=1e-4, atol=1e-4)

    def no_encoding(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("the held-out records were encoded again")

    monkeypatch.setattr(features, "encode_pairs", no_encoding)
    _, again = evaluation.predict(model, examples, tokenizer, config(), feature_cache=tmp_path)
    assert (again == pred).all()


def test_the_encoding_precision_follows_the_device_and_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(features, "native_bfloat16", lambda native=native: native)
        assert features.encode_dtype(cpu) == (torch.bfloat16 if native else torch.float32)
        assert features.encode_dtype(cpu, "float32") == torch.float32
        assert features.encode_dtype(cpu, "bfloat16") == torch.bfloat16
        assert features.encode_dtype(gpu, "auto") == features.encode_dtype(gpu, "bfloat16") == torch.float32
    with pytest.raises(ValueError, match="encode-precision 'half'"):
        features.encode_dtype(cpu, "half")
    from shared.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="encode-precision"):
        RunConfig.from_mapping({"encode-precision": "half"})


def test_bfloat16_states_are_cached_apart_and_close_to_float32(tokenizer: PreTrainedTokenizerBase,
                                                                tmp_path: Path) -> None:
    model = build_model(ModelSpec.from_config(config()))
    records = pairs()
    kwargs: dict[str, Any] = {"max_seq_len": 16, "device": torch.device("cpu")}
    exact = features.pooled_states(model, tokenizer, records, cache_dir=tmp_path / "f32", precision="float32", **kwargs)
    fast = features.pooled_states(model, tokenizer, records, cache_dir=tmp_path / "bf16", precision="bfloat16",
                                  **kwargs)
    assert fast.dtype == exact.dtype == torch.float32 and not torch.equal(fast, exact)  # bfloat16 products
    assert torch.nn.functional.cosine_similarity(fast, exact).min() > 0.999
    keys = {features.cache_key(model, tokenizer, records, max_seq_len=16, dtype=d) for d in (torch.float32,
                                                                                           torch.bfloat16)}
    assert len(keys) == 2  # a cache never hands one precision's states to the other
    names = {p.name for p in (tmp_path / "f32").iterdir()} | {p.name for p in (tmp_path / "bf16").iterdir()}
    assert len(names) == 2
