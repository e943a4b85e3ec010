"""Book-keeping clipping ("bk"): DP-SGD's per-sample clipping in one backward pass.

Why it exists: Opacus' ghost clipping never materialises per-sample gradients, but it runs two
backward passes, and the first computes every weight gradient only to throw it away. On
MiniLM-L6 that made a top-2 DP step 1.6x and a full one 2.0x the non-private step. Here the
single backward pass computes activation gradients only, and each weight's clipped gradient
sum is formed afterwards with the same matmul a non-private backward would have done.

One step:

1. forward with the trainable parameters' ``requires_grad`` switched off, so the autograd graph
   holds no weight-gradient work; a forward hook on every layer that owns trainable
   parameters keeps its input ``a`` and puts a gradient hook on its output ``z`` (``z`` is
   made to require grad if nothing below it does);
2. one ``backward`` of Σ_i loss_i: as each layer's output gradient ``g`` arrives, the hook turns
   it into each record's squared gradient norm for that layer, without forming the gradient
   (ghost norms: Gram matrices over the sequence), and keeps ``g``;
3. clip factor ``min(1, C / (‖∇_i‖ + 1e-6))`` (Opacus' factor) from the norms summed over layers
   (or, with clipping groups, per group against ``C / sqrt(G)``);
4. every parameter's ``.grad`` = Σ_i factor_i ∇_i, from ``(a, factor · g)``.

Noise and the division by the expected batch size are left to Opacus' optimizer for
pre-clipped gradients (``client.dp.make_private``), and so is Poisson sampling.

Supported layers: ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding`` (what BERT-style encoders,
peft's LoRA adapters and the task heads are made of). A model with trainable parameters
anywhere else is refused up front; a layer called twice in one forward pass, or whose input
is changed in place after it ran, is refused at that step (either would make the norms wrong).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.LayerNorm, nn.Embedding)


class BookKeepingError(ValueError):
    """The model or a forward pass does not fit the book-keeping algorithm; says where."""


@dataclasses.dataclass
class _Call:
    """One trainable layer's part of one forward pass."""

    name: str
    layer: nn.Module
    inputs: torch.Tensor
    version: int  # inputs._version when recorded: an in-place change after that voids ``inputs``
    squared: torch.Tensor | None = None  # each record's ‖∇‖² over this layer, once backward got here
    grad: torch.Tensor | None = None  # ∂(Σ loss)/∂output as [B, T, out] (Linear, Embedding)
    samples: list[tuple[nn.Parameter, torch.Tensor]] | None = None  # per-record gradients (LayerNorm)

    def release(self) -> None:
        """Drop the tensors: the output's gradient hook (part of the autograd graph, which lives
        as long as the caller keeps the scores) still refers to this record."""
        self.inputs = torch.empty(0)
        self.squared = self.grad = self.samples = None


