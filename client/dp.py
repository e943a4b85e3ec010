"""Making a model private with Opacus: Poisson sampling (of records, or of units and their
records), per-sample clipping and noise, from generators seeded fresh for every call.

Opacus' training pieces are imported here and nowhere else, so their version quirks stay in
one file; its accountants are called only by ``shared.privacy.accounting``. The one
per-sample mode that is not Opacus' own, book-keeping clipping (``bk``), lives in
``client.bookkeeping``; its Poisson sampling, noise and averaging are still Opacus'.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from shared.model import is_head

log = logging.getLogger(__name__)

# Per-sample gradient mode per trainable set, from step-time and memory ratios measured on
# MiniLM-L6 (benchmarks/dp_overhead.py, README): book-keeping clipping wins when large weight
# matrices train (one backward pass, per-sample gradients never materialised; Opacus' ghost
# clipping needs two); expanded weights win when only small adapters or heads train (no
# hooks, no second backward pass: LoRA 1.00x the non-private step time, against 1.04x with
# hooks and 1.45x with ghost clipping).
AUTO_GRAD_SAMPLE_MODE = {"heads": "ew", "lora": "ew", "top-k": "bk", "full": "bk"}
# Modes that materialise per-sample gradients, so user-level DP-SGD can sum a unit's records'
# gradients before Opacus clips (max-records-per-unit > 1); bk and ghost clip without them.
PER_UNIT_SUM_MODES = frozenset({"ew", "hooks"})


def grad_sample_mode_for(trainable: str, clipping: str = "flat") -> str:
    if clipping != "flat":  # only book-keeping clips parameter groups apart
        return "bk"
    return AUTO_GRAD_SAMPLE_MODE[trainable]


def clip_groups(clipping: str) -> Callable[[str], str] | None:
    """Layer name -> clipping group, for ``BookKeepingModule``; None = one group (flat)."""
    if clipping == "flat":
        return None
    if clipping == "heads-apart":
        return lambda name: "heads" if is_head(name) else "encoder"
    raise ValueError(f"clipping = {clipping!r}: must be 'flat' or 'heads-apart'")


def private_generators(model: nn.Module, seed: int | None) -> tuple[torch.Generator, torch.Generator]:
    """(Poisson sampling, noise) generators for one private call, seeded from the OS's entropy
    pool unless a test asks for ``seed``.

    Never torch's global generator, nor one seeded from the run config: ``build_model`` resets
    the global seed and every fresh process starts from the same default one, so the noise
    (and with a seeded loader, the batches) repeated from call to call and from merchant to
    merchant. Two rounds' updates then carried the same noise, which their difference cancels,
    and the accounting's independent-noise, secret-sampling assumption did not hold.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sampling_seed, noise_seed = (seed, seed + 1) if seed is not None else (secrets.randbits(63), secrets.randbits(63))
    return (torch.Generator().manual_seed(sampling_seed),  # the sampler draws on the CPU
            torch.Generator(device=device).manual_seed(noise_seed))  # noise is drawn where the parameters are


def one_record_per_unit(dataset: Dataset, units: Sequence[Sequence[int]], generator: torch.Generator) -> Subset:
    """User-level sampling with k = 1: ``dataset`` as one item per unit, each unit's item one of
    its records (indices into ``dataset``), drawn uniformly with ``generator``, the call's private
    sampling generator. Poisson sampling over these items samples units at q, and a sampled unit
    contributes exactly one record, so per-sample clipping clips each unit's whole contribution."""
    sizes = torch.tensor([len(unit) for unit in units], dtype=torch.float64)
    if len(units) == 0 or bool((sizes == 0).any()):
        raise ValueError("every unit needs at least one record")
    draws = (torch.rand(len(units), generator=generator, dtype=torch.float64) * sizes).long()
    picks = [unit[min(int(i), len(unit) - 1)] for unit, i in zip(units, draws.tolist(), strict=True)]
    return Subset(dataset, picks)


def chosen_records(units: Sequence[Sequence[int]], k: int, generator: torch.Generator) -> list[list[int]]:
    """Up to ``k`` of each unit's records (a uniform subset, in their order), drawn with ``generator``."""
    if k < 1:
        raise ValueError(f"max-records-per-unit = {k}: must be >= 1")
    chosen = []
    for unit in units:
        if len(unit) <= k:
            chosen.append(list(unit))
        else:
            picked = torch.randperm(len(unit), generator=generator)[:k].sort().values.tolist()
            chosen.append([unit[i] for i in picked])
    return chosen


