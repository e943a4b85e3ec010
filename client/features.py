"""Training heads on a frozen encoder: each record's pooled state is computed once, then cached.

With ``trainable = heads`` the encoder never changes (neither locally nor in the global model),
so a record's pooled state is the same in every round. Encoding is then the whole cost of a
step; done once, a DP step can take batches of a thousand records for the price of a matrix
product. That matters for privacy: the noise on a step's mean gradient is σ·C / batch, and at a
fixed ε, σ grows far more slowly than the batch (reviews, ε = 8, 4 rounds: 6 steps of 64
records a round need σ 0.40-1.11 across merchants, 30 steps of up to 1,024 records σ
1.11-6.57, so each step's mean gradient is several times less noisy).

The cache holds states derived from the merchant's private records, so it lives where the
records' privacy state lives (the node's state folder) unless the run names another folder.
It is keyed by everything the states depend on: the encoder's weights, the tokenizer, the
pooling, the sequence length and the records' text, so a stale file is never read. A folder
holds one owner's current records: writing a new set's states removes any other set's, so
states derived from records the merchant has since changed or deleted do not outlive its next
training call, and the folder does not grow with every change of data or encoder. A new set
takes the states of the records it shares with the folder's current set from there (same
encoder, tokenizer, pooling, length and arithmetic; each record known by a digest of its text)
and encodes only the others: a merchant's exact view of every held-out record
(``client.held_out``) after the run's evaluations of part of them, or a folder after a few
records were added, costs the new records' encoding, not the whole set's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers.tokenization_utils_base import BatchEncoding, PreTrainedTokenizerBase

from shared import atomic
from shared.model import FedShopModel, head_scores
from shared.progress import Progress

if TYPE_CHECKING:  # client.precondition builds on this module
    from client.precondition import Preconditioner

log = logging.getLogger(__name__)

ENCODE_BATCH = 256


class HeadsOnly(nn.Module):
    """A model's heads (and the dropout before them) over pooled states. The parameters are the
    model's own, shared, not copied: training this module trains the model's heads — unless
    ``heads`` gives others to train (``client.precondition``'s copy in its coordinates)."""

    def __init__(self, model: FedShopModel, heads: nn.ModuleDict | None = None) -> None:
        super().__init__()
        self.dropout = model.dropout
        self.heads = model.heads if heads is None else heads

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return head_scores(self.heads, self.dropout, pooled)


@dataclasses.dataclass(frozen=True)
class HeadsView:
    """What a training call trains when the encoder is frozen: the model's heads on each record's
    pooled state, encoded once and cached (``pooled_states``), instead of running the encoder at
    every step. Same records, same Poisson sampling over them, same clipping and noise: only the
    cost differs. ``whitened`` moves the heads into a preconditioner's coordinates, and
    ``finish`` writes them back into the model."""

    model: HeadsOnly  # what trains: the model's heads, or their copy in the preconditioner's coordinates
    dataset: TensorDataset  # (state, packed targets) per record
    target: FedShopModel  # the model whose heads the call trains
    preconditioner: Preconditioner | None = None

    @classmethod
    def of(cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]],
           targets: torch.Tensor, *, max_seq_len: int, device: torch.device, cache_dir: Path | None,
           precision: str = "auto") -> HeadsView:
        if not isinstance(model, FedShopModel):
            raise TypeError(f"trainable = heads trains a FedShopModel's heads; got {type(model).__name__}")
        states = pooled_states(model, tokenizer, pairs, max_seq_len=max_seq_len, device=device, cache_dir=cache_dir,
                               precision=precision)
        return cls(model=HeadsOnly(model), dataset=TensorDataset(states, targets), target=model)

    def whitened(self, preconditioner: Preconditioner) -> HeadsView:
        """The heads trained in ``preconditioner``'s coordinates (a copy of them; the same function)."""
        states, targets = self.dataset.tensors
        return HeadsView(model=HeadsOnly(self.target, preconditioner.to_local(self.target.heads)),
                         dataset=TensorDataset(preconditioner.states(states), targets), target=self.target,
                         preconditioner=preconditioner)

    @staticmethod
    def batch(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in batch)

    def finish(self) -> None:
        """After training: the heads back into the model, in pooled-state coordinates."""
        if self.preconditioner is not None:
            self.preconditioner.to_global(self.model.heads, self.target.heads)


