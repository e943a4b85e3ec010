"""Training the top k encoder layers on cached lower-layer states, and the two-phase schedule.

With ``trainable = top-k`` the lower L − k layers (and the embeddings) never change, neither
locally nor in the global model, so each record's token states after layer L − k are the same
in every round. They are computed once per record and cached (as ``client.features`` caches
pooled states for ``trainable = heads``); a training step then runs only the top k layers,
the pooling and the heads. Same records, same Poisson sampling, clipping and noise as running
the whole model: only the cost differs (MiniLM-L6, k = 1, batch 1,024: docs/benchmarks.md,
"Encoder adaptation under DP").

What differs from the whole model, and what it costs:

- the states are stored in float16 (``STORAGE_DTYPE``): 18.8k reviews x 48 tokens x 384 floats
  is 0.7 GB instead of 1.4 GB; the top layers compute in float32 from them. On the tiny test
  encoder the scores then differ from the whole model's by ~3e-5 (tests/client/test_top_layers.py);
- the lower layers are encoded in eval mode, so their dropout is off (as for the pooled states of
  ``client.features``); the top layers keep theirs. Every shipped scenario trains at dropout 0.

The cache follows ``client.features``' rules: it lives in the merchant's feature-cache folder
(the node's state folder unless the run names one), is keyed by everything the states depend
on (the lower layers' weights, the tokenizer, the sequence length, the records' text, the
depth) and not by the top layers, which change every round, and a folder keeps only its
owner's current record set.

``encoder-rounds`` = R (``round_config``): the run's first rounds train only the heads on pooled
states (the ``trainable = heads`` path, ``heads_view``; the top layers travel unchanged, so
their update is zero), and its last R rounds train the top k layers and the heads from where
the heads left them. The heads rounds pool through the top layers from the same cached
lower-layer states, so a run encodes each record's lower layers once, in its first round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers.masking_utils import create_bidirectional_mask
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import features
from client.features import HeadsOnly, HeadsView
from shared import atomic
from shared.config import RunConfig
from shared.model import FedShopModel, ModelError, head_scores, mean_pool

log = logging.getLogger(__name__)

ENCODE_BATCH = features.ENCODE_BATCH  # records per no-grad pass, as the pooled states
STORAGE_DTYPE = torch.float16
CACHE_PREFIX = "layer-states-"


def round_config(config: RunConfig, server_round: int) -> RunConfig:
    """The config one training call runs under: with ``encoder-rounds`` R > 0, a round before the
    run's last R trains the heads only (``trainable = heads``: pooled states, the heads' per-sample
    mode); every other call runs ``config`` as it is. Sampling, σ planning and C are the run's in
    both phases, so the accounting does not depend on the phase.

    A heads round keeps ``encoder-rounds`` (a combination ``RunConfig.validate`` refuses in a run
    config, so it only ever exists here): it tells ``heads_view`` to pool through the top layers
    from the cached lower-layer states instead of caching pooled states keyed by the whole
    encoder. The top layers are the global model's, and FedAvg's weighted mean of six identical
    copies is not bit-identical to them, so a key over them changed every round and every heads
    round encoded every record again (2.7 min a round on reviews)."""
    if config.encoder_rounds == 0 or trains_encoder(config, server_round):
        return config
    return dataclasses.replace(config, trainable="heads")


def heads_round(config: RunConfig) -> bool:
    """Whether ``config`` (from ``round_config``) is a heads round of a two-phase run."""
    return config.trainable == "heads" and config.encoder_rounds > 0


def trains_encoder(config: RunConfig, server_round: int) -> bool:
    """Whether round ``server_round`` (1-based, as the server numbers them) trains the top layers."""
    if config.encoder_rounds == 0:
        return config.trainable != "heads"
    return server_round > config.num_server_rounds - config.encoder_rounds


def _layers(model: FedShopModel) -> nn.ModuleList:
    layers = getattr(getattr(model.encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(_embeddings(model), nn.Module):
        raise ModelError(f"trainable 'top-k' needs a BERT-style encoder (embeddings + encoder.layer); "
                         f"{type(model.encoder).__name__} is not one")
    return layers


def _embeddings(model: FedShopModel) -> nn.Module:
    return getattr(model.encoder, "embeddings", None)  # type: ignore[return-value]  # checked by _layers


def depth_of(model: FedShopModel, top_k_layers: int) -> int:
    """How many encoder layers lie below the trained ones (L − k)."""
    layers = _layers(model)
    if not 1 <= top_k_layers <= len(layers):
        raise ModelError(f"top-k-layers = {top_k_layers}: the encoder has {len(layers)} layers")
    return len(layers) - top_k_layers


def _extended_mask(model: FedShopModel, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    # The mask the encoder's own forward builds for its layers (eager, sdpa, ...: whatever the
    # encoder's config selects), so the top layers attend exactly as in the whole model.
    return create_bidirectional_mask(config=model.encoder.config, inputs_embeds=hidden, attention_mask=mask)


class TopLayers(nn.Module):
    """A model's top encoder layers, pooling and heads over the token states after layer
    ``depth``. The layers and heads are the model's own, shared, not copied: training this
    module trains the model."""

    def __init__(self, model: FedShopModel, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(list(_layers(model))[depth:])
        self.dropout = model.dropout
        self.heads = model.heads
        self.pooling = model.pooling
        self._target = [model]  # in a list: not a submodule (its frozen parameters are not ours)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return head_scores(self.heads, self.dropout, self.pool(hidden, mask))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The pooled states the heads read, as ``FedShopModel.pool`` computes them."""
        hidden = hidden.float()
        extended = _extended_mask(self._target[0], hidden, mask)
        for layer in self.layers:
            hidden = layer(hidden, extended)
        pooled = mean_pool(hidden, mask)
        return nn.functional.normalize(pooled, dim=1) if self.pooling == "mean-l2" else pooled