class BookKeepingModule(nn.Module):
    """Wraps ``module`` (kept as ``_module``, like Opacus' wrappers) for book-keeping clipping."""

    def __init__(self, module: nn.Module, *, max_grad_norm: float,
                 group_of: Callable[[str], str] | None = None) -> None:
        """``group_of`` maps a layer name to its clipping group; each of the G groups is clipped
        to ``max_grad_norm / sqrt(G)`` on its own, so a record's whole gradient still has norm
        at most ``max_grad_norm`` (the sensitivity the noise is calibrated to) whatever G is."""
        super().__init__()
        if not max_grad_norm > 0:
            raise BookKeepingError(f"max_grad_norm = {max_grad_norm}: must be > 0")
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self._layers = dict(_trainable_layers(module))
        self._group = {name: (group_of(name) if group_of else "all") for name in self._layers}
        # G counts every group with trainable layers, not only those a step reaches: the
        # bound per group must not depend on the data.
        self._group_bound = self.max_grad_norm / math.sqrt(len(set(self._group.values())))
        self._params = [p for layer in self._layers.values() for p in _own_trainable(layer)]
        self._names = {layer: name for name, layer in self._layers.items()}
        self._calls: list[_Call] = []
        self._grams: dict[tuple[Any, ...], torch.Tensor] = {}  # q, k and v read one input: one a aᵀ
        self._recording = False
        self._handles = [layer.register_forward_hook(self._capture) for layer in self._layers.values()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (torch.is_grad_enabled() and self.training):
            return self._module(*args, **kwargs)
        self._calls, self._grams = [], {}
        self._recording = True
        for p in self._params:
            p.requires_grad_(False)
        try:
            return self._module(*args, **kwargs)
        finally:
            for p in self._params:
                p.requires_grad_(True)
            self._recording = False

    def _capture(self, layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not self._recording:
            return None
        name = self._names[layer]
        if any(call.layer is layer for call in self._calls):
            raise BookKeepingError(f"layer {name!r} ran twice in one forward pass; book-keeping clipping "
                                   "needs each trainable layer used once (use grad-sample-mode = 'ghost')")
        if not isinstance(output, torch.Tensor):
            raise BookKeepingError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
        call = _Call(name, layer, inputs[0].detach(), inputs[0]._version)
        # Hooks, not references to the outputs: each gradient is turned into norms (and, for
        # layer norms, into small per-record gradients) as soon as backward produces it, and
        # no output is kept alive past the point where autograd itself would free it. A hook
        # registered now also sees the gradient of this value even if it is changed in place.
        if output.requires_grad:
            output.register_hook(lambda g: self._on_grad(call, g))
        else:
            # Nothing below this layer trains: make its output the place backward stops, and
            # take the gradient that lands there instead of leaving it in ``.grad``.
            output.requires_grad_(True)
            output.register_post_accumulate_grad_hook(lambda t: self._on_leaf_grad(call, t))
        self._calls.append(call)
        return output

    def _on_leaf_grad(self, call: _Call, leaf: torch.Tensor) -> None:
        grad, leaf.grad = leaf.grad, None
        assert grad is not None
        self._on_grad(call, grad)

    def _on_grad(self, call: _Call, grad: torch.Tensor) -> None:
        if call.squared is not None:
            raise BookKeepingError(f"layer {call.name!r}: its output received two gradients in one backward pass")
        g = _per_record(grad.detach(), grad.shape[0])
        call.squared = _squared_norms(call, g, self._grams)
        if not isinstance(call.layer, nn.LayerNorm):
            call.grad = g  # the one thing kept that a non-private step would not keep

    def clip_and_accumulate(self, per_sample_loss: torch.Tensor) -> None:
        """One backward pass; leaves Σ_i clip_i ∇_i loss_i in each trainable parameter's ``.grad``."""
        calls, self._calls = self._calls, []
        if per_sample_loss.dim() != 1:
            raise BookKeepingError(f"need one loss per record, got shape {tuple(per_sample_loss.shape)}")
        if not calls:
            raise BookKeepingError("no trainable layer ran in the forward pass before backward")
        for call in calls:
            if call.inputs._version != call.version:
                raise BookKeepingError(f"the input of layer {call.name!r} was modified in place after the layer "
                                       "ran; its gradient cannot be formed (use grad-sample-mode = 'ghost')")
        batch = per_sample_loss.shape[0]
        # Only activation gradients: no parameter required grad while the graph was built.
        torch.autograd.backward(per_sample_loss.sum())
        self._grams = {}
        squared = {group: torch.zeros(batch, dtype=per_sample_loss.dtype, device=per_sample_loss.device)
                   for group in set(self._group.values())}
        for call in calls:
            if call.squared is not None:  # None: the layer's output did not reach the loss
                if call.squared.shape[0] != batch:
                    raise BookKeepingError(f"layer {call.name!r} saw a batch of {call.squared.shape[0]}, the loss "
                                           f"{batch}: the batch must be the first dimension")
                squared[self._group[call.name]] += call.squared.to(per_sample_loss.dtype)
        factor = {group: (self._group_bound / (sq.sqrt() + 1e-6)).clamp(max=1.0) for group, sq in squared.items()}
        # Layer by layer, dropping each layer's (a, g) once its sums are formed.
        while calls:
            call = calls.pop()
            for p, grad in _clipped_sums(call, factor[self._group[call.name]]):
                p.grad = grad if p.grad is None else p.grad + grad
            call.release()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls, self._grams = [], {}


class BookKeepingLoss:
    """Criterion for book-keeping mode: ``criterion(scores, targets)`` gives a loss whose
    ``backward()`` runs ``clip_and_accumulate``; ``item()`` is the batch's mean loss."""

    def __init__(self, module: BookKeepingModule, criterion: nn.Module) -> None:
        self.module = module
        self.criterion = criterion

    def __call__(self, *args: Any) -> _PendingLoss:
        reduction = getattr(self.criterion, "reduction", None)
        if reduction is None:
            raise BookKeepingError(f"criterion {type(self.criterion).__name__} has no 'reduction'; "
                                   "book-keeping needs per-record losses")
        setattr(self.criterion, "reduction", "none")  # noqa: B010 (nn.Module's typing rejects a str)
        try:
            losses = self.criterion(*args)
        finally:
            setattr(self.criterion, "reduction", reduction)  # noqa: B010
        return _PendingLoss(self.module, losses)


class _PendingLoss:
    def __init__(self, module: BookKeepingModule, losses: torch.Tensor) -> None:
        self.module = module
        self.losses = losses

    def backward(self) -> None:
        self.module.clip_and_accumulate(self.losses)

    def item(self) -> float:
        return float(self.losses.detach().mean().item())


# ----------------------------------------------------------------------------- layers


def _own_trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def _trainable_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    seen: set[int] = set()
    for name, layer in module.named_modules():
        name = name or "<model>"
        params = _own_trainable(layer)
        if not params:
            continue
        if not isinstance(layer, SUPPORTED):
            raise BookKeepingError(f"layer {name!r} ({type(layer).__name__}) has trainable parameters; "
                                   f"book-keeping clipping supports {', '.join(t.__name__ for t in SUPPORTED)}")
        if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.scale_grad_by_freq
                                                or layer.sparse):
            raise BookKeepingError(f"embedding {name!r}: max_norm, scale_grad_by_freq and sparse are unsupported")
        if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) != 1:
            raise BookKeepingError(f"layer norm {name!r} normalises over {tuple(layer.normalized_shape)}; "
                                   "book-keeping clipping supports the last dimension only")
        for p in params:
            if id(p) in seen:
                raise BookKeepingError(f"layer {name!r} shares a trainable parameter with another layer")
            seen.add(id(p))
        yield name, layer


