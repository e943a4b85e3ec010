"""shared.model: trainable sets, parameter (de)serialisation, determinism, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from shared.model import (
    HEADS_FILE,
    MANIFEST_FILE,
    FedShopModel,
    ModelError,
    ModelSpec,
    build_model,
    count_parameters,
    export_model,
    get_trainable,
    load_exported,
    load_tokenizer,
    set_trainable,
    tokenize_pairs,
    trainable_names,
)
from shared.tasks import TASKS

LAYER = "encoder.encoder.layer."


def spec(trainable: str, **kw: object) -> ModelSpec:
    return ModelSpec(encoder="tiny", trainable=trainable, dropout=0.0, max_seq_len=32, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(spec("heads"))


def all_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


HEAD_NAMES = {f"heads.{task}.{k}" for task in TASKS for k in ("weight", "bias")}


# ----------------------------------------------------------------------------- trainable sets


def test_heads_trains_only_heads() -> None:
    model = build_model(spec("heads"))
    assert set(trainable_names(model)) == HEAD_NAMES
    assert model.training  # Opacus records nothing in eval mode


def test_lora_trains_only_adapters_and_heads() -> None:
    model = build_model(spec("lora", lora_r=4))
    names = set(trainable_names(model))
    lora = names - HEAD_NAMES
    assert HEAD_NAMES <= names
    assert lora and all("lora_" in n for n in lora)
    # Every attention query/value of both layers got an A and a B matrix; nothing else did.
    expected = {f"{LAYER}{i}.attention.self.{m}.lora_{ab}.default.weight"
                for i in range(2) for m in ("query", "value") for ab in ("A", "B")}
    assert lora == expected
    # Base weights stay frozen; the adapters have rank 4.
    params = dict(model.named_parameters())
    assert not params[f"{LAYER}0.attention.self.query.base_layer.weight"].requires_grad
    assert params[f"{LAYER}0.attention.self.query.lora_A.default.weight"].shape == (4, 64)
    assert params[f"{LAYER}0.attention.self.query.lora_B.default.weight"].shape == (64, 4)


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_trains_last_k_layers_and_heads(k: int) -> None:
    model = build_model(spec("top-k", top_k_layers=k))
    layers = [str(i) for i in range(2 - k, 2)]
    expected = {n for n in all_names(model)
                if n.startswith(LAYER) and n[len(LAYER):].split(".")[0] in layers} | HEAD_NAMES
    assert set(trainable_names(model)) == expected
    assert not any(n.startswith("encoder.embeddings") for n in trainable_names(model))
    assert len(expected) > len(HEAD_NAMES)


def test_top_k_out_of_range_is_an_error() -> None:
    with pytest.raises(ModelError, match="top-k-layers = 3"):
        build_model(spec("top-k", top_k_layers=3))


def test_full_trains_everything() -> None:
    model = build_model(spec("full"))
    assert trainable_names(model) == all_names(model)
    counts = count_parameters(model)
    assert counts["trainable"] == counts["total"]


def test_unknown_trainable_is_an_error() -> None:
    with pytest.raises(ModelError, match="'most'"):
        build_model(spec("most"))


def test_no_pooler() -> None:
    # An unused pooler breaks Opacus' per-sample gradients.
    assert not any("pooler" in n for n in all_names(build_model(spec("full"))))


# ----------------------------------------------------------------------------- get / set


@pytest.mark.parametrize("trainable", ["heads", "lora", "top-k", "full"])
def test_get_set_round_trip_is_bit_identical(trainable: str) -> None:
    model = build_model(spec(trainable, top_k_layers=1))
    original = get_trainable(model)
    assert list(original) == trainable_names(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    assert not np.array_equal(get_trainable(model)["heads.ctr.weight"], original["heads.ctr.weight"])
    set_trainable(model, original)
    restored = get_trainable(model)
    assert list(restored) == list(original)
    for name, value in original.items():
        assert restored[name].dtype == value.dtype
        assert np.array_equal(restored[name], value), name
    # get_trainable returns copies: changing them does not touch the model.
    original["heads.ctr.bias"][...] = 123.0
    assert get_trainable(model)["heads.ctr.bias"][0] != 123.0


def test_set_trainable_errors() -> None:
    model = build_model(spec("heads"))
    params = get_trainable(model)

    missing = dict(params)
    del missing["heads.rating.bias"]
    with pytest.raises(ModelError, match=r"missing \['heads.rating.bias'\]"):
        set_trainable(model, missing)

    extra = dict(params, **{"encoder.embeddings.word_embeddings.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ModelError, match="unexpected.*word_embeddings"):
        set_trainable(model, extra)

    wrong = dict(params, **{"heads.ctr.weight": np.zeros((1, 63), np.float32)})
    before = get_trainable(model)
    with pytest.raises(ModelError, match=r"'heads.ctr.weight'.*\(1, 63\).*\(1, 64\)"):
        set_trainable(model, wrong)
    assert np.array_equal(get_trainable(model)["heads.ctr.weight"], before["heads.ctr.weight"])


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_same_seed_same_parameters(trainable: str) -> None:
    a = build_model(spec(trainable, seed=3))
    torch.manual_seed(12345)  # global RNG state in between must not matter
    b = build_model(spec(trainable, seed=3))
    c = build_model(spec(trainable, seed=4))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    ta, tc = get_trainable(a), get_trainable(c)
    assert any(not np.array_equal(ta[n], tc[n]) for n in ta)  # the seed does something


# ----------------------------------------------------------------------------- export


PAIRS = [
    ("leather wallet", "premium durable leather wallet, brown"),
    ("", "cheap flimsy plastic chair"),
    ("desk lamp", "adjustable LED desk lamp with a long warranty and a heavy metal base"),
]


def _inputs(tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    enc = tokenize_pairs(tokenizer, [c for c, _ in PAIRS], [p for _, p in PAIRS], 32)
    assert int(enc["attention_mask"].sum(1).min()) < 32  # padding is present, so pooling must mask it
    return enc


def test_tokenize_pairs_cross_encodes_each_pair_at_a_fixed_length(tokenizer: PreTrainedTokenizerBase) -> None:
    enc = tokenize_pairs(tokenizer, ["red scarf", ""], ["wool scarf", "oak table"], 12)
    assert list(enc) == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(v.shape == (2, 12) for v in enc.values())
    first = tokenizer.convert_ids_to_tokens(enc["input_ids"][0][enc["attention_mask"][0].bool()])
    assert first == ["[CLS]", "red", "scarf", "[SEP]", "wool", "scarf", "[SEP]"]
    # Segment 0 is [CLS] context [SEP], segment 1 the product and its [SEP]; padding is 0.
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1] + [0] * 5
    # An empty context still gets its own [SEP]: the product starts at the same place in every row.
    second = tokenizer.convert_ids_to_tokens(enc["input_ids"][1][enc["attention_mask"][1].bool()])
    assert second == ["[CLS]", "[SEP]", "oak", "table", "[SEP]"]


def test_tokenize_pairs_cuts_the_longer_side_first(tokenizer: PreTrainedTokenizerBase) -> None:
    product = "adjustable LED desk lamp with a long warranty and a heavy metal base " * 4
    enc = tokenize_pairs(tokenizer, ["desk lamp"], [product], 16)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert len(tokens) == 16 and bool(enc["attention_mask"].all())  # truncated, not padded
    assert tokens[:4] == ["[CLS]", "desk", "lamp", "[SEP]"]  # the short query survives whole
    assert tokens[-1] == "[SEP]"


def test_tokenize_pairs_longest_padding_stops_at_the_longest_pair(tokenizer: PreTrainedTokenizerBase) -> None:
    enc = tokenize_pairs(tokenizer, ["a", "a"], ["mug", "blue ceramic mug"], 64, padding="longest")
    lengths = enc["attention_mask"].sum(1).tolist()
    assert enc["input_ids"].shape == (2, max(lengths)) and lengths[0] < lengths[1]


def test_tokenize_pairs_gives_zero_token_types_when_the_tokenizer_has_none(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.model_input_names = ["input_ids", "attention_mask"]
    assert "token_type_ids" not in plain(["a"], ["b"], return_tensors="pt")  # the case being tested
    enc = tokenize_pairs(plain, ["red scarf"], ["wool scarf"], 12)
    assert torch.equal(enc["token_type_ids"], torch.zeros(1, 12, dtype=torch.long))
    assert torch.equal(enc["input_ids"], tokenize_pairs(tokenizer, ["red scarf"], ["wool scarf"], 12)["input_ids"])


def test_tokenize_pairs_refuses_unpaired_lists(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="2 contexts but 1 products"):
        tokenize_pairs(tokenizer, ["a", "b"], ["c"], 12)


@torch.no_grad()
def _scores(model: FedShopModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])


@pytest.mark.parametrize(("trainable", "pooling"), [("lora", "mean"), ("full", "mean"), ("heads", "mean-l2")])
def test_export_then_load_gives_same_scores(
    trainable: str, pooling: str, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    model_spec = spec(trainable, pooling=pooling)
    model = build_model(model_spec)
    torch.manual_seed(7)
    with torch.no_grad():  # move away from the initialisation: LoRA B != 0, heads non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    if trainable == "lora":
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)
    inputs = _inputs(tokenizer)
    expected = _scores(model, inputs)
    assert expected.shape == (len(PAIRS), len(TASKS))

    out = export_model(model, tokenizer, tmp_path / "export", spec=model_spec)
    assert out == tmp_path / "export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .tmp folder left behind

    loaded, loaded_tokenizer, manifest = load_exported(out)
    assert not loaded.training
    assert manifest["pooling"] == pooling and manifest["heads"] == list(TASKS)
    assert manifest["trained_as"]["trainable"] == trainable
    torch.testing.assert_close(_scores(loaded, _inputs(loaded_tokenizer)), expected, atol=1e-5, rtol=1e-5)

    # The in-memory model is untouched by export (LoRA is merged into a copy only).
    torch.testing.assert_close(_scores(model, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "mean-l2"])
def test_export_loads_with_plain_transformers(pooling: str, tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """What a consumer without fedshop does: AutoModel + safetensors + fedshop.json."""
    model_spec = spec("lora", pooling=pooling)
    model = build_model(model_spec)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    inputs = _inputs(tokenizer)
    expected = _scores(model, inputs)
    out = export_model(model, tokenizer, tmp_path / "m", spec=model_spec)

    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in weights)  # adapters merged away

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    encoder = AutoModel.from_pretrained(str(out)).eval()
    heads = load_file(str(out / manifest["head_file"]))
    assert manifest["head_file"] == HEADS_FILE
    with torch.no_grad():
        position_ids = torch.arange(inputs["input_ids"].shape[1]).unsqueeze(0).expand_as(inputs["input_ids"])
        hidden = encoder(**inputs, position_ids=position_ids).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        if manifest["pooling"] == "mean-l2":
            pooled = pooled / pooled.norm(dim=1, keepdim=True)
        else:
            assert manifest["pooling"] == "mean"
        by_hand = torch.stack(
            [pooled @ heads[f"{task}.weight"][0] + heads[f"{task}.bias"][0] for task in manifest["heads"]],
            dim=1,
        )
    torch.testing.assert_close(by_hand, expected, atol=1e-5, rtol=1e-5)
    # The scale documented for ratings maps the rating head into [1, 5].
    stars = 1 + 4 * torch.sigmoid(by_hand[:, TASKS.index("rating")])
    assert bool(((stars >= 1) & (stars <= 5)).all())


def test_mean_l2_pooling_gives_unit_vectors(tokenizer: PreTrainedTokenizerBase) -> None:
    plain = build_model(spec("heads"))
    unit = build_model(spec("heads", pooling="mean-l2"))
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        raw = plain.pool(**inputs)
        scaled = unit.pool(**inputs)
    torch.testing.assert_close(scaled.norm(dim=1), torch.ones(len(PAIRS)))
    torch.testing.assert_close(scaled, raw / raw.norm(dim=1, keepdim=True))  # same encoder, same direction
    with pytest.raises(ModelError, match="pooling = 'max'"):
        FedShopModel(torch.nn.Identity(), hidden_size=4, pooling="max")


def test_load_exported_rejects_non_fedshop_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=MANIFEST_FILE):
        load_exported(tmp_path)
