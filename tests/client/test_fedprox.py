"""FedProx on the client: the proximal term (μ/2)‖w − w_global‖² the server's μ asks for, added
to the local objective; under DP after the mechanism, so it is neither clipped nor accounted."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

import client.app as client_app
from client import trainer
from client.trainer import proximal_term, train
from server.strategy import EligibleNodesGrid, build_strategy
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, get_trainable, load_tokenizer
from shared.privacy.budget import PrivacyState
from shared.wire import CONFIG, MODEL_VERSION, PROXIMAL_MU, RUN_ID, TrainReply, params_to_record
from tests.helpers.heads import TRAIN, heads_config
from tests.helpers.merchants import write_merchant


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(ModelSpec(encoder="tiny"))


def flat(params: dict[str, Any]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(v).flatten() for _, v in sorted(params.items())])


def moved(cfg: RunConfig, mu: float, tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
          privacy: PrivacyState | None = None) -> tuple[float, trainer.TrainResult]:
    """‖w − w_global‖ after one call from a fresh model (the global model), and the call's result."""
    model = build_model(ModelSpec.from_config(cfg))
    start = flat(get_trainable(model))
    result = train(model, TRAIN, tokenizer, cfg, privacy=privacy, feature_cache=tmp_path / "features",
                   proximal_mu=mu)
    return float((flat(get_trainable(model)) - start).norm()), result


def state(path: Path) -> PrivacyState:
    return PrivacyState.open(path, merchant_id="shop-1", target_epsilon=1e6, target_delta=1e-5)


# ----------------------------------------------------------------------------- the term itself


def test_the_term_is_the_gradient_of_mu_half_the_squared_distance() -> None:
    """Added at the optimizer's step, the term trains exactly as the loss with it added would."""
    torch.manual_seed(0)
    model, x, y, mu = torch.nn.Linear(4, 2), torch.randn(8, 4), torch.randn(8, 2), 0.7
    reference = copy.deepcopy(model)
    anchors = [p.detach().clone() for p in reference.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.05)
    with proximal_term(optimizer, mu):
        for _ in range(4):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for _ in range(4):
        reference_optimizer.zero_grad()
        term = sum(((p - a) ** 2).sum() for p, a in zip(reference.parameters(), anchors, strict=True))
        (torch.nn.functional.mse_loss(reference(x), y) + mu / 2 * term).backward()
        reference_optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert not optimizer._optimizer_step_pre_hooks  # gone after the call
    with pytest.raises(ValueError, match="proximal-mu"):
        with proximal_term(optimizer, -1.0):
            pass


# ----------------------------------------------------------------------------- (1) closer to global