class UnitPoissonSampler:
    """Batches of record indices for user-level DP-SGD with k > 1: at each of ``steps`` steps every
    unit joins with probability ``sample_rate`` (Poisson, drawn with ``generator``) and brings its
    ``chosen`` records. ``owners``: for the batch last yielded, each record's unit's position in
    it (what ``_sum_per_unit`` adds the records' per-sample gradients by)."""

    def __init__(self, chosen: list[list[int]], sample_rate: float, steps: int, generator: torch.Generator) -> None:
        self.chosen, self.sample_rate, self.steps, self.generator = chosen, sample_rate, steps, generator
        self.owners = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):  # type: ignore[no-untyped-def]
        for _ in range(self.steps):
            joined = torch.nonzero(torch.rand(len(self.chosen), generator=self.generator) < self.sample_rate)
            batch: list[int] = []
            owners: list[int] = []
            for position, unit in enumerate(joined.flatten().tolist()):
                batch.extend(self.chosen[unit])
                owners.extend([position] * len(self.chosen[unit]))
            self.owners = torch.tensor(owners, dtype=torch.long)
            yield batch


def _unit_loader(data_loader: DataLoader, units: Sequence[Sequence[int]], k: int,
                 generator: torch.Generator) -> tuple[DataLoader, UnitPoissonSampler]:
    """The loader's records, batched by ``UnitPoissonSampler`` at q = 1 / ceil(units / batch)."""
    dataset = data_loader.dataset
    batches = math.ceil(len(units) / (data_loader.batch_size or 1))
    sampler = UnitPoissonSampler(chosen_records(units, k, generator), 1 / batches, batches, generator)

    def collate(batch: list[Any]) -> Any:
        if batch:
            return default_collate(batch)
        return tuple(torch.zeros((0, *t.shape), dtype=t.dtype) for t in dataset[0])  # an empty Poisson batch

    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate), sampler


def _sum_per_unit(optimizer: Any, sampler: UnitPoissonSampler) -> None:
    """Before Opacus clips (``DPOptimizer.pre_step``), replace each parameter's per-record
    gradients by their sums per unit: Opacus then clips each unit's summed gradient to C."""
    clip_and_noise = optimizer.pre_step

    def pre_step(closure: Any = None) -> Any:
        owners = sampler.owners
        count = int(owners.max()) + 1 if len(owners) else 0
        for p in optimizer.params:
            per_record = getattr(p, "grad_sample", None)
            if per_record is None:
                continue
            if isinstance(per_record, list) or len(per_record) != len(owners):
                raise RuntimeError("per-sample gradients do not match the batch's records")
            summed = torch.zeros((count, *per_record.shape[1:]), dtype=per_record.dtype, device=per_record.device)
            p.grad_sample = summed.index_add_(0, owners.to(per_record.device), per_record)
        return clip_and_noise(closure)

    optimizer.pre_step = pre_step


def _resampled(data_loader: DataLoader, generator: torch.Generator, units: Sequence[Sequence[int]] | None = None,
               ) -> DataLoader:
    """The same batch size with ``generator`` for sampling, over the same dataset (the same sample
    rate), or with ``units`` over one record per unit (``one_record_per_unit``)."""
    dataset = data_loader.dataset if units is None else one_record_per_unit(data_loader.dataset, units, generator)
    return DataLoader(dataset, batch_size=data_loader.batch_size, collate_fn=data_loader.collate_fn,
                      generator=generator)


@dataclasses.dataclass
class PrivateTraining:
    """The objects Opacus hands back; ``criterion`` is only wrapped in ghost and bk modes."""

    model: nn.Module
    optimizer: Any
    data_loader: DataLoader
    criterion: nn.Module
    mode: str


