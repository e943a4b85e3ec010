"""``fedshop train-local``: train and evaluate one merchant, or the union of several.

With one merchant folder this is what a merchant would get training alone; with several
and ``dp = false`` it is the centralised, non-private reference (all data pooled).

A private run spends the merchant's own budget: the same state file as its federated runs
(``<folder>/.fedshop/privacy-state.json``, or ``state_dir`` for a node whose config names
another ``state-dir``), locked across check → train → commit like a node's call, and created
(with the run config's budget, logged) if this folder never trained. Several folders with
``dp = true`` are refused: the pooled call would spend every merchant's budget at once, which
one state file cannot record.

How long it trains (``federation_steps``): as ``benchmarks/utility.py``'s reference arms do,
as many optimiser steps as the federation it stands beside. Pooled folders take the whole
federation's steps, rounds x merchants per round (at most the folders) x ``max-local-steps``
(the centralised arm); one folder the steps it would take if sampled every round, rounds x
``max-local-steps`` over rounds x ``local-epochs`` epochs (the merchant-alone arm). It is one
call: a noise plan (``noise-plan-calls``) plans σ for that one call of that many steps, so a
private merchant's run fits its budget for the steps it takes. ``steps`` (``--steps N``)
trains exactly N steps instead; ``max-local-steps = 0`` (no cap) leaves the epochs to bound it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client import evaluation, features, trainer
from client.data import load_merchant
from client.merchant import PRIVACY_STATE_FILE, privacy_state_path, split_merchant
from shared.config import ConfigError, RunConfig
from shared.model import ModelSpec, build_model, choose_device, export_model, load_tokenizer
from shared.privacy.budget import PrivacyState
from shared.tasks import Example

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LocalResult:
    train: trainer.TrainResult
    before: evaluation.EvalResult
    after: evaluation.EvalResult
    per_merchant: dict[str, evaluation.EvalResult]


def load_examples(dirs: list[Path], config: RunConfig) -> tuple[list[Example], dict[str, list[Example]]]:
    """Training examples of all folders, and each folder's held-out examples."""
    train_all: list[Example] = []
    tests: dict[str, list[Example]] = {}
    for directory in dirs:
        data = load_merchant(directory)  # raises DataValidationError with every problem; writes nothing
        split = split_merchant(data, config)  # the same held-out records a federated run evaluates on
        train_all.extend(split.train)
        tests[data.merchant_id] = split.test
    return train_all, tests


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The one call's run config for ``train-local``, and why it takes that many steps."""

    config: RunConfig
    why: str


# Epochs that never bind: the step count alone ends the call (``client.trainer.planned_steps``).
UNBOUNDED_EPOCHS = 1e9


def federation_steps(config: RunConfig, num_folders: int, *, steps: int | None = None) -> StepPlan:
    """``config`` with the steps of the federation ``train-local`` stands in for (module docstring):
    ``max_local_steps`` the call's step count, ``local_epochs`` its epochs, and a noise plan for
    this one call. ``steps``: exactly that many steps instead."""
    rounds, cap = config.num_server_rounds, config.max_local_steps
    per_round = min(config.merchants_per_round, num_folders)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"steps {steps}: must be at least 1")
        total, epochs, why = steps, UNBOUNDED_EPOCHS, "--steps"
    elif num_folders > 1:
        # The centralised arm: every step the federation takes, over all records pooled. With no
        # cap a call is epoch-bound, and a record is in a sampled merchant's call per_round/n of rounds.
        total = rounds * per_round * cap
        epochs = UNBOUNDED_EPOCHS if cap else rounds * config.local_epochs * per_round / num_folders
        why = (f"the federation's steps: {rounds} rounds x {per_round} merchants per round x "
               f"max-local-steps {cap}" if cap else
               f"max-local-steps = 0: {epochs:g} epochs, the federation's ({rounds} rounds x local-epochs "
               f"{config.local_epochs:g} x {per_round} of {num_folders} merchants per round)")
    else:
        # The merchant-alone arm: what it would train in the federation if sampled every round.
        total, epochs = rounds * cap, rounds * config.local_epochs
        why = (f"one merchant sampled every round: {rounds} rounds x max-local-steps {cap}, at most {epochs:g} "
               f"epochs ({rounds} x local-epochs {config.local_epochs:g})" if cap else
               f"max-local-steps = 0: {epochs:g} epochs ({rounds} rounds x local-epochs {config.local_epochs:g})")
    # One call holds every round's steps: a noise plan plans σ for it alone (this invocation
    # makes no other call), so the σ fits the merchant's budget for the steps it takes.
    plan_calls = min(config.noise_plan_calls, 1)
    return StepPlan(config.replace(max_local_steps=total, local_epochs=epochs, noise_plan_calls=plan_calls), why)