@pytest.mark.parametrize(("trainable", "dp"), [("heads", False), ("heads", True), ("lora", True), ("top-k", True)])
def test_a_larger_mu_keeps_the_update_closer_to_the_global_model(
    trainable: str, dp: bool, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Non-private, and private in both per-sample modes the trainer uses (expanded weights for
    heads and LoRA, book-keeping for top-k)."""
    cfg = heads_config(trainable=trainable, dp=dp, noise_multiplier=1.0, head_learning_rate=0.05,
                       learning_rate=1e-2, max_local_steps=6, top_k_layers=1, target_epsilon=1e6)
    plain, _ = moved(cfg, 0.0, tokenizer, tmp_path, state(tmp_path / "a.json") if dp else None)
    held, _ = moved(cfg, 1.0, tokenizer, tmp_path, state(tmp_path / "b.json") if dp else None)
    # Measured: heads 2.1 -> 0.18 (non-private), 2.4-2.6 -> 0.23-0.25 (private), LoRA 1.5 -> 0.78.
    assert 0 < held < 0.75 * plain, (plain, held)


# ----------------------------------------------------------------------------- (2) not through clipping


def test_under_dp_the_term_is_not_clipped_and_the_mechanism_is_unchanged(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge μ against a tiny clipping norm: the gradient the optimizer applies is then far
    beyond anything clipped-and-noised gradients can reach, so the term joined after the
    mechanism; and the call records the very mechanism (σ, q, steps, C) and ε it would without it."""
    grad_norms: list[float] = []
    real = trainer.make_optimizer

    def recording(model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
        optimizer = real(model, config)

        def record(opt: torch.optim.Optimizer, *_: object) -> None:
            grads = [p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            grad_norms.append(float(torch.cat(grads).norm()))

        optimizer.register_step_post_hook(record)  # AdamW leaves .grad as it found it
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", recording)
    c, sigma, batch, steps = 1e-3, 1.0, 64, 4
    cfg = heads_config(dp=True, noise_multiplier=sigma, max_grad_norm=c, batch_size=batch, max_local_steps=steps,
                       head_learning_rate=0.05, target_epsilon=1e6)
    dims = sum(v.size for v in get_trainable(build_model(ModelSpec.from_config(cfg))).values())
    # What the mechanism can release per step: every record's gradient clipped to C, plus the
    # noise (σ·C·√d, here bounded by 3x its typical size), over the expected batch.
    bound = (len(TRAIN) * c + 3 * sigma * c * dims**0.5) / batch

    _, without = moved(cfg, 0.0, tokenizer, tmp_path, state(tmp_path / "a.json"))
    assert len(grad_norms) == steps and max(grad_norms) <= bound
    grad_norms.clear()
    _, with_term = moved(cfg, 1e4, tokenizer, tmp_path, state(tmp_path / "b.json"))
    assert len(grad_norms) == steps
    assert grad_norms[0] <= bound  # at w = w_global the term is zero
    assert min(grad_norms[1:]) > 1000 * bound  # afterwards it dominates, unclipped
    assert with_term.mechanism == without.mechanism and with_term.epsilon == without.epsilon
    assert state(tmp_path / "b.json").events == state(tmp_path / "a.json").events


# ----------------------------------------------------------------------------- (3) the server's μ reaches it


NODE_ID = 7


class OneNode:
    """The grid a strategy samples from: this one node, connected."""

    def get_node_ids(self) -> list[int]:
        return [NODE_ID]


def update_after(strategy: str, mu: float, global_params: dict[str, np.ndarray], merchant_dir: Path,
                 state_dir: Path) -> tuple[dict[str, np.ndarray], Any]:
    """One train round as the server runs it: the strategy's own ``configure_train`` makes the
    instruction, the ClientApp answers it; (the merchant's parameters, the config it was sent)."""
    run_config = RunConfig(encoder="tiny", max_local_steps=4, batch_size=16, max_seq_len=32, eval_max_examples=32,
                           dp=False, head_learning_rate=0.05, strategy=strategy, proximal_mu=mu)  # type: ignore[arg-type]
    sent = build_strategy(run_config).configure_train(
        1, params_to_record(global_params), ConfigRecord({MODEL_VERSION: 0, RUN_ID: "run"}),
        EligibleNodesGrid(OneNode(), [NODE_ID]))  # type: ignore[arg-type]
    (instruction,) = list(sent)
    content: RecordDict = instruction.content
    metadata = Metadata(run_id=1, message_id="msg-train-1", src_node_id=0, dst_node_id=NODE_ID,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type="train")
    context = Context(run_id=1, node_id=NODE_ID, state=RecordDict(), run_config=run_config.to_mapping(),
                      node_config={"data-dir": str(merchant_dir), "merchant-id": "shop-a",
                                   "state-dir": str(state_dir)})
    reply = client_app.app(Message(content=content, metadata=metadata), context)  # type: ignore[call-overload]
    assert not reply.has_error(), reply.error
    params = TrainReply.from_recorddict(reply.content).params
    assert params is not None
    return params, dict(content[CONFIG])


def test_fedprox_sends_mu_and_the_merchant_trains_by_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Message built outside a running ServerApp needs the identity Flower's runtime sets.
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1)
    global_params = dict(get_trainable(build_model(ModelSpec.from_config(RunConfig(encoder="tiny")))))

    def distance(params: dict[str, np.ndarray]) -> float:
        return float((flat(params) - flat(global_params)).norm())

    fedavg, sent_avg = update_after("fedavg", 1.0, global_params, merchant_dir, tmp_path / "s1")
    fedprox, sent_prox = update_after("fedprox", 1.0, global_params, merchant_dir, tmp_path / "s2")
    fedprox_0, _ = update_after("fedprox", 0.0, global_params, merchant_dir, tmp_path / "s3")
    # Flower's FedProx puts μ in the instruction; FedAvg does not, whatever the run config says.
    assert sent_prox[PROXIMAL_MU] == 1.0 and PROXIMAL_MU not in sent_avg
    # The same non-private call (same data, start and batches) but for μ: the update changes and
    # stays nearer the global model; with μ = 0 FedProx trains exactly as FedAvg.
    assert distance(fedprox) < 0.75 * distance(fedavg)
    for name in fedavg:
        np.testing.assert_array_equal(fedprox_0[name], fedavg[name])