def _per_record(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, ..., d] -> [B, T, d]: every position of a record in one sequence axis."""
    if t.shape[0] != batch:
        raise BookKeepingError(f"layer output has batch {t.shape[0]}, loss has {batch}: batch must be dim 0")
    return t.reshape(batch, -1, t.shape[-1]) if t.dim() != 2 else t.unsqueeze(1)


def _squared_norms(call: _Call, g: torch.Tensor, grams: dict[tuple[Any, ...], torch.Tensor]) -> torch.Tensor:
    """‖∇_i‖² of each record over the call's layer's trainable parameters; g is [B, T, out]."""
    layer = call.layer
    batch = g.shape[0]
    if isinstance(layer, nn.Linear):
        total = torch.zeros(batch, dtype=g.dtype, device=g.device)
        if layer.weight.requires_grad:
            # ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s): T×T Gram matrices, never out×in.
            key = (call.inputs.data_ptr(), call.inputs.shape, call.inputs.stride(), g.dtype)
            if key not in grams:
                a = _per_record(call.inputs, batch).to(g.dtype)
                grams[key] = a @ a.transpose(1, 2)
            total += (grams[key] * (g @ g.transpose(1, 2))).sum((1, 2))
        if layer.bias is not None and layer.bias.requires_grad:
            total += g.sum(1).pow(2).sum(1)
        return total.clamp(min=0)
    if isinstance(layer, nn.Embedding):
        ids = call.inputs.reshape(batch, -1)
        g = _mask_padding(layer, ids, g)
        # Positions holding the same token add up in one row: Σ_{t,s: id_t = id_s} g_t·g_s.
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        return (same * (g @ g.transpose(1, 2))).sum((1, 2)).clamp(min=0)
    call.samples = _layer_norm_samples(layer, call.inputs, g)  # kept for _clipped_sums; g is not
    return torch.stack([ps.pow(2).flatten(1).sum(1) for _, ps in call.samples]).sum(0)


def _clipped_sums(call: _Call, factor: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, Σ_i factor_i ∇_i) for the call's layer's trainable parameters; zeros for a
    layer whose output did not reach the loss (DP-SGD still adds noise to them)."""
    layer = call.layer
    if call.squared is None:
        for p in _own_trainable(layer):
            yield p, torch.zeros_like(p)
        return
    if isinstance(layer, nn.LayerNorm):
        assert call.samples is not None
        for p, ps in call.samples:
            yield p, factor.to(ps.dtype) @ ps
        return
    g = call.grad
    assert g is not None
    scaled = g * factor.to(g.dtype).view(-1, 1, 1)
    if isinstance(layer, nn.Linear):
        flat = scaled.reshape(-1, scaled.shape[-1])
        if layer.weight.requires_grad:
            a = call.inputs.reshape(-1, call.inputs.shape[-1]).to(g.dtype)
            yield layer.weight, flat.t() @ a
        if layer.bias is not None and layer.bias.requires_grad:
            yield layer.bias, flat.sum(0)
        return
    assert isinstance(layer, nn.Embedding)
    ids = call.inputs.reshape(g.shape[0], -1)
    scaled = _mask_padding(layer, ids, scaled)
    grad = torch.zeros_like(layer.weight)
    grad.index_add_(0, ids.reshape(-1), scaled.reshape(-1, scaled.shape[-1]))
    yield layer.weight, grad


def _mask_padding(layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The padding row gets no gradient (as in ``F.embedding``), so it adds to no norm."""
    if layer.padding_idx is None:
        return g
    return g * (ids != layer.padding_idx).unsqueeze(-1).to(g.dtype)


def _layer_norm_samples(layer: nn.Module, inputs: torch.Tensor,
                        g: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Per-record gradients of a layer norm's weight and bias ([B, d] each: small)."""
    assert isinstance(layer, nn.LayerNorm)
    batch = g.shape[0]
    x = _per_record(inputs, batch)
    normalised = F.layer_norm(x, layer.normalized_shape, eps=layer.eps).to(g.dtype)
    out = []
    if layer.weight is not None and layer.weight.requires_grad:
        out.append((layer.weight, (normalised * g).sum(1)))
    if layer.bias is not None and layer.bias.requires_grad:
        out.append((layer.bias, g.sum(1)))
    return out
