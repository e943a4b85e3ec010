"""One merchant's local training call: DP-SGD (Opacus) or non-private.

Order of a private call, and why:
1. plan the mechanism (σ, q = 1 / ceil(N / batch) over N units, steps) and check the merchant's
   budget: a call that would exceed it raises ``BudgetExceededError`` before touching the model;
2. train with Poisson sampling, per-sample clipping and Gaussian noise; the unit is the run's
   ``privacy-unit``: records, or users (ULS, ``sampled_units``: one record per sampled user);
3. persist the spend (``PrivacyState.commit``) and only then return the parameters, so an
   update never leaves without its spend on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import dp, features, precondition, top_layers
from client import offsets as offsets_lib
from client import optimizer_state as optimizer_state_lib
from client.encoding import PairDataset, trim
from shared.config import RunConfig
from shared.model import is_head
from shared.privacy.budget import PrivacyState
from shared.privacy.events import MechanismEvent
from shared.progress import Progress
from shared.tasks import Example, PerExampleLoss

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    num_examples: int  # units sampled from (users under ULS, else records; a record may carry several tasks)
    steps: int
    mean_loss: float
    losses: list[float]
    mechanism: MechanismEvent | None  # None for a non-private call
    epsilon: float  # cumulative ε of this merchant after the call (0 when non-private)
    delta: float
    grad_sample_mode: str
    duration_s: float


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW, two parameter groups: heads at ``head-learning-rate``, everything else at ``learning-rate``."""
    heads = [p for n, p in model.named_parameters() if p.requires_grad and is_head(n)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not is_head(n)]
    groups = [{"params": heads, "lr": config.head_learning_rate}]
    if body:
        groups.append({"params": body, "lr": config.learning_rate})
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def sampled_units(records: PairDataset, config: RunConfig) -> list[list[int]] | None:
    """What a private call's Poisson sampling draws under ``privacy-unit = "user"`` (ULS): each
    unit's record indices, one record of each sampled unit per step, so clipping a record clips
    its unit (``client.dp.one_record_per_unit``); with ``max-records-per-unit`` k > 1 up to k records
    whose per-sample gradients are summed before clipping (heads, lora). None: records are sampled
    (``privacy-unit = "record"``, or a non-private call, which trains on every record)."""
    if not config.dp or config.privacy_unit != "user":
        return None
    mode = dp.grad_sample_mode_for(config.trainable, config.clipping)
    if config.max_records_per_unit > 1 and mode not in dp.PER_UNIT_SUM_MODES:
        raise ValueError(
            f"max-records-per-unit = {config.max_records_per_unit}: trainable = {config.trainable!r} (clipping = "
            f"{config.clipping!r}) clips without per-sample gradients (mode {mode!r}), so a unit's records cannot be "
            "summed before clipping; use max-records-per-unit = 1")
    return records.units


def planned_steps(num_units: int, config: RunConfig) -> tuple[float, int]:
    """(sample_rate, steps) of one call: epochs of N/batch steps (N units), capped by max-local-steps."""
    # Opacus' Poisson loader samples at 1 / len(DataLoader) = 1 / ceil(N / batch); account
    # exactly that rate (batch / N over-states it whenever batch does not divide N).
    sample_rate = 1.0 / math.ceil(num_units / config.batch_size)
    steps = max(1, math.ceil(config.local_epochs / sample_rate))
    if config.max_local_steps:
        steps = min(steps, config.max_local_steps)
    return sample_rate, steps


