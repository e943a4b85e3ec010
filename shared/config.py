"""The one typed configuration of a fedshop run.

Flower hands run config over as a flat kebab-case mapping of scalars. ``RunConfig.from_mapping``
turns it into typed, validated fields once; handlers and trainers read attributes, never
``context.run_config[...]``. The defaults here are mirrored in ``pyproject.toml``
(``[tool.flwr.app.config]``), which Flower requires; a test keeps both in step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_type_hints

Trainable = Literal["heads", "top-k", "lora", "full"]
StrategyName = Literal["fedavg", "fedadam", "fedprox"]
OptimizerName = Literal["adamw"]
Clipping = Literal["flat", "heads-apart"]
ConversionLabel = Literal["click", "purchase"]
Pooling = Literal["mean", "mean-l2"]
EncodePrecision = Literal["auto", "float32", "bfloat16"]
PrivacyUnit = Literal["user", "record"]
Aggregation = Literal["plain", "secagg+"]


class ConfigError(ValueError):
    """A run-config key has a value fedshop cannot use; the message names both."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    # --- federation -----------------------------------------------------------------
    num_server_rounds: int = 5
    merchants_per_round: int = 3
    strategy: StrategyName = "fedavg"
    server_learning_rate: float = 0.01  # FedAdam's eta
    # FedProx's μ: the server sends it with every train instruction and each merchant adds
    # (μ/2)‖w − w_global‖² to its local objective (client.trainer.proximal_term).
    proximal_mu: float = 0.01
    max_update_norm: float = 1000.0  # L2 bound on an accepted update (delta from global)
    round_timeout_s: float = 900.0  # bounded wait for one round's replies
    # How updates reach the server. plain: each merchant's update in the clear, screened one
    # by one (server.screening). secagg+: Flower's SecAgg+ protocol (server.secure_aggregation,
    # client.secure_aggregation): each merchant sends its update (the change from the global
    # model) quantised and masked, and the server learns only their mean. Every coordinate of
    # an update is clipped to [-secagg-clipping-range, secagg-clipping-range] and quantised to
    # secagg-quantization-range levels; secagg-threshold is the share of a round's merchants
    # whose key shares rebuild a secret (SecAgg+'s reconstruction threshold: at least 2, and
    # a round with fewer survivors fails). fedavg and fedprox only (FedAdam's server state
    # needs nothing more, but is not wired through yet).
    aggregation: Aggregation = "plain"
    secagg_threshold: float = 0.67
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    # Merchant-level DP on top of secagg+ (shared.privacy.merchant_level): > 0, the run's
    # merchant-level ε over its num-server-rounds rounds, at merchant-delta, for one merchant's
    # whole update (neighbouring federations differ in one merchant's data; replace-one). Each
    # merchant clips its update to L2 norm merchant-clip-norm and adds its share of Gaussian
    # noise before masking, so the unmasked sum carries the full noise and no one, the server
    # included, sees a less noised sum. 0 = off (record-level DP per merchant only).
    merchant_epsilon: float = 0.0
    merchant_delta: float = 1e-5
    merchant_clip_norm: float = 1.0
    node_wait_timeout_s: float = 60.0  # bounded wait for enough nodes to connect
    min_available_nodes: int = 0  # nodes that must be connected to start a round; 0 = merchants-per-round
    early_stopping_rounds: int = 0  # 0 = off
    early_stopping_metric: str = "ctr_auc"
    run_dir: str = "runs/latest"
    resume: bool = False  # continue the run in run-dir from its last checkpoint
    seed: int = 0  # model init, non-private batch order, node sampling; never DP noise or Poisson batches

    # --- data -----------------------------------------------------------------------
    data_dir: str = ""  # folder of merchant folders, or "synthetic:N" for generated merchants
    synthetic_seed: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    # Where the held-out window starts in the split's [0, 1) hash range: the records whose
    # hash lies in [test-offset, test-offset + test-fraction) (wrapping) are held out. K runs
    # with test-fraction 1/K and test-offset 0, 1/K, ... hold out disjoint folds that cover
    # every record once (K-fold cross-validation); 0 keeps the plain split.
    test_offset: float = 0.0
    conversion_label: ConversionLabel = "purchase"
    history_length: int = 3  # recent products used as context for recommendation
    # Per merchant per evaluation call, counted in privacy units (users by default; records
    # under privacy-unit = record): at most this many held-out units, the first by hash
    # (client.data.split.subsample_units); bounds evaluation time. 0 = all.
    eval_max_examples: int = 256
    # The merchant's evaluation (client.release): whether it evaluates at all, the noise
    # multiplier σ_eval of its noised metrics (10: ε ≈ 0.73 per evaluation at δ = 1e-5), and
    # the fewest held-out units it evaluates on. A deployed node's own node-config keys win.
    evaluate: bool = True
    eval_noise_multiplier: float = 10.0
    eval_min_units: int = 100
    # The server evaluates the global model after every evaluate-every-th round and after the
    # last (``evaluates_after``). Each evaluation is a release that costs every merchant ε (at
    # σ_eval 10, 8 of them cost 2.29 of an ε = 8 budget, 2 cost 1.06): fewer evaluations leave
    # more of the budget to training. Public: it is a schedule, not a merchant's setting.
    # Early stopping counts evaluated rounds.
    evaluate_every: int = 1
    max_train_examples: int = 0  # 0 = all; caps a merchant's training set in privacy units, as above (fast demos)

    # --- model ----------------------------------------------------------------------
    encoder: str = "minilm"  # "minilm", "tiny", or a local Hugging Face model folder
    trainable: Trainable = "lora"
    top_k_layers: int = 2
    # trainable = top-k in two phases: the run's first rounds train the heads only (on the cached
    # pooled states of the frozen encoder; the top layers travel unchanged) and its last
    # encoder-rounds rounds train the top k layers and the heads from there (client.top_layers).
    # 0 = every round trains the top layers.
    encoder_rounds: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    dropout: float = 0.1
    max_seq_len: int = 64
    tasks: str = "ctr,rating,relevance"
    # mean-l2 scales each pooled vector to unit length (what MiniLM's sentence embeddings were
    # trained for). A head's per-record gradient is then bounded by its error alone, so a
    # clipping norm of 1 binds only on badly predicted records: private heads on a frozen
    # encoder, reviews ε = 8, log-loss 0.385 -> 0.343 (a probe; README, "Utility versus privacy").
    pooling: Pooling = "mean"

    # --- local training -------------------------------------------------------------
    # AdamW is the only optimizer (SGD was offered, used by no scenario or benchmark, and
    # removed); the key stays so configs that name it keep loading.
    optimizer: OptimizerName = "adamw"
    learning_rate: float = 1e-3  # encoder weights / LoRA adapters
    # Heads get their own rate: under DP noise a rate high enough for the heads makes the
    # (much larger) encoder/adapter parameter set random-walk away from the pretrained model.
    head_learning_rate: float = 1e-2
    weight_decay: float = 0.0
    local_epochs: float = 1.0
    max_local_steps: int = 20  # cap per training call; 0 = no cap
    batch_size: int = 32  # Poisson batch size; sample_rate = 1 / ceil(N / batch_size) (Opacus' rate)
    device: str = "auto"
    # trainable = heads: the frozen encoder's pooled states of a merchant's records are
    # computed once and kept here (one file per encoder, pooling and record set), so each
    # round trains the heads on them instead of re-encoding. "" = the node's state folder.
    feature_cache_dir: str = ""
    # trainable = heads: the arithmetic of that one pass of the frozen encoder over the records
    # (client.features.encode_dtype). "auto": bfloat16 on a CPU with native bfloat16 dot
    # products (AVX512-BF16 or AMX; 2.8x faster on this project's 2-core box, pooled states
    # within cosine 0.99998 of float32's), float32 elsewhere and on GPUs. The heads, their
    # gradients and DP-SGD stay float32.
    encode_precision: EncodePrecision = "auto"
    # trainable = heads: public text (a file, one text per line, "context<TAB>product" for
    # pairs) whose frozen-encoder states set the geometry the heads train in: centred and
    # whitened (client.precondition). The model and what travels stay the same; only the
    # steps change. "" = off.
    precondition_corpus: str = ""
    # Carry the optimizer's state (Adam's moments) from one training call of the run to the
    # next, in the node's state folder, instead of starting it afresh every round.
    keep_optimizer_state: bool = False
    # Each merchant's own intercept per trained task on the heads' scores (client.offsets),
    # trained in its DP-SGD calls with the heads, kept in its state folder and never sent; its
    # evaluation uses them. Off by default so that older scenarios and runs score the global
    # model alone, as they were measured; the default scenario turns it on.
    local_offsets: bool = False

    # --- privacy --------------------------------------------------------------------
    dp: bool = True
    noise_multiplier: float = 1.0  # σ; with noise-plan-calls, the least σ a merchant may use
    # > 0: each merchant sets its own σ (at least noise-multiplier) so that this many training
    # calls of the run fit its budget: small merchants, whose calls cost more ε, add more noise
    # instead of being refused after a call or two. 0: every merchant uses noise-multiplier.
    noise_plan_calls: int = 0
    max_grad_norm: float = 1.0
    target_epsilon: float = 8.0  # per-merchant budget; a hard stop
    target_delta: float = 1e-5
    # heads-apart: a record's head gradients and its encoder/adapter gradients are clipped
    # separately, each to max-grad-norm / sqrt(2), so the whole stays within max-grad-norm
    # (same noise, same ε) but the heads keep their share of it: otherwise the far larger
    # encoder part fills the clipping norm and the heads' signal drowns in the noise. Runs
    # with book-keeping clipping (client.dp.grad_sample_mode_for).
    clipping: Clipping = "flat"
    # What a neighbouring dataset removes (docs/privacy.md; DESIGN.md "Privacy model"). "user":
    # all of one user's interactions (one query's judgments), the unit whenever history
    # contexts make a row's features read the user's other rows; DP-SGD then samples users
    # and each sampled user contributes at most max-records-per-unit records, their summed
    # gradient clipped to max-grad-norm (client.trainer). "record": one row, refused when a
    # row's context came from other rows (history-length > 0).
    privacy_unit: PrivacyUnit = "user"
    # k, the records a sampled unit contributes to one step (chosen once per call, privately).
    # Default 1: a per-record clip is then a per-unit clip, so every trainable set and
    # per-sample mode runs unchanged (every shipped scenario, full and top-k fine-tuning with
    # book-keeping clipping included); it costs a user with many rows all but one of them per
    # call (reviews, one row per user, loses nothing). k > 1 sums a unit's records' per-sample
    # gradients before clipping: trainable heads and lora only (client.dp.PER_UNIT_SUM_MODES).
    max_records_per_unit: int = 1
    # Whether a train reply carries the call's wall times (duration-s, client-s). They are a
    # timing side channel: with trimmed padding a step's time follows the text lengths of the
    # records it sampled, and nothing accounts for that. The merchant's choice (a deployed
    # node sends them only when its own node config says true: client.policy); in simulation
    # the run config decides. The benchmarks that measure framework overhead turn it on.
    report_timings: bool = False

    # ---------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from a kebab-case (or snake_case) mapping; unknown keys are errors."""
        hints = get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name in RETIRED and _retired_default(key, value, RETIRED[name]):
                continue
            if name not in fields:
                raise ConfigError(f"unknown run-config key {key!r} (value {value!r})")
            values[name] = _coerce(key, value, hints[name])
        config = cls(**values)
        config.validate()
        return config

    def to_mapping(self) -> dict[str, bool | int | float | str]:
        """Kebab-case scalars, as Flower's run config and checkpoints store them."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    def evaluates_after(self, rnd: int) -> bool:
        """Whether the server evaluates the global model after round ``rnd``: every
        ``evaluate-every``-th round, and the run's last."""
        return rnd % self.evaluate_every == 0 or rnd == self.num_server_rounds

    def evaluations_from(self, rnd: int) -> int:
        """How many evaluations the run holds from round ``rnd`` (at least 1) to its last."""
        return sum(self.evaluates_after(r) for r in range(max(rnd, 1), self.num_server_rounds + 1))

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"run-config key {name.replace('_', '-')!r} = {getattr(self, name)!r}: {why}")

        positive_ints = ("num_server_rounds", "merchants_per_round", "batch_size", "max_seq_len",
                         "max_records_per_unit", "evaluate_every")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("max_local_steps", "early_stopping_rounds", "eval_max_examples",
                     "max_train_examples", "min_available_nodes", "history_length", "top_k_layers", "lora_r",
                     "noise_plan_calls", "encoder_rounds"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("learning_rate", "head_learning_rate", "max_grad_norm", "max_update_norm", "round_timeout_s",
                     "node_wait_timeout_s", "target_epsilon", "local_epochs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise bad(name, "must be a finite number > 0")
        if not (math.isfinite(self.eval_noise_multiplier) and self.eval_noise_multiplier > 0):
            raise bad("eval_noise_multiplier", "must be a finite number > 0")
        if self.eval_min_units < 1:
            raise bad("eval_min_units", "must be >= 1")
        if not (0.0 < self.target_delta < 1.0):
            raise bad("target_delta", "must lie strictly between 0 and 1")
        if not (0.0 < self.test_fraction < 1.0):
            raise bad("test_fraction", "must lie strictly between 0 and 1")
        if not (0.0 <= self.test_offset < 1.0):
            raise bad("test_offset", "must lie in [0, 1)")
        if not (0.0 <= self.dropout < 1.0):
            raise bad("dropout", "must lie in [0, 1)")
        if self.dp and not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise bad("noise_multiplier", "must be > 0 when dp = true (set dp = false for a non-private run)")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.aggregation == "secagg+":
            if not (0.0 < self.secagg_threshold <= 1.0):
                raise bad("secagg_threshold", "must lie in (0, 1]: the share of a round's merchants")
            if not (math.isfinite(self.secagg_clipping_range) and self.secagg_clipping_range > 0):
                raise bad("secagg_clipping_range", "must be a finite number > 0")
            # Flower's modulus is 2**32: the sum of a round's quantised updates must stay below it.
            if not (2 <= self.secagg_quantization_range <= 2 ** 24):
                raise bad("secagg_quantization_range", "must lie in [2, 2**24]")
            if self.strategy == "fedadam":
                raise bad("aggregation", "secagg+ works with strategy fedavg or fedprox, not fedadam")
            if self.merchants_per_round < 2:
                raise bad("aggregation", "secagg+ needs merchants-per-round >= 2 (one masked update is the update)")
        if self.merchant_epsilon < 0 or not math.isfinite(self.merchant_epsilon):
            raise bad("merchant_epsilon", "must be a finite number >= 0 (0 = no merchant-level DP)")
        if self.merchant_epsilon > 0:
            if self.aggregation != "secagg+":
                raise bad("merchant_epsilon", "needs aggregation = 'secagg+': each merchant adds only a share of "
                          "the noise, so its update must reach the server masked")
            if not (0.0 < self.merchant_delta < 1.0):
                raise bad("merchant_delta", "must lie strictly between 0 and 1")
            if not (math.isfinite(self.merchant_clip_norm) and self.merchant_clip_norm > 0):
                raise bad("merchant_clip_norm", "must be a finite number > 0")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise bad("proximal_mu", "must be a finite number >= 0")
        if self.precondition_corpus and self.trainable != "heads":
            raise bad("precondition_corpus", f"needs trainable = 'heads' (a frozen encoder), not {self.trainable!r}")
        if self.encoder_rounds and self.trainable != "top-k":
            raise bad("encoder_rounds", f"needs trainable = 'top-k' (the phases train heads, then top layers), "
                      f"not {self.trainable!r}")
        if self.encoder_rounds > self.num_server_rounds:
            raise bad("encoder_rounds", f"must be <= num-server-rounds ({self.num_server_rounds})")
        if self.early_stopping_rounds > 0:
            from shared.metrics import STOPPING_METRICS  # numpy only; the metric names live there

            if self.early_stopping_metric not in STOPPING_METRICS:
                raise bad("early_stopping_metric", f"must be one of {sorted(STOPPING_METRICS)} (a released metric "
                          "with a known better direction; baselines, thresholds and noise scales are not targets)")
        known = {"ctr", "rating", "relevance"}
        unknown = [t for t in self.task_names if t not in known]
        if unknown or not self.task_names:
            raise bad("tasks", f"must be a comma-separated subset of {sorted(known)}")


# Keys fedshop no longer has, with the one value every run now uses. A saved run's config
# (``--resume``) that names one at that value still loads; any other value is an error that
# says the option is gone, never silently dropped.
RETIRED: dict[str, tuple[Any, str]] = {
    # name: (the value a saved config may still carry, what every run does now)
    "grad_sample_mode": ("auto", "the per-sample mode is chosen per trainable set (client.dp)"),
    "precondition_shrink": (0.003, "client.precondition.SHRINK = 0.003"),
    # Opacus' PRV and RDP bound add/remove neighbours only; N is public, so every spend is
    # accounted for replace-one neighbours with dp_accounting's PLD (shared.privacy.accounting).
    "accountant": ("prv", "PLD for replace-one neighbours (shared.privacy.accounting)"),
}


def _retired_default(key: str, value: Any, retired: tuple[Any, str]) -> bool:
    accepted, now = retired
    if value == accepted:
        return True
    raise ConfigError(f"run-config key {key!r} = {value!r}: the option was removed (every run uses {now})")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn one raw scalar into the field's type, or say which key and value are wrong."""
    choices = get_args(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if choices:  # a Literal
            if value not in choices:
                raise ConfigError(f"run-config key {key!r} = {value!r}: must be one of {list(choices)}")
            return value
        return str(value)
    except ConfigError:  # a ValueError too: keep its "must be one of" message
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"run-config key {key!r} = {value!r}: expected {getattr(hint, '__name__', hint)}") from None