@contextlib.contextmanager
def merchant_privacy(merchant_id: str, merchant_dir: Path, config: RunConfig, *,
                     state_dir: Path | None = None) -> Iterator[PrivacyState]:
    """The merchant's own state (the federation's file), locked for one call; created if it has none."""
    path = Path(state_dir) / PRIVACY_STATE_FILE if state_dir else privacy_state_path(merchant_dir)
    with PrivacyState.locked(path, merchant_id=merchant_id, target_epsilon=config.target_epsilon,
                             target_delta=config.target_delta,
                             create=True) as state:
        yield state


def train_local(dirs: list[Path], config: RunConfig, *, out_dir: Path, epochs_progress: bool = True,
                state_dir: Path | None = None) -> LocalResult:
    """Train on ``dirs`` and evaluate; with DP (one folder only) the spend goes to the merchant's state
    (``state_dir``: the node's ``state-dir``, if not ``<folder>/.fedshop``)."""
    if config.dp and len(dirs) > 1:
        raise ConfigError("dp = true with several merchant folders: a pooled private call would spend each "
                          "merchant's budget; train one folder at a time, or pool with dp = false")
    train_examples, tests = load_examples(dirs, config)
    test_all = [e for t in tests.values() for e in t]
    spec = ModelSpec.from_config(config)
    model = build_model(spec)
    tokenizer = load_tokenizer(spec)
    device = choose_device(config.device)
    before = evaluation.evaluate(model, test_all, tokenizer, config, device=device)

    def progress(step: int, total: int, loss: float) -> None:
        if epochs_progress and (step == total or step % max(1, total // 10) == 0):
            log.info("step %d/%d  loss %.4f", step, total, loss)

    cache = features.cache_dir(config.feature_cache_dir, out_dir / "features")
    # A run id of its own per invocation: the state shows where the spend came from, and σ
    # planning (noise-plan-calls) counts this invocation's calls only.
    run_id = f"train-local-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with (merchant_privacy(next(iter(tests)), dirs[0], config, state_dir=state_dir) if config.dp
          else contextlib.nullcontext()) as privacy:
        result = trainer.train(model, train_examples, tokenizer, config, privacy=privacy, device=device,
                               on_step=progress, feature_cache=cache, run_id=run_id)
    after = evaluation.evaluate(model, test_all, tokenizer, config, device=device)
    per_merchant = {m: evaluation.evaluate(model, t, tokenizer, config, device=device) for m, t in tests.items()}
    export_model(model.cpu(), tokenizer, out_dir / "model", spec=spec)
    return LocalResult(train=result, before=before, after=after, per_merchant=per_merchant)


def describe(result: LocalResult, config: RunConfig, *, steps_why: str = "") -> dict[str, Any]:
    return {
        "examples": result.train.num_examples,
        "steps": result.train.steps,
        "steps_why": steps_why,
        "train_loss": result.train.mean_loss,
        "dp": config.dp,
        "epsilon": result.train.epsilon if config.dp else None,
        "delta": result.train.delta if config.dp else None,
        "grad_sample_mode": result.train.grad_sample_mode,
        "metrics_before": result.before.metrics,
        "metrics_after": result.after.metrics,
        "per_merchant": {m: r.metrics for m, r in result.per_merchant.items()},
    }