def cache_dir(configured: str, default: Path, owner: str = "") -> Path:
    """Where a merchant's states live: ``feature-cache-dir`` (one subfolder per owner, so
    merchants can share it) when the run names one, else ``default`` beside its privacy state."""
    if configured:
        return Path(configured).expanduser() / owner if owner else Path(configured).expanduser()
    return default


# Encoders whose weights do not change while they live: a node's shared frozen encoder
# (``client.node_cache``). Their digest is computed once, when they are frozen, instead of at
# every lookup (~0.1 s for MiniLM, a dozen lookups a round in the default scenario).
_FROZEN: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def state_digest(module: nn.Module) -> str:
    """A digest of a module's weights (names and float32 values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()


def encoder_digest(encoder: nn.Module) -> str:
    """``state_digest`` of the encoder, computed once for a frozen one (``freeze``)."""
    frozen = _FROZEN.get(encoder)
    return frozen if frozen is not None else state_digest(encoder)


def digest_records(digest: Any, pairs: Sequence[tuple[str, str]]) -> None:
    """Feed the records' text into a cache key's ``digest``, each pair unambiguously delimited."""
    for context, product in pairs:
        digest.update(context.encode())
        digest.update(b"\x1f")
        digest.update(product.encode())
        digest.update(b"\x1e")


def record_batches(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], *, max_seq_len: int,
                   what: str) -> Iterator[BatchEncoding]:
    """The records tokenized in batches of ``ENCODE_BATCH`` (padded to each batch's longest),
    with a progress display named ``what``: what every encoding pass reads."""
    with Progress(what, len(pairs), unit="records") as shown:
        for start in range(0, len(pairs), ENCODE_BATCH):
            chunk = pairs[start:start + ENCODE_BATCH]
            yield tokenizer([c for c, _ in chunk], [p for _, p in chunk], truncation="longest_first",
                            max_length=max_seq_len, padding="longest", return_tensors="pt")
            shown.update(len(chunk))


def freeze(encoder: nn.Module) -> None:
    """Mark ``encoder`` as never changing again (its parameters stop requiring gradients) and
    remember its digest. The caller promises not to write to its weights while it lives."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    _FROZEN.pop(encoder, None)
    _FROZEN[encoder] = encoder_digest(encoder)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): elsewhere torch
    emulates it, slower than float32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def encode_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The arithmetic of a frozen-encoder pass (run-config ``encode-precision``): bfloat16 only on
    a CPU that has it natively ("auto") or when asked; float32 otherwise, and always on a GPU."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"encode-precision {precision!r}: expected 'auto', 'float32' or 'bfloat16'")
    if device.type != "cpu" or precision == "float32":
        return torch.float32
    if precision == "bfloat16" or native_bfloat16():
        return torch.bfloat16
    return torch.float32


def _encoding(digest: Any, model: FedShopModel, tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int,
              dtype: torch.dtype) -> None:
    """Feed everything but the records that a pooled state depends on into ``digest``."""
    digest.update(f"{model.pooling}|{max_seq_len}|{type(tokenizer).__name__}|{len(tokenizer)}|".encode())
    if dtype != torch.float32:  # float32 keys stay as they were, so existing caches stay valid
        digest.update(f"{dtype}|".encode())
    digest.update(encoder_digest(model.encoder).encode())


def cache_key(model: FedShopModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]],
              *, max_seq_len: int, dtype: torch.dtype = torch.float32) -> str:
    """A digest of everything a record's pooled state depends on."""
    digest = hashlib.sha256()
    _encoding(digest, model, tokenizer, max_seq_len=max_seq_len, dtype=dtype)
    digest_records(digest, pairs)
    return digest.hexdigest()


def encoding_key(model: FedShopModel, tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int,
                 dtype: torch.dtype = torch.float32) -> str:
    """A digest of everything but the records that a pooled state depends on: two cached sets
    with the same one hold the same state for a record they share."""
    digest = hashlib.sha256(b"encoding|")
    _encoding(digest, model, tokenizer, max_seq_len=max_seq_len, dtype=dtype)
    return digest.hexdigest()


