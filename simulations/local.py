"""``fedshop train-local``: train and evaluate one merchant, or the union of several.

With one merchant folder this is what a merchant would get training alone; with several
and ``dp = false`` it is the centralised, non-private reference (all data pooled).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from client import evaluation, features, trainer
from client.data import load_merchant
from client.merchant import split_merchant
from shared.config import RunConfig
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


def train_local(dirs: list[Path], config: RunConfig, *, out_dir: Path, epochs_progress: bool = True) -> LocalResult:
    train_examples, tests = load_examples(dirs, config)
    test_all = [e for t in tests.values() for e in t]
    spec = ModelSpec.from_config(config)
    model = build_model(spec)
    tokenizer = load_tokenizer(spec)
    device = choose_device(config.device)
    before = evaluation.evaluate(model, test_all, tokenizer, config, device=device)
    privacy = None
    if config.dp:
        merchant_id = "+".join(sorted(tests)) if len(tests) > 1 else next(iter(tests))
        privacy = PrivacyState.open(out_dir / "privacy-state.json", merchant_id=merchant_id,
                                    target_epsilon=config.target_epsilon, target_delta=config.target_delta,
                                    accountant=config.accountant)

    def progress(step: int, total: int, loss: float) -> None:
        if epochs_progress and (step == total or step % max(1, total // 10) == 0):
            log.info("step %d/%d  loss %.4f", step, total, loss)

    cache = features.cache_dir(config.feature_cache_dir, out_dir / "features")
    result = trainer.train(model, train_examples, tokenizer, config, privacy=privacy, device=device,
                           on_step=progress, feature_cache=cache)
    after = evaluation.evaluate(model, test_all, tokenizer, config, device=device)
    per_merchant = {m: evaluation.evaluate(model, t, tokenizer, config, device=device) for m, t in tests.items()}
    export_model(model.cpu(), tokenizer, out_dir / "model", spec=spec)
    return LocalResult(train=result, before=before, after=after, per_merchant=per_merchant)


def describe(result: LocalResult, config: RunConfig) -> dict[str, Any]:
    return {
        "examples": result.train.num_examples,
        "steps": result.train.steps,
        "train_loss": result.train.mean_loss,
        "dp": config.dp,
        "epsilon": result.train.epsilon if config.dp else None,
        "delta": result.train.delta if config.dp else None,
        "grad_sample_mode": result.train.grad_sample_mode,
        "metrics_before": result.before.metrics,
        "metrics_after": result.after.metrics,
        "per_merchant": {m: r.metrics for m, r in result.per_merchant.items()},
    }