def train(model: nn.Module, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, config: RunConfig, *,
          privacy: PrivacyState | None, round: int = 0, model_version: int = 0, run_id: str = "",
          device: torch.device | None = None, on_step: Callable[[int, int, float], None] | None = None,
          feature_cache: Path | None = None, corpus_cache: Path | None = None, optimizer_state: Path | None = None,
          proximal_mu: float = 0.0, reserve: Sequence[MechanismEvent] = (),
          local_offsets: Path | None = None) -> TrainResult:
    """Train ``model`` in place on one merchant's examples; private iff ``config.dp``.

    ``feature_cache`` / ``corpus_cache``: where a frozen encoder's pooled states of the records /
    of ``precondition-corpus``'s texts are kept between calls (``training_view``; None = encode on
    every call). ``optimizer_state``: the file that carries the optimizer's state from call to
    call with ``keep-optimizer-state`` (None = never carried). ``proximal_mu``: FedProx's μ, as the
    server sent it (``proximal_term``; 0 = none). ``reserve``: releases the merchant still expects
    to make in this run besides training (its evaluations), which a noise plan leaves room for.
    ``local_offsets``: the file that keeps the merchant's own score offsets from call to call
    with ``local-offsets`` (``client.offsets``; None = none trained)."""
    start = time.perf_counter()
    device = device or torch.device("cpu")
    if config.dp and privacy is None:
        raise ValueError("dp = true needs the merchant's PrivacyState (its persisted accountant)")
    config = top_layers.round_config(config, round)  # encoder-rounds: heads-only rounds first
    records = PairDataset(examples, tokenizer, max_seq_len=config.max_seq_len)
    units = sampled_units(records, config)
    unit_count = len(records) if units is None else len(units)
    sample_rate, steps = planned_steps(unit_count, config)
    planned = plan_mechanism(config, privacy, sample_rate=sample_rate, steps=steps, run_id=run_id, reserve=reserve)

    model.to(device)
    model.train()
    view = training_view(model, tokenizer, records, config, device=device, feature_cache=feature_cache,
                         corpus_cache=corpus_cache)
    # The merchant's own offsets: trained in the same DP-SGD steps as the heads, never sent (client.offsets).
    own = local_offsets if config.local_offsets else None
    offsets = None if own is None else offsets_lib.resume(own, tasks=config.task_names, run_id=run_id).to(device)
    with offsets_lib.attached(view.model, offsets):  # among the heads' parameters (shared.model.is_head)
        optimizer = make_optimizer(view.model, config)
    kept = optimizer_state if config.keep_optimizer_state else None
    if kept is not None and not optimizer_state_lib.load(optimizer, kept, run_id=run_id) and config.encoder_rounds:
        top_layers.carry_heads_state(optimizer, kept, run_id=run_id)
    # Reproducible batch order for non-private calls only: a private call samples from its own
    # fresh generator (client.dp.make_private), since batches known in advance are not secret.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + round)
    loader = DataLoader(view.dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    with (offsets_lib.attached(view.model, offsets),  # again: the same parameters, now in Opacus' wrapper
          made_private(model, view.model, optimizer, loader, config, planned, units=units) as training,
          proximal_term(optimizer, proximal_mu), secret_dropout(config.dp, device)):
        losses = step_loop(training, view.batch, steps, device=device, on_step=on_step)
    view.finish()

    epsilon = 0.0
    if config.dp:
        assert privacy is not None and planned is not None
        epsilon = privacy.commit(planned, unit_count=unit_count, unit=config.privacy_unit, round=round,
                                 model_version=model_version, run_id=run_id)
    if kept is not None:
        optimizer_state_lib.save(optimizer, kept, run_id=run_id)
    if own is not None and offsets is not None:  # after the commit: never offsets of an unrecorded call
        offsets_lib.save(offsets, own, run_id=run_id)
    return TrainResult(
        num_examples=unit_count, steps=steps, mean_loss=float(np.mean(losses)) if losses else float("nan"),
        losses=losses, mechanism=planned, epsilon=epsilon,
        delta=privacy.target_delta if privacy is not None else 0.0, grad_sample_mode=training.mode,
        duration_s=time.perf_counter() - start,
    )


def plan_mechanism(config: RunConfig, privacy: PrivacyState | None, *, sample_rate: float, steps: int,
                   run_id: str = "", reserve: Sequence[MechanismEvent] = ()) -> MechanismEvent | None:
    """The call's mechanism (None when non-private), checked against the merchant's budget: raises
    ``BudgetExceededError`` before anything is trained or spent."""
    if not config.dp:
        return None
    assert privacy is not None
    sigma = config.noise_multiplier
    if config.noise_plan_calls:
        # This merchant's own σ: enough noise that the run's remaining planned calls fit, with
        # the evaluations it will still release (``reserve``) on top.
        remaining = max(1, config.noise_plan_calls - privacy.calls_in_run(run_id))
        sigma = privacy.planned_noise(sample_rate=sample_rate, steps=steps, max_grad_norm=config.max_grad_norm,
                                      calls=remaining, floor=config.noise_multiplier, reserve=reserve)
    planned = MechanismEvent(noise_multiplier=sigma, sample_rate=sample_rate,
                             steps=steps, max_grad_norm=config.max_grad_norm)
    privacy.check(planned)  # raises BudgetExceededError; nothing trained, nothing spent
    return planned


@dataclasses.dataclass(frozen=True)
class RecordsView:
    """What a training call trains when the encoder trains too: the whole model on every record's
    tokens, padding trimmed per batch. (``features.HeadsView`` is the frozen-encoder one.)"""

    model: nn.Module
    dataset: Dataset

    @staticmethod
    def batch(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
        return trim(batch, device)

    def finish(self) -> None:
        pass


def training_view(model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: PairDataset, config: RunConfig, *,
                  device: torch.device, feature_cache: Path | None = None,
                  corpus_cache: Path | None = None) -> RecordsView | features.HeadsView | top_layers.TopLayersView:
    """The module a call trains and the dataset its loader samples: the records through the whole
    model; with ``trainable = top-k`` the top layers and heads on each record's cached states
    below them (``client.top_layers``); or with a frozen encoder (``trainable = heads``) the
    heads on each record's cached pooled state, in ``precondition-corpus``'s whitened
    coordinates when the run names one."""
    if top_layers.heads_round(config):
        return top_layers.heads_view(model, tokenizer, records.pairs, records.targets,
                                     top_k_layers=config.top_k_layers, max_seq_len=config.max_seq_len,
                                     device=device, cache_dir=feature_cache)
    if config.trainable == "top-k":
        return top_layers.TopLayersView.of(model, tokenizer, records.pairs, records.targets,
                                           top_k_layers=config.top_k_layers, max_seq_len=config.max_seq_len,
                                           device=device, cache_dir=feature_cache)
    if config.trainable != "heads":
        return RecordsView(model, records)
    view = features.HeadsView.of(model, tokenizer, records.pairs, records.targets, max_seq_len=config.max_seq_len,
                                 device=device, cache_dir=feature_cache, precision=config.encode_precision)
    if not config.precondition_corpus:
        return view
    if corpus_cache is None and feature_cache is not None:
        corpus_cache = feature_cache / precondition.CACHE_FOLDER
    return view.whitened(precondition.from_corpus(config.precondition_corpus, view.target, tokenizer,
                                                  max_seq_len=config.max_seq_len, device=device,
                                                  cache_dir=corpus_cache, precision=config.encode_precision))


@contextlib.contextmanager
def made_private(model: nn.Module, trained: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 config: RunConfig, planned: MechanismEvent | None,
                 units: list[list[int]] | None = None) -> Iterator[dp.PrivateTraining]:
    """``trained``, ``optimizer`` and ``loader`` as the step loop drives them: wrapped by Opacus for
    ``planned`` (Poisson sampling, per-sample clipping, noise; the per-sample mode chosen for the
    trainable set and clipping; ``units``: one record per sampled unit, ``sampled_units``), as they
    are for a non-private call (mode ``none``). On the way
    out, whatever happened, Opacus' hooks and per-sample state leave ``model``: left attached,
    the next private call on the same model fails with "Trying to add hooks twice"."""
    criterion: nn.Module = PerExampleLoss()
    if planned is None:
        yield dp.PrivateTraining(model=trained, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                 mode="none")
        return
    private = dp.make_private(model=trained, optimizer=optimizer, data_loader=loader, criterion=criterion,
                              noise_multiplier=planned.noise_multiplier, max_grad_norm=config.max_grad_norm,
                              mode=dp.grad_sample_mode_for(config.trainable, config.clipping),
                              clipping=config.clipping, units=units, records_per_unit=config.max_records_per_unit)
    try:
        yield private
    finally:
        private.model.remove_hooks()  # type: ignore[operator]
        _strip_opacus(model)


@contextlib.contextmanager
def proximal_term(optimizer: torch.optim.Optimizer, mu: float) -> Iterator[None]:
    """FedProx's local objective: the loss plus (μ/2)‖w − w_global‖² over the parameters
    ``optimizer`` trains, w_global being their values on entry (the global model received).

    The term's gradient, μ(w − w_global), is added to each parameter's gradient as ``optimizer``
    steps: for a non-private call exactly the gradient of the loss with the term added. In a
    private call ``optimizer`` is the one Opacus wraps, and Opacus' step clips the per-sample
    gradients, sums, noises and scales them *before* it calls this optimizer's step
    (``DPOptimizer.step``: ``pre_step()``, then ``original_optimizer.step()``), so the term
    joins after the mechanism: it is not clipped and does not eat the clipping norm. That costs no
    privacy: the term reads no record, only the parameters (the output of the call's earlier,
    already noised steps) and the global model the server sent, so adding it is post-processing,
    and the mechanism — σ, q, steps, C — is what the call accounts either way. (Heads trained
    in ``precondition-corpus``'s coordinates are held near the global heads in those
    coordinates: the same term in another metric.)"""
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"proximal-mu = {mu!r}: must be a finite number >= 0")
    if mu == 0:
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    anchors = [p.detach().clone() for p in params]

    @torch.no_grad()
    def add_term(*_: object) -> None:
        for p, anchor in zip(params, anchors, strict=True):
            pull = (p - anchor) * mu
            p.grad = pull if p.grad is None else p.grad + pull

    handle = optimizer.register_step_pre_hook(add_term)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def secret_dropout(private: bool, device: torch.device) -> Iterator[None]:
    """Dropout masks of a private call drawn from fresh OS entropy, not torch's global generator.

    ``build_model`` seeds the global generator from the run config, so every process drew the
    same masks call after call; the masks are part of the randomness the accounting assumes
    secret. The global generator (CPU, and the call's CUDA device) is forked and restored, so
    nothing outside the call sees a different state; a non-private call keeps reproducible masks.
    """
    if not private:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(secrets.randbits(63))  # seeds the CPU and every CUDA generator
        yield


def step_loop(training: dp.PrivateTraining, to_device: Callable[..., tuple[torch.Tensor, ...]], steps: int, *,
              device: torch.device, on_step: Callable[[int, int, float], None] | None = None) -> list[float]:
    """``steps`` optimizer steps, the loader iterated as often as that takes; each non-empty batch's loss."""
    params = [p for group in training.optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    done = 0
    with Progress("training", steps, unit="steps") as shown:
        while done < steps:
            for batch in training.data_loader:
                if done >= steps:
                    break
                *inputs, packed = to_device(batch, device)
                training.optimizer.zero_grad(set_to_none=True)
                if len(packed) == 0:
                    # An empty Poisson batch is still one mechanism invocation: release a
                    # noise-only step so what is released matches what is accounted.
                    _zero_batch_grads(params, training.mode)
                    training.optimizer.step()
                else:
                    loss = training.criterion(training.model(*inputs), packed)
                    with warnings.catch_warnings():
                        # Opacus' hooks sit on layers whose inputs (token ids) need no
                        # gradient; torch warns about that harmless case on every step.
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    training.optimizer.step()
                    # Ghost clipping returns a wrapper, not a Tensor; both expose .item().
                    losses.append(float(loss.item()))
                done += 1
                shown.update()
                if on_step is not None:
                    on_step(done, steps, losses[-1] if losses else float("nan"))
    return losses


def _zero_batch_grads(params: list[nn.Parameter], mode: str) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)
        if mode not in ("ghost", "bk"):  # modes that clip without storing per-sample gradients
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]


def _strip_opacus(model: nn.Module) -> None:
    """Remove per-sample state Opacus attached to parameters so the model is plain again."""
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
