"""Task definitions: what each head predicts, its target range, and its per-example loss.

Every head scores one (context text, product text) pair. The context is a search query
(relevance, and clicks that came from a search), the user's recent products
(history-based recommendation), or empty.

All losses are *pointwise* and per example. A pairwise or listwise ranking loss would mix
examples inside a batch, and then the DP unit would have to be the whole query group;
keeping every loss pointwise keeps the guarantee record-level (one judgment or one
interaction), which is what the accountant assumes.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

TaskName = Literal["ctr", "rating", "relevance"]
TASKS: tuple[TaskName, ...] = ("ctr", "rating", "relevance")
TASK_INDEX: dict[str, int] = {name: i for i, name in enumerate(TASKS)}

RATING_MIN, RATING_MAX = 1.0, 5.0
RELEVANCE_MAX = 3.0  # graded judgments 0..3 (ESCI: Exact 3, Substitute 2, Complement 1, Irrelevant 0)


@dataclasses.dataclass(frozen=True)
class Example:
    """One training or evaluation record: the DP unit."""

    task: TaskName
    context: str
    product: str
    target: float  # ctr: 0/1, rating: 1..5, relevance: 0..3
    group: str = ""  # query or user the record belongs to (ranking metrics group by it)
    product_id: str = ""


def per_example_loss(scores: torch.Tensor, task_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of each example under the head of its own task; shape ``[batch]``.

    ``scores`` is ``[batch, len(TASKS)]`` (every head's raw output). Heads are compared on
    comparable scales: the rating is regressed in [0, 1] units and relevance is a graded
    binary cross-entropy on ``label / 3``, so no task dominates the clipped gradient.
    """
    own = scores.gather(1, task_ids.long().unsqueeze(1)).squeeze(1)
    ctr = F.binary_cross_entropy_with_logits(own, targets, reduction="none")
    rating_unit = (targets - RATING_MIN) / (RATING_MAX - RATING_MIN)
    rating = (torch.sigmoid(own) - rating_unit) ** 2
    relevance = F.binary_cross_entropy_with_logits(
        own, (targets / RELEVANCE_MAX).clamp(0.0, 1.0), reduction="none"
    )
    return torch.where(
        task_ids == TASK_INDEX["ctr"], ctr, torch.where(task_ids == TASK_INDEX["rating"], rating, relevance)
    )


def predictions(scores: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Map each example's head output to its task's natural scale.

    ctr -> probability, rating -> stars in [1, 5], relevance -> expected grade in [0, 3].
    """
    own = torch.sigmoid(scores.gather(1, task_ids.long().unsqueeze(1)).squeeze(1))
    rating = RATING_MIN + own * (RATING_MAX - RATING_MIN)
    relevance = own * RELEVANCE_MAX
    return torch.where(
        task_ids == TASK_INDEX["ctr"], own, torch.where(task_ids == TASK_INDEX["rating"], rating, relevance)
    )


class PerExampleLoss(torch.nn.Module):
    """``per_example_loss`` as a criterion over (scores, targets[:, 0]=task, targets[:, 1]=value).

    Opacus' ghost clipping wraps the criterion and sets ``reduction = "none"`` on it; the
    mean is taken only when asked for, so the same object serves both modes.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, scores: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        losses = per_example_loss(scores, packed[:, 0], packed[:, 1])
        if self.reduction == "none":
            return losses
        if self.reduction == "sum":
            return losses.sum()
        return losses.mean()
