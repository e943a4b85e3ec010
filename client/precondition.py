"""Heads trained in a whitened geometry that public text sets (``precondition-corpus``).

A frozen MiniLM's pooled states are far from isotropic: on the reviews records their mean has
length 0.67 (of 1), and the covariance's eigenvalues fall 50-fold over its top hundred
directions. Gradient steps on a linear head then crawl along the weak directions, and in the
steps a federation affords (8 rounds of 15) the rating head stops short: a plain-PyTorch
replica of the private reviews federation (ε = 8, 6 seeds) reaches RMSE 0.870 as it is and
0.850 with states whitened by public text and Adam's state kept across rounds
(``keep-optimizer-state``), against 0.827 centralised.

States ``x`` become ``x' = (x - μ) M`` with ``M = c·(C + s·I)^(-1/2)``, where μ and C are the
mean and covariance of the *corpus'* states (never a merchant's: the corpus is public text,
e.g. another shop's catalogue), ``s`` is ``SHRINK`` and ``c`` scales the corpus'
transformed states to mean length 1 (so clipping at C = 1 keeps its meaning). A head
``s = W x + b`` trains as ``s = W' x' + b'`` with ``W' = W M⁻¹``, ``b' = b + W μ``: the same
function, so the global model, what a merchant sends and what is exported are unchanged;
after training the heads are mapped back (``W = W' M``, ``b = b' − W μ``). DP-SGD clips and
noises the gradients in the new coordinates; M depends on public data only, so the guarantee
and its accounting are unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from pathlib import Path

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import features, node_cache
from shared.model import FedShopModel

log = logging.getLogger(__name__)

# ``precondition-corpus = "bundled:esci"``: the texts of a dataset fedshop ships (data/), built
# by the node itself (client.sources.adapters.public_corpus_pairs), so a scenario can name a
# corpus that needs no file on anyone's disk (the utility benchmark's reviews arms use ESCI's).
BUNDLED = "bundled:"
# The folder, inside a feature cache, that keeps the corpus' states (pruned apart from a
# merchant's own: client.features keeps one record set per folder).
CACHE_FOLDER = "precondition-corpus"
# Added to the corpus states' covariance eigenvalues, so directions the corpus barely spans are
# not blown up. Every benchmarked run used this value (it was the run-config key
# ``precondition-shrink``, never set to another).
SHRINK = 0.003


@dataclasses.dataclass(frozen=True)
class Preconditioner:
    mean: torch.Tensor  # μ, [hidden]
    matrix: torch.Tensor  # M, [hidden, hidden], symmetric
    inverse: torch.Tensor  # M⁻¹

    @classmethod
    def fit(cls, states: torch.Tensor, shrink: float) -> Preconditioner:
        """From the public corpus' pooled states ``[n, hidden]``."""
        if states.ndim != 2 or len(states) < 2:
            raise ValueError(f"need at least two states to fit a preconditioner, got shape {tuple(states.shape)}")
        x = states.double()
        mean = x.mean(0)
        centred = x - mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(x))
        scale = eigenvalues.clamp(min=0.0) + shrink
        matrix = eigenvectors @ torch.diag(scale.rsqrt()) @ eigenvectors.T
        c = 1.0 / float((centred @ matrix).norm(dim=1).mean())
        inverse = eigenvectors @ torch.diag(scale.sqrt()) @ eigenvectors.T / c
        return cls(mean=mean.float(), matrix=(matrix * c).float(), inverse=inverse.float())

    def states(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled states in the heads' training coordinates."""
        return (pooled - self.mean) @ self.matrix

    def to_local(self, heads: nn.ModuleDict) -> nn.ModuleDict:
        """A copy of ``heads`` that computes the same scores from ``states(pooled)``."""
        local = copy.deepcopy(heads)
        with torch.no_grad():
            for task in heads:
                head, mine = _linear(heads[task]), _linear(local[task])
                # The heads may sit on a GPU; the transform is kept on the CPU with the states.
                mine.weight.copy_(head.weight @ self.inverse.to(head.weight))
                mine.bias.copy_(head.bias + head.weight @ self.mean.to(head.weight))
        return local

    def to_global(self, local: nn.ModuleDict, heads: nn.ModuleDict) -> None:
        """Write trained ``local`` heads back into ``heads``, in pooled-state coordinates."""
        with torch.no_grad():
            for task in heads:
                head, mine = _linear(heads[task]), _linear(local[task])
                weight = mine.weight @ self.matrix.to(mine.weight)
                head.weight.copy_(weight)
                head.bias.copy_(mine.bias - weight @ self.mean.to(weight))


def _linear(module: nn.Module) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"a head must be an nn.Linear to be preconditioned, not {type(module).__name__}")
    return module


def bundled_source(corpus: str | Path) -> str | None:
    """The bundled dataset ``corpus`` names (``bundled:NAME``), or None for a file; a ValueError
    for a name fedshop does not ship."""
    from client.sources import adapters

    text = str(corpus)
    if not text.startswith(BUNDLED):
        return None
    name = text[len(BUNDLED):]
    if name not in adapters.PUBLIC_CORPUS_SOURCES:
        raise ValueError(f"precondition-corpus {text!r}: fedshop ships {', '.join(adapters.PUBLIC_CORPUS_SOURCES)} "
                         f"({BUNDLED}NAME), not {name!r}")
    return name


@functools.lru_cache(maxsize=2)
def _bundled(name: str) -> tuple[tuple[str, str], ...]:
    from client.sources import adapters

    return tuple(adapters.public_corpus_pairs(name))


def read_corpus(path: str | Path) -> list[tuple[str, str]]:
    """(context, product) pairs: one text per line, ``context<TAB>product`` for a pair; or, for
    ``bundled:NAME``, the texts of a dataset fedshop ships (``bundled_source``)."""
    name = bundled_source(path)
    if name is not None:
        return list(_bundled(name))
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"precondition-corpus {path}: cannot read it ({exc})") from exc
    pairs = [tuple(line.split("\t", 1)) if "\t" in line else ("", line) for line in lines if line.strip()]
    if len(pairs) < 2:
        raise ValueError(f"precondition-corpus {path}: {len(pairs)} text(s); a covariance needs at least two "
                         "(hundreds, in practice)")
    return pairs  # type: ignore[return-value]


# Preconditioners this process fitted, by everything they depend on: a simulation's worker serves
# every merchant in turn, and the corpus is the same public text for all of them, so it is
# encoded once per worker, not once per merchant (24 s of a six-merchant reviews run). Bounded,
# read-only, shared by a worker's threads (a race only fits twice).
_FITTED = node_cache.Bounded(2)


def forget() -> None:
    """Drop the fitted preconditioners this process keeps (tests)."""
    _FITTED.clear()


def from_corpus(path: str | Path, model: FedShopModel, tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int,
                device: torch.device, cache_dir: Path | None, shrink: float = SHRINK,
                precision: str = "auto") -> Preconditioner:
    """The preconditioner of ``path``'s texts under ``model``'s frozen encoder (their states
    cached in ``cache_dir`` like a merchant's, encoded once, at the records' ``precision``; the
    fitted result kept in this process for the next call, whoever's)."""
    pairs = read_corpus(path)
    dtype = features.encode_dtype(device, precision)
    key = (features.cache_key(model, tokenizer, pairs, max_seq_len=max_seq_len, dtype=dtype), shrink)

    def fit() -> Preconditioner:
        states = features.pooled_states(model, tokenizer, pairs, max_seq_len=max_seq_len, device=device,
                                        cache_dir=cache_dir, precision=precision)
        return Preconditioner.fit(states, shrink)

    return _FITTED.get(key, fit)
