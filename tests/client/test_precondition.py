"""client.precondition and keep-optimizer-state: heads trained in public-text coordinates are
the same model; the optimizer's state carries from call to call within a run only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import features, precondition
from client import optimizer_state as optimizer_state_lib
from client.precondition import Preconditioner
from client.trainer import train
from shared.config import ConfigError, RunConfig
from shared.model import ModelSpec, build_model, get_trainable, load_tokenizer
from shared.privacy.budget import PrivacyState
from tests.helpers.heads import TRAIN
from tests.helpers.heads import heads_config as config

HIDDEN = 64  # the tiny encoder's


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(ModelSpec(encoder="tiny"))


@pytest.fixture(autouse=True)
def fresh_fits() -> None:
    """Each test fits its own preconditioners (the process keeps them between calls)."""
    precondition.forget()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Public text, unrelated to any merchant's records: pairs and single texts mixed."""
    path = tmp_path / "corpus.txt"
    lines = [f"query {i}\tproduct number {i} in colour {i % 7}" if i % 2 else f"a review of item {i}, size {i % 5}"
             for i in range(200)]
    path.write_text("\n".join(lines) + "\n\n")
    return path


def anisotropic(n: int = 2000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, HIDDEN)
    return torch.nn.functional.normalize(torch.randn(n, HIDDEN, generator=g) * scales + 0.5, dim=1)


def heads_of(model: Any) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).clone() for k, v in get_trainable(model).items()}


def test_fit_whitens_the_corpus_and_its_inverse_undoes_it() -> None:
    states = anisotropic()
    p = Preconditioner.fit(states, shrink=1e-9)
    moved = p.states(states)
    torch.testing.assert_close(moved.mean(0), torch.zeros(HIDDEN), atol=1e-4, rtol=0)
    assert moved.norm(dim=1).mean().item() == pytest.approx(1.0, rel=1e-4)
    cov = moved.T @ moved / len(moved)
    eigenvalues = torch.linalg.eigvalsh(cov.double())
    # Every direction equally strong (the raw states span two orders of magnitude and more).
    raw = torch.linalg.eigvalsh(torch.cov(states.T).double())
    assert (raw[-1] / raw[0]).item() > 1e3 and (eigenvalues[-1] / eigenvalues[0]).item() < 1.01
    torch.testing.assert_close(p.matrix @ p.inverse, torch.eye(HIDDEN), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="at least two states"):
        Preconditioner.fit(states[:1], shrink=1e-3)


def test_local_heads_compute_the_same_scores_and_map_back_exactly() -> None:
    model = build_model(ModelSpec.from_config(config()))
    p = Preconditioner.fit(anisotropic(), shrink=1e-3)
    pooled = anisotropic(50, seed=1)
    local = p.to_local(model.heads)
    with torch.no_grad():
        want = features.HeadsOnly(model)(pooled)
        torch.testing.assert_close(features.HeadsOnly(model, local)(p.states(pooled)), want, atol=1e-5, rtol=1e-4)
    before = heads_of(model)
    p.to_global(local, model.heads)
    for name, value in heads_of(model).items():
        torch.testing.assert_close(value, before[name], atol=1e-5, rtol=1e-4)


def test_an_identity_preconditioner_trains_exactly_as_none(tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
                                                          corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The plumbing (copy, optimizer over the copy, write-back) changes nothing by itself.
    identity = Preconditioner(mean=torch.zeros(HIDDEN), matrix=torch.eye(HIDDEN), inverse=torch.eye(HIDDEN))
    monkeypatch.setattr(precondition, "from_corpus", lambda *a, **k: identity)
    plain, routed = (build_model(ModelSpec.from_config(config())) for _ in range(2))
    train(plain, TRAIN, tokenizer, config(), privacy=None, feature_cache=tmp_path / "f")
    train(routed, TRAIN, tokenizer, config(precondition_corpus=str(corpus)), privacy=None,
          feature_cache=tmp_path / "f")
    fresh = heads_of(build_model(ModelSpec.from_config(config())))
    got, want = heads_of(routed), heads_of(plain)
    assert any(not torch.equal(want[n], fresh[n]) for n in want)  # it trained
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def test_private_preconditioned_heads_train_spend_and_keep_the_encoder(tokenizer: PreTrainedTokenizerBase,
                                                                       tmp_path: Path, corpus: Path) -> None:
    cfg = config(dp=True, noise_multiplier=1.0, batch_size=128, local_epochs=3.0, max_local_steps=6,
                 target_epsilon=50.0, precondition_corpus=str(corpus))
    model = build_model(ModelSpec.from_config(cfg))
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    heads_before = heads_of(model)
    privacy = PrivacyState.open(tmp_path / "privacy-state.json", merchant_id="shop-1", target_epsilon=50.0,
                                target_delta=1e-5)
    result = train(model, TRAIN, tokenizer, cfg, privacy=privacy, feature_cache=tmp_path / "features")
    assert result.steps == 6 and result.epsilon > 0 and privacy.epsilon() == pytest.approx(result.epsilon)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    after = heads_of(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[n], heads_before[n]) for n in after)
    # The corpus was encoded once into its own folder, which the merchant's pruning leaves alone.
    assert [p.name for p in (tmp_path / "features" / "precondition-corpus").iterdir()][0].startswith("features-")
    assert len([p for p in (tmp_path / "features").iterdir() if p.is_file()]) == 1


