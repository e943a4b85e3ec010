"""The per-sample gradient reference: each record's loss gradient, computed with that record alone."""

from __future__ import annotations

import torch

from shared.tasks import PerExampleLoss


def per_example_grads(model: torch.nn.Module, x: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One dict per row of the batch ``x`` (input ids, mask, token types, packed targets)."""
    grads = []
    for i in range(len(x[0])):
        model.zero_grad(set_to_none=True)
        scores = model(x[0][i : i + 1], x[1][i : i + 1], x[2][i : i + 1])
        PerExampleLoss(reduction="sum")(scores, x[3][i : i + 1]).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None})
    return grads