@dataclasses.dataclass(frozen=True)
class TopLayersView:
    """What a ``trainable = top-k`` call trains: the model's top k layers and heads on each
    record's cached states after layer L − k (``layer_states``), instead of the whole model."""

    model: TopLayers
    dataset: TensorDataset  # (states [T, H], attention mask [T], packed targets) per record

    @classmethod
    def of(cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]],
           targets: torch.Tensor, *, top_k_layers: int, max_seq_len: int, device: torch.device,
           cache_dir: Path | None) -> TopLayersView:
        if not isinstance(model, FedShopModel):
            raise TypeError(f"trainable = top-k from cached states trains a FedShopModel; got {type(model).__name__}")
        depth = depth_of(model, top_k_layers)
        states, mask = layer_states(model, tokenizer, pairs, depth=depth, max_seq_len=max_seq_len, device=device,
                                    cache_dir=cache_dir)
        return cls(model=TopLayers(model, depth), dataset=TensorDataset(states, mask, targets))

    @staticmethod
    def batch(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
        """The batch on ``device``, its token axis cut to the batch's longest record (padding
        attends to nothing and pools to nothing, so cutting it changes no score)."""
        states, mask, *rest = batch
        if mask.shape[0] > 0:
            length = max(1, int(mask.sum(1).max()))
            states, mask = states[:, :length], mask[:, :length]
        return tuple(t.to(device) for t in (states, mask, *rest))

    def finish(self) -> None:
        pass


def heads_view(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]],
               targets: torch.Tensor, *, top_k_layers: int, max_seq_len: int, device: torch.device,
               cache_dir: Path | None) -> HeadsView:
    """A heads round of a two-phase run: ``client.features``' heads path (the model's heads on
    each record's pooled state, same module, same per-sample mode), its pooled states computed
    by the top k layers from the cached lower-layer states (one layer's forward per record, not
    six) rather than from a cache keyed by the whole encoder (``round_config`` says why)."""
    view = TopLayersView.of(model, tokenizer, pairs, targets, top_k_layers=top_k_layers, max_seq_len=max_seq_len,
                            device=device, cache_dir=cache_dir)
    top = view.model
    was_training = top.training
    top.eval()  # no dropout: a record's pooled state must not depend on when it was computed
    states, mask, _ = view.dataset.tensors
    pooled = []
    try:
        with torch.no_grad():
            for start in range(0, len(states), ENCODE_BATCH):
                chunk = TopLayersView.batch((states[start:start + ENCODE_BATCH], mask[start:start + ENCODE_BATCH]),
                                            device)
                pooled.append(top.pool(chunk[0], chunk[1]).float().cpu())
    finally:
        top.train(was_training)
    assert isinstance(model, FedShopModel)  # TopLayersView.of checked it
    return HeadsView(model=HeadsOnly(model), dataset=TensorDataset(torch.cat(pooled), targets), target=model)


def cache_key(model: FedShopModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], *,
              depth: int, max_seq_len: int) -> str:
    """A digest of everything a record's states after layer ``depth`` depend on: the embeddings'
    and the lower layers' weights (not the top layers', which train), the tokenizer, the
    sequence length and the records' text."""
    digest = hashlib.sha256()
    digest.update(f"layer-states|{depth}|{max_seq_len}|{type(tokenizer).__name__}|{len(tokenizer)}|".encode())
    lower = {f"layer.{i}": layer for i, layer in enumerate(list(_layers(model))[:depth])}
    lower["embeddings"] = _embeddings(model)
    for prefix, module in sorted(lower.items()):
        digest.update(f"{prefix}|{features.state_digest(module)}|".encode())
    features.digest_records(digest, pairs)
    return digest.hexdigest()