def test_a_preconditioned_call_is_not_the_plain_one(tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
                                                    corpus: Path) -> None:
    plain, routed = (build_model(ModelSpec.from_config(config())) for _ in range(2))
    train(plain, TRAIN, tokenizer, config(), privacy=None, feature_cache=tmp_path / "f")
    train(routed, TRAIN, tokenizer, config(precondition_corpus=str(corpus)), privacy=None,
          feature_cache=tmp_path / "f")
    got, want = heads_of(routed), heads_of(plain)
    assert max((got[n] - want[n]).abs().max().item() for n in got) > 1e-3


def test_bad_corpus_and_config_are_clear_errors(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    model = build_model(ModelSpec.from_config(config()))
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(ValueError, match=f"precondition-corpus {missing}: cannot read it"):
        train(model, TRAIN, tokenizer, config(precondition_corpus=str(missing)), privacy=None)
    (tmp_path / "one.txt").write_text("only one line\n\n")
    with pytest.raises(ValueError, match="1 text"):
        precondition.read_corpus(tmp_path / "one.txt")
    with pytest.raises(ConfigError, match="'precondition-corpus' = .*needs trainable = 'heads'"):
        RunConfig(trainable="lora", precondition_corpus="c.txt").validate()


def test_optimizer_state_continues_within_a_run_only(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "optimizer-state.pt"
    cfg = config(keep_optimizer_state=True, max_local_steps=3)

    def steps_taken() -> list[int]:
        saved = torch.load(path, weights_only=True)
        return sorted({int(s["step"]) for s in saved["state"]["state"].values()})

    model = build_model(ModelSpec.from_config(cfg))
    train(model, TRAIN, tokenizer, cfg, privacy=None, feature_cache=tmp_path / "f", optimizer_state=path, run_id="a")
    assert steps_taken() == [3]
    train(model, TRAIN, tokenizer, cfg, privacy=None, feature_cache=tmp_path / "f", optimizer_state=path, run_id="a")
    assert steps_taken() == [6]  # Adam's moments and step count carried on
    train(model, TRAIN, tokenizer, cfg, privacy=None, feature_cache=tmp_path / "f", optimizer_state=path, run_id="b")
    assert steps_taken() == [3]  # another run starts afresh
    path.write_bytes(b"damaged")
    train(model, TRAIN, tokenizer, cfg, privacy=None, feature_cache=tmp_path / "f", optimizer_state=path, run_id="b")
    assert steps_taken() == [3]
    other = tmp_path / "off.pt"
    train(model, TRAIN, tokenizer, config(max_local_steps=3), privacy=None, optimizer_state=other, run_id="b")
    assert not other.exists()  # not kept unless asked


def test_optimizer_state_of_another_layout_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    small = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(small.parameters())
    small(torch.ones(1, 2)).sum().backward()
    opt.step()
    optimizer_state_lib.save(opt, path, run_id="r")
    assert optimizer_state_lib.load(torch.optim.AdamW(torch.nn.Linear(2, 1).parameters()), path, run_id="r")
    assert not optimizer_state_lib.load(torch.optim.AdamW(torch.nn.Linear(3, 1).parameters()), path, run_id="r")


def test_a_bundled_corpus_needs_no_file_and_trains_as_its_file_would(tokenizer: PreTrainedTokenizerBase,
                                                                     tmp_path: Path) -> None:
    """``bundled:esci`` (the default scenario's) is the ESCI texts fedshop ships, built by the node
    itself: the same heads as the same texts read from a file. A missing file or an unknown
    bundled name stops ``fedshop simulate`` before anything starts."""
    from simulations import engine
    from tests.helpers.heads import write_public_corpus

    file = write_public_corpus("esci", tmp_path / "esci.txt")
    heads = []
    for corpus in ("bundled:esci", str(file)):
        model = build_model(ModelSpec.from_config(config()))
        train(model, TRAIN, tokenizer, config(precondition_corpus=corpus), privacy=None,
              feature_cache=tmp_path / corpus.replace("/", "_"))
        heads.append(heads_of(model))
    assert all(torch.equal(heads[0][n], heads[1][n]) for n in heads[0])
    engine.ensure_public_corpus(RunConfig(trainable="heads", precondition_corpus="bundled:esci"))
    engine.ensure_public_corpus(RunConfig(trainable="heads", precondition_corpus=str(file)))
    with pytest.raises(engine.ScenarioError, match=r"'precondition-corpus' = '.*nowhere\.txt': no such file"):
        engine.ensure_public_corpus(RunConfig(trainable="heads", precondition_corpus=str(tmp_path / "nowhere.txt")))
    with pytest.raises(engine.ScenarioError, match="'bundled:imdb': fedshop ships bundled:esci, bundled:reviews"):
        engine.ensure_public_corpus(RunConfig(trainable="heads", precondition_corpus="bundled:imdb"))


def test_a_worker_fits_a_corpus_once_for_every_merchant(tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
                                                        corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two merchants' calls in one process, each with its own feature folder: the public corpus
    is encoded for the first only; the second gets the same preconditioner."""
    model = build_model(ModelSpec.from_config(config()))
    kwargs: dict[str, Any] = {"max_seq_len": 16, "device": torch.device("cpu")}
    first = precondition.from_corpus(str(corpus), model, tokenizer, cache_dir=tmp_path / "a", **kwargs)
    monkeypatch.setattr(features, "encode_pairs", lambda *a, **k: pytest.fail("encoded the corpus again"))
    again = precondition.from_corpus(str(corpus), model, tokenizer, cache_dir=tmp_path / "b", **kwargs)
    assert again is first
    other = build_model(ModelSpec.from_config(config(seed=7)))  # another encoder: fitted anew
    with pytest.raises(pytest.fail.Exception, match="encoded the corpus again"):
        precondition.from_corpus(str(corpus), other, tokenizer, cache_dir=tmp_path / "c", **kwargs)
