"""Scoring a model on a merchant's held-out examples: per-example losses and predictions, and
every task's metrics from them; with the merchant's local offsets (``client.offsets``) on the
heads' scores when it has them, so that what it measures is the model it serves."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import features
from client.encoding import encode, trim
from client.offsets import Offsets
from shared import metrics as metrics_lib
from shared.config import RunConfig
from shared.model import FedShopModel, head_scores
from shared.progress import Progress
from shared.tasks import TASKS, Example, PerExampleLoss, pack_targets, predictions, task_of

# Under a node's feature cache: the held-out records' states, apart from the training records'
# (a cache folder keeps one record set; sharing one, each would evict the other every round).
HELD_OUT_FOLDER = "held-out"


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
    feature_cache: Path | None = None,
    offsets: Offsets | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(per-example loss, per-example prediction on its task's natural scale), in ``examples``
    order; the model is left in the mode it was in. With a frozen encoder (``trainable =
    heads``) and a ``feature_cache`` folder, the heads score the records' cached pooled states
    (``client.features``): the encoder runs once per held-out record, not once per evaluation.
    ``offsets``: a merchant's own offsets, added to the heads' scores (None: the model alone)."""
    device = device or torch.device("cpu")
    shift = _on(offsets, device)
    if config.trainable == "heads" and feature_cache is not None and isinstance(model, FedShopModel):
        return _predict_on_states(model, examples, tokenizer, config, device=device,
                                  cache_dir=Path(feature_cache) / HELD_OUT_FOLDER, offsets=shift)
    dataset = encode(examples, tokenizer, max_seq_len=config.max_seq_len)
    was_training = model.training
    model.to(device)
    model.eval()
    losses, preds = [], []
    with Progress("evaluating", len(examples), unit="examples") as shown:
        for batch in DataLoader(dataset, batch_size=batch_size):
            input_ids, attention_mask, token_type_ids, packed = trim(batch, device)
            loss, pred = _scored(shift(model(input_ids, attention_mask, token_type_ids)), packed)
            losses.append(loss)
            preds.append(pred)
            shown.update(len(packed))
    model.train(was_training)
    return torch.cat(losses).numpy(), torch.cat(preds).numpy()


@torch.no_grad()
def _predict_on_states(model: FedShopModel, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
                       config: RunConfig, *, device: torch.device, cache_dir: Path,
                       offsets: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``predict`` for a frozen encoder: the heads on each distinct (context, product) pair's
    pooled state (a record with two tasks is one pair, encoded once), from ``cache_dir``."""
    index: dict[tuple[str, str], int] = {}
    for e in examples:
        index.setdefault((e.context, e.product), len(index))
    states = features.pooled_states(model, tokenizer, list(index), max_seq_len=config.max_seq_len, device=device,
                                    cache_dir=cache_dir, precision=config.encode_precision)
    rows = torch.tensor([index[(e.context, e.product)] for e in examples])
    packed = torch.tensor([pack_targets([e]) for e in examples], dtype=torch.float32)
    was_training = model.training
    model.to(device)
    model.eval()  # dropout off, as in ``predict``
    try:
        scores = offsets(head_scores(model.heads, model.dropout, states[rows].to(device)))
    finally:
        model.train(was_training)
    losses, preds = _scored(scores, packed.to(device))
    return losses.numpy(), preds.numpy()


def _scored(scores: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example loss, prediction of each example's own task) on the CPU, from every head's
    scores and the packed targets: what both ``predict`` paths return."""
    losses = PerExampleLoss(reduction="none")(scores, packed).cpu()
    preds = predictions(scores).gather(1, task_of(packed).unsqueeze(1)).squeeze(1).cpu()
    return losses, preds


def _on(offsets: Offsets | None, device: torch.device) -> nn.Module:
    """The offsets on ``device`` in eval mode, or the identity."""
    return nn.Identity() if offsets is None else offsets.to(device).eval()


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
    feature_cache: Path | None = None,
    offsets: Offsets | None = None,
) -> EvalResult:
    """Exact loss and every task's metrics on held-out examples: for non-private baselines and
    benchmark-side measurement. What a private merchant releases is ``client.release``'s."""
    if not examples:
        return EvalResult(num_examples=0, loss=float("nan"), metrics={})
    losses, preds = predict(model, examples, tokenizer, config, device=device, batch_size=batch_size,
                            feature_cache=feature_cache, offsets=offsets)
    return EvalResult(num_examples=len(examples), loss=float(losses.mean()), metrics=metrics_of(examples, preds))