@torch.no_grad()
def encode_lower(model: FedShopModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], *,
                 depth: int, max_seq_len: int, device: torch.device,
                 dtype: torch.dtype = STORAGE_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """(states ``[N, T, hidden]`` in ``dtype``, attention mask ``[N, T]``) on the CPU, T the
    longest record's length: the token states after the first ``depth`` layers, in eval mode."""
    layers = _layers(model)
    was_training = model.training
    model.to(device)
    model.eval()
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    started = time.perf_counter()
    try:
        for enc in features.record_batches(tokenizer, pairs, max_seq_len=max_seq_len, what="encoding lower layers"):
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            types = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])).to(device)
            positions = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
            hidden = _embeddings(model)(input_ids=ids, token_type_ids=types, position_ids=positions)
            extended = _extended_mask(model, hidden, mask)
            for layer in list(layers)[:depth]:
                hidden = layer(hidden, extended)
            chunks.append((hidden.to(dtype).cpu(), mask.cpu()))
    finally:
        model.train(was_training)
    length = max(states.shape[1] for states, _ in chunks)
    states = torch.cat([nn.functional.pad(s, (0, 0, 0, length - s.shape[1])) for s, _ in chunks])
    mask = torch.cat([nn.functional.pad(m, (0, length - m.shape[1])) for _, m in chunks])
    log.info("encoded %d records through %d layers in %.1f s", len(pairs), depth, time.perf_counter() - started)
    return states, mask


def layer_states(model: FedShopModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], *,
                 depth: int, max_seq_len: int, device: torch.device,
                 cache_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The records' states after layer ``depth`` and their attention mask: from ``cache_dir`` when
    it holds them, else encoded (and then stored there, atomically)."""
    if not pairs:
        raise ValueError("no records to encode")
    if cache_dir is None:
        return encode_lower(model, tokenizer, pairs, depth=depth, max_seq_len=max_seq_len, device=device)
    key = cache_key(model, tokenizer, pairs, depth=depth, max_seq_len=max_seq_len)
    path = Path(cache_dir) / f"{CACHE_PREFIX}{key[:40]}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            states, mask = saved["states"], saved["mask"]
            if states.shape[0] == len(pairs) and mask.shape == states.shape[:2]:
                return states, mask
            log.warning("layer-state cache %s holds %d records' states, not %d; encoding again", path,
                        states.shape[0], len(pairs))
        except Exception as exc:  # a damaged cache is only lost time: encode again
            log.warning("layer-state cache %s unreadable (%s); encoding again", path, exc)
    states, mask = encode_lower(model, tokenizer, pairs, depth=depth, max_seq_len=max_seq_len, device=device)
    atomic.torch_save({"states": states, "mask": mask}, path)
    # One record set per folder: states of records since changed or deleted do not outlive the
    # next call (each file is hundreds of MB).
    stale = [p for p in path.parent.glob(f"{CACHE_PREFIX}*.pt") if p != path and p.is_file()]
    for old in stale:
        old.unlink(missing_ok=True)
    if stale:
        log.info("layer-state cache %s: removed %d other record set(s)' states", path.parent, len(stale))
    return states, mask


def carry_heads_state(optimizer: torch.optim.Optimizer, path: Path, *, run_id: str) -> bool:
    """At the first encoder round of ``encoder-rounds``: the heads' Adam state from the heads
    rounds (``keep-optimizer-state``'s file, laid out as the heads group alone) into the heads
    group of ``optimizer`` (heads first, then the top layers, ``client.trainer.make_optimizer``),
    so the heads do not restart Adam — whose first steps take the full rate in every coordinate —
    when the top layers join. The top layers start afresh. True if it carried."""
    if not path.is_file() or not optimizer.param_groups:
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        heads = optimizer.param_groups[0]["params"]
        if saved.get("run_id") != run_id or saved.get("layout") != [list(p.shape) for p in heads]:
            return False
        current = optimizer.state_dict()
        current["state"] = {i: s for i, s in saved["state"]["state"].items() if i < len(heads)}
        optimizer.load_state_dict(current)
    except Exception as exc:  # a damaged file costs only the warm start
        log.warning("optimizer state %s unreadable (%s); the heads start Adam afresh", path, exc)
        return False
    log.info("heads' optimizer state carried into the first encoder round")
    return True
