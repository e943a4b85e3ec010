"""Book-keeping clipping's guard rails: what it refuses, and the model state it leaves.

That its clipped sums equal the per-example reference, for every trainable set, is tested in
``test_trainer.py`` next to Opacus' ghost clipping.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.bookkeeping import BookKeepingError, BookKeepingLoss, BookKeepingModule


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.layer(x))


class InPlace(nn.Module):
    """Changes the layer's output (harmless: its gradient is still the layer's) or, when
    ``input_too``, the layer's input after the layer read it (refused)."""

    def __init__(self, input_too: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.input_too = input_too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x * 1.0
        out = self.layer(hidden)
        out.mul_(2.0)
        if self.input_too:
            hidden.add_(1.0)
        return out.squeeze(1)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self.scale


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.embed(ids)).mean(1)).squeeze(1)


def squared_loss(reduction: str = "mean") -> nn.Module:
    return nn.MSELoss(reduction=reduction)


def test_trainable_layers_it_cannot_clip_are_refused_up_front() -> None:
    with pytest.raises(BookKeepingError, match=r"layer '0' \(Conv1d\).*supports Linear, LayerNorm, Embedding"):
        BookKeepingModule(nn.Sequential(nn.Conv1d(2, 2, 1)), max_grad_norm=1.0)
    with pytest.raises(BookKeepingError, match=r"layer '<model>' \(Functional\) has trainable parameters"):
        BookKeepingModule(Functional(), max_grad_norm=1.0)
    with pytest.raises(BookKeepingError, match="max_grad_norm = 0"):
        BookKeepingModule(Small(), max_grad_norm=0)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(BookKeepingError, match="layer '1' shares a trainable parameter"):
        BookKeepingModule(tied, max_grad_norm=1.0)
    frozen_conv = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Flatten(), nn.Linear(4, 1))
    frozen_conv[0].requires_grad_(False)
    BookKeepingModule(frozen_conv, max_grad_norm=1.0).remove_hooks()  # frozen layers may be anything


def test_a_layer_used_twice_is_refused_and_parameters_stay_trainable() -> None:
    model = BookKeepingModule(Twice(), max_grad_norm=1.0)
    with pytest.raises(BookKeepingError, match="layer 'layer' ran twice"):
        model(torch.randn(4, 3))
    assert all(p.requires_grad for p in model.parameters())  # restored despite the error


def test_in_place_changes_of_outputs_are_followed_and_of_inputs_refused() -> None:
    torch.manual_seed(0)
    x, targets = torch.randn(4, 3, requires_grad=True), torch.randn(4)
    inner = InPlace(input_too=False)
    model = BookKeepingModule(inner, max_grad_norm=1e6)  # no clipping: the plain gradient sum
    BookKeepingLoss(model, squared_loss())(model(x), targets).backward()
    reference = InPlace(input_too=False)
    reference.load_state_dict(inner.state_dict())
    nn.MSELoss(reduction="sum")(reference(x), targets).backward()
    for p, q in zip(inner.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    model.remove_hooks()

    refused = BookKeepingModule(InPlace(input_too=True), max_grad_norm=1.0)
    loss = BookKeepingLoss(refused, squared_loss())(refused(x), targets)
    with pytest.raises(BookKeepingError, match="input of layer 'layer' was modified in place"):
        loss.backward()
    assert all(p.grad is None for p in refused.parameters())


def test_eval_and_no_grad_forwards_record_nothing() -> None:
    model = BookKeepingModule(Small(), max_grad_norm=1.0)
    ids = torch.tensor([[1, 2, 0], [3, 3, 4]])
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids)
    model.train()
    assert model._calls == []
    with pytest.raises(BookKeepingError, match="no trainable layer ran"):
        model.clip_and_accumulate(torch.zeros(2))


def test_clipped_sum_bounds_every_record_and_skips_the_padding_row() -> None:
    torch.manual_seed(0)
    inner = Small()
    model = BookKeepingModule(inner, max_grad_norm=0.05)
    ids = torch.tensor([[1, 2, 0, 0], [3, 3, 4, 0], [5, 6, 7, 8]])
    targets = torch.tensor([3.0, -2.0, 5.0])
    loss = BookKeepingLoss(model, squared_loss())(model(ids), targets)
    assert loss.item() == pytest.approx(float(((inner(ids) - targets) ** 2).mean()), rel=1e-6)
    loss.backward()
    assert inner.embed.weight.grad is not None
    assert torch.count_nonzero(inner.embed.weight.grad[0]) == 0  # F.embedding's padding_idx rule
    # Each record's own clipped gradient has norm <= C, so their sum has norm <= 3 C.
    total = torch.cat([p.grad.flatten() for p in inner.parameters() if p.grad is not None])
    assert 0 < float(total.norm()) <= 3 * 0.05 + 1e-6
    # Alone, one record's clipped gradient is the unclipped one scaled to norm C (all three exceed it).
    for row in range(3):
        reference = Small()
        reference.load_state_dict(inner.state_dict())
        nn.MSELoss(reduction="sum")(reference(ids[row : row + 1]), targets[row : row + 1]).backward()
        assert float(torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()) > 0.05
    model.remove_hooks()
    assert model._handles == []


def test_criterion_without_reduction_is_refused() -> None:
    model = BookKeepingModule(Small(), max_grad_norm=1.0)
    with pytest.raises(BookKeepingError, match="has no 'reduction'"):
        BookKeepingLoss(model, nn.Identity())(model(torch.tensor([[1, 2]])))


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.unused = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)  # runs, but its output never reaches the loss
        return self.used(x).squeeze(1)


def test_a_layer_whose_output_misses_the_loss_gets_zero_gradients_to_be_noised() -> None:
    inner = Unused()
    model = BookKeepingModule(inner, max_grad_norm=1.0)
    BookKeepingLoss(model, squared_loss())(model(torch.randn(4, 3)), torch.randn(4)).backward()
    assert inner.unused.weight.grad is not None and inner.unused.bias.grad is not None
    assert not inner.unused.weight.grad.any() and not inner.unused.bias.grad.any()
    assert inner.used.weight.grad is not None and inner.used.weight.grad.any()