def make_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    criterion: nn.Module,
    noise_multiplier: float,
    max_grad_norm: float,
    mode: str,
    seed: int | None = None,
    clipping: str = "flat",
    units: Sequence[Sequence[int]] | None = None,
    records_per_unit: int = 1,
) -> PrivateTraining:
    """Wrap for DP-SGD with Poisson sampling (the sampling the accountants assume), its batches
    and noise drawn from fresh generators (``private_generators``); ``seed`` only for tests.

    ``units`` (record indices of the loader's dataset per privacy unit): user-level DP-SGD with
    one record per unit (``one_record_per_unit``), the sample rate then 1 / ceil(units / batch);
    None: record-level, the loader's records sampled. ``records_per_unit`` (k) > 1: each sampled
    unit brings up to k records, chosen once per call, whose per-sample gradients are summed
    before clipping (modes in ``PER_UNIT_SUM_MODES`` only)."""
    sampling, noise = private_generators(model, seed)
    if units is not None and records_per_unit > 1:
        if mode not in PER_UNIT_SUM_MODES:
            raise ValueError(f"max-records-per-unit = {records_per_unit} needs per-sample gradients (grad-sample "
                             f"mode {sorted(PER_UNIT_SUM_MODES)}), not {mode!r}: use max-records-per-unit = 1")
        return _make_private_per_unit(model=model, optimizer=optimizer, data_loader=data_loader,
                                      criterion=criterion, noise_multiplier=noise_multiplier,
                                      max_grad_norm=max_grad_norm, mode=mode, sampling=sampling, noise=noise,
                                      units=units, k=records_per_unit)
    data_loader = _resampled(data_loader, sampling, units)
    if mode == "bk":
        return _make_private_bookkeeping(model=model, optimizer=optimizer, data_loader=data_loader,
                                         criterion=criterion, noise_multiplier=noise_multiplier,
                                         max_grad_norm=max_grad_norm, noise=noise, clipping=clipping)
    if clipping != "flat":
        raise ValueError(f"clipping = {clipping!r} needs mode 'bk', not {mode!r}")
    from opacus import PrivacyEngine

    # The engine's own accountant is not used for reporting (the merchant's persisted
    # history is); it is still kept so Opacus' internal bookkeeping stays consistent.
    with warnings.catch_warnings():
        # secure_mode=False is deliberate (CSPRNG noise costs ~10x; see README "Privacy
        # model"); the warning would otherwise repeat on every training call.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
    kwargs: dict[str, Any] = dict(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=mode,
        noise_generator=noise,
    )
    if mode == "ghost":
        private_model, private_optimizer, private_criterion, loader = engine.make_private(
            criterion=criterion, **kwargs
        )
    else:
        private_model, private_optimizer, loader = engine.make_private(**kwargs)
        private_criterion = criterion
    return PrivateTraining(
        model=private_model, optimizer=private_optimizer, data_loader=loader,
        criterion=private_criterion, mode=mode,
    )


def _make_private_per_unit(*, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                           criterion: nn.Module, noise_multiplier: float, max_grad_norm: float, mode: str,
                           sampling: torch.Generator, noise: torch.Generator, units: Sequence[Sequence[int]],
                           k: int) -> PrivateTraining:
    """User-level DP-SGD with k > 1: units Poisson-sampled by our own sampler, Opacus' per-sample
    gradients summed per unit before its clipping, noise, and averaging over the expected units."""
    from opacus import PrivacyEngine

    loader, sampler = _unit_loader(data_loader, units, k, sampling)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
    private_model, private_optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode, noise_generator=noise)
    private_optimizer.expected_batch_size = int(len(units) * sampler.sample_rate)  # in units, as Opacus rounds
    _sum_per_unit(private_optimizer, sampler)
    return PrivateTraining(model=private_model, optimizer=private_optimizer, data_loader=loader,
                           criterion=criterion, mode=mode)


def _make_private_bookkeeping(*, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                              criterion: nn.Module, noise_multiplier: float, max_grad_norm: float,
                              noise: torch.Generator, clipping: str) -> PrivateTraining:
    """Book-keeping clipping with Opacus' Poisson loader and its optimizer for pre-clipped
    gradients (noise N(0, σ²C²) on the clipped sum, then ÷ expected batch size), set up as
    ``PrivacyEngine.make_private`` sets up ghost clipping."""
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from client.bookkeeping import BookKeepingLoss, BookKeepingModule

    loader = DPDataLoader.from_data_loader(data_loader)
    sample_rate = 1 / len(loader)
    private_model = BookKeepingModule(model, max_grad_norm=max_grad_norm, group_of=clip_groups(clipping))
    private_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=int(len(loader.dataset) * sample_rate),  # type: ignore[arg-type]
        loss_reduction="mean",
        generator=noise,
    )
    return PrivateTraining(model=private_model, optimizer=private_optimizer, data_loader=loader,
                           criterion=BookKeepingLoss(private_model, criterion),  # type: ignore[arg-type]
                           mode="bk")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside an Opacus GradSampleModule (drops the ``_module.`` prefix once)."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model
