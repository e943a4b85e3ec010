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


def record_norms(reference: list[dict[str, torch.Tensor]], names: list[str] | None = None) -> torch.Tensor:
    """Each record's gradient norm over ``names`` (default: every parameter in the reference)."""
    names = list(reference[0]) if names is None else names
    return torch.stack([torch.stack([(g[n] ** 2).sum() for n in names]).sum().sqrt() for g in reference])


def clipped_mean(reference: list[dict[str, torch.Tensor]], max_grad_norm: float
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What DP-SGD without noise must produce from per-example gradients: per parameter,
    Σ_i factor_i g_i / batch, with Opacus' clip factor min(1, C / (‖g_i‖ + 1e-6)); and the factors."""
    factor = (max_grad_norm / (record_norms(reference) + 1e-6)).clamp(max=1.0)
    mean = {}
    for name in reference[0]:
        per_example = torch.stack([r[name] for r in reference])
        mean[name] = (factor.view(-1, *([1] * (per_example.dim() - 1))) * per_example).sum(0) / len(reference)
    return mean, factor


def median_norm(reference: list[dict[str, torch.Tensor]]) -> float:
    """A clipping bound that clips some records and not others (the median per-example norm)."""
    norms = record_norms(reference)
    return float(norms.sort().values[(len(norms) - 1) // 2 : len(norms) // 2 + 1].mean())
