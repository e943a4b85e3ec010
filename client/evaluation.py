"""Scoring a model on a merchant's held-out examples: per-example losses and predictions, and
every task's metrics from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client.encoding import encode, trim
from shared import metrics as metrics_lib
from shared.config import RunConfig
from shared.progress import Progress
from shared.tasks import TASKS, Example, PerExampleLoss, predictions, task_of


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult:
    num_examples: int
    loss: float
    metrics: dict[str, float]


@torch.no_grad()
def predict(
    model: nn.Module,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    config: RunConfig,
    *,
    device: torch.device | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(per-example loss, per-example prediction on its task's natural scale), in ``examples``
    order; the model is left in the mode it was in."""
    device = device or torch.device("cpu")
    dataset = encode(examples, tokenizer, max_seq_len=config.max_seq_len)
    was_training = model.training
    model.to(device)
    model.eval()
    losses, preds = [], []
    with Progress("evaluating", len(examples), unit="examples") as shown:
        for batch in DataLoader(dataset, batch_size=batch_size):
            input_ids, attention_mask, token_type_ids, packed = trim(batch, device)
            scores = model(input_ids, attention_mask, token_type_ids)
            losses.append(PerExampleLoss(reduction="none")(scores, packed).cpu())
            own = task_of(packed).unsqueeze(1)
            preds.append(predictions(scores).gather(1, own).squeeze(1).cpu())
            shown.update(len(packed))
    model.train(was_training)
    return torch.cat(losses).numpy(), torch.cat(preds).numpy()


def metrics_of(examples: Sequence[Example], preds: np.ndarray) -> dict[str, float]:
    """Every task's metrics from per-example predictions (as ``predict`` returns them)."""
    result: dict[str, float] = {}
    for task in TASKS:
        idx = [i for i, e in enumerate(examples) if e.task == task]
        if not idx:
            continue
        result.update(metrics_lib.task_metrics(
            task,
            targets=np.array([examples[i].target for i in idx]),
            preds=preds[idx],
            groups=[examples[i].group for i in idx],
        ))
    return result


def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    config: RunConfig,
    *,
    device: torch.device | None = None,
    batch_size: int = 64,
) -> EvalResult:
    """Loss and every task's metrics on held-out examples (no privacy cost: nothing released
    but aggregate metrics, which the record-level guarantee does not cover; see README)."""
    if not examples:
        return EvalResult(num_examples=0, loss=float("nan"), metrics={})
    losses, preds = predict(model, examples, tokenizer, config, device=device, batch_size=batch_size)
    return EvalResult(num_examples=len(examples), loss=float(losses.mean()), metrics=metrics_of(examples, preds))