def record_digests(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Each record's own digest (its text), by which a cached set's states are found again."""
    out = []
    for pair in pairs:
        digest = hashlib.sha256()
        digest_records(digest, [pair])
        out.append(digest.hexdigest()[:32])
    return out


@torch.no_grad()
def encode_pairs(model: FedShopModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], *,
                 max_seq_len: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pooled states ``[len(pairs), hidden]`` (float32) on the CPU, the encoder in eval mode (no
    dropout: a record's state must not depend on when it was encoded); its matrix products in
    ``dtype`` (CPU autocast) when that is bfloat16 (``encode_dtype``)."""
    was_training = model.training
    model.to(device)
    model.eval()
    out = []
    started = time.perf_counter()
    try:
        for enc in record_batches(tokenizer, pairs, max_seq_len=max_seq_len, what="encoding records"):
            ids = enc["input_ids"].to(device)
            types = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])).to(device)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out.append(model.pool(ids, enc["attention_mask"].to(device), types).float().cpu())
    finally:
        model.train(was_training)
    log.info("encoded %d records in %.1f s (%s)", len(pairs), time.perf_counter() - started,
             str(dtype).removeprefix("torch."))
    return torch.cat(out)


def pooled_states(model: FedShopModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], *,
                  max_seq_len: int, device: torch.device, cache_dir: Path | None,
                  precision: str = "auto") -> torch.Tensor:
    """The records' pooled states: from ``cache_dir`` when it holds them, else encoded (only the
    records the folder's current set lacks: module docstring) and then stored there, atomically,
    so a crash leaves no half-written file."""
    if not pairs:
        raise ValueError("no records to encode")
    dtype = encode_dtype(device, precision)
    if cache_dir is None:
        return encode_pairs(model, tokenizer, pairs, max_seq_len=max_seq_len, device=device, dtype=dtype)
    key = cache_key(model, tokenizer, pairs, max_seq_len=max_seq_len, dtype=dtype)
    path = Path(cache_dir) / f"features-{key[:40]}.pt"
    if path.is_file():
        cached = _read(path)
        if cached is not None and cached.states.shape[0] == len(pairs):
            return cached.states
        if cached is not None:
            log.warning("feature cache %s holds %s, not %d records' states; encoding again", path,
                        tuple(cached.states.shape), len(pairs))
    encoding = encoding_key(model, tokenizer, max_seq_len=max_seq_len, dtype=dtype)
    digests = record_digests(pairs)
    others = [p for p in path.parent.glob("features-*.pt") if p != path and p.is_file()]
    known = _known_states(others, encoding)
    missing = [i for i, d in enumerate(digests) if d not in known]
    encoded = (encode_pairs(model, tokenizer, [pairs[i] for i in missing], max_seq_len=max_seq_len, device=device,
                            dtype=dtype) if missing else None)
    if len(missing) < len(pairs):
        log.info("feature cache %s: %d of %d records' states taken from the folder's current set, %d encoded",
                 path.parent, len(pairs) - len(missing), len(pairs), len(missing))
    fresh = dict(zip(missing, encoded if encoded is not None else [], strict=True))
    states = torch.stack([fresh[i] if i in fresh else known[d] for i, d in enumerate(digests)])
    atomic.torch_save({"states": states, "encoding": encoding, "records": digests}, path)
    for old in others:
        old.unlink(missing_ok=True)
    if others:
        log.info("feature cache %s: removed %d other record set(s)' states", path.parent, len(others))
    return states


@dataclasses.dataclass(frozen=True)
class _Cached:
    states: torch.Tensor
    encoding: str | None  # None: a file written before sets carried their encoding and records
    records: list[str] | None


def _read(path: Path) -> _Cached | None:
    """A cache file's states (and, where it carries them, its encoding key and record digests);
    None for a file that cannot be read as one: a damaged cache is only lost time."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises on a damaged file
        log.warning("feature cache %s unreadable (%s); not used", path, exc)
        return None
    if isinstance(loaded, torch.Tensor):
        return _Cached(loaded, None, None)
    if (isinstance(loaded, dict) and isinstance(loaded.get("states"), torch.Tensor)
            and isinstance(loaded.get("encoding"), str) and isinstance(loaded.get("records"), list)
            and len(loaded["records"]) == loaded["states"].shape[0]):
        return _Cached(loaded["states"], loaded["encoding"], [str(r) for r in loaded["records"]])
    log.warning("feature cache %s holds no states; not used", path)
    return None


def _known_states(paths: Sequence[Path], encoding: str) -> dict[str, torch.Tensor]:
    """record digest -> state, from the folder's other sets made with the same ``encoding``."""
    known: dict[str, torch.Tensor] = {}
    for path in paths:
        cached = _read(path)
        if cached is not None and cached.encoding == encoding and cached.records is not None:
            known.update(zip(cached.records, cached.states, strict=True))
    return known
