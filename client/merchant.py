"""One merchant as a federation participant: who it is, its data, its budget, its work.

``client/app.py`` turns Flower messages into calls on ``Merchant``; everything a node does
between receiving global parameters and replying lives here, with no Flower types.

Identity comes from the node config (deployment: ``merchant-id``, ``data-dir``,
``state-dir``, ``target-epsilon``, ``target-delta``, ``device``) or, in simulation, from the
node's ``partition-id``, which indexes the sorted merchant folders under the run config's
``data-dir`` (or a synthetic merchant when ``data-dir`` is ``synthetic:N``).

The privacy state (``privacy-state.json``, ``shared.privacy.budget``) lives with the
merchant's data, so that every run spends one budget: in deployment in the node's
``state-dir`` (default ``<data-dir>/.fedshop``), in simulation in ``<merchant folder>/.fedshop``
as well, whatever the run folder. A deployed node never creates it (``fedshop deploy
add-merchant`` or ``PrivacyState.create`` does): finding none, it refuses to train. A
simulation creates a missing one (a scenario's first run on this data; ``fedshop simulate``
does so for every merchant before the federation starts). Synthetic merchants
(``synthetic:N``) have no folder: they are regenerated for each run, nobody's data, so their
state stays in ``<run-dir>/nodes/<merchant>/`` and lasts as long as the run. Caches that are
not privacy state (encoder features, optimizer state, local offsets) stay in the node's
``state_dir``: the run folder in simulation, so nothing but the privacy state is written into
merchant folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client import evaluation, features, node_cache, offsets, precondition, release, trainer
from client.data import MerchantData, build_examples, load_merchant, split_examples
from client.data.split import subsample_units
from client.policy import MerchantPolicy, delta_refusal
from shared.config import RunConfig
from shared.model import ModelSpec, choose_device, get_trainable, set_trainable
from shared.privacy import accounting
from shared.privacy.budget import BudgetExceededError, PrivacyState, PrivacyStateError
from shared.privacy.events import RELEASE_EVALUATION, MechanismEvent, SpendEvent
from shared.tasks import Example
from shared.wire import (
    CLIENT_S,
    DURATION_S,
    EVAL_LOSS,
    NUM_EXAMPLES,
    STATUS_OK,
    STATUS_REFUSED,
    STEPS,
    EvalReply,
    PrivacyFacts,
    TrainReply,
)

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
PRIVACY_STATE_FILE = "privacy-state.json"
STATE_FOLDER = ".fedshop"  # inside a merchant's data folder (merchant_dirs skips dot folders)


class NodeConfigError(ValueError):
    """The node config does not say which merchant this node is; the message names the key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeIdentity:
    merchant_id: str
    data_dir: Path | None  # None for a synthetic merchant
    synthetic_index: int | None
    state_dir: Path  # the node's own folder: caches, and the privacy state unless privacy_dir says otherwise
    target_epsilon: float
    target_delta: float
    device: str
    privacy_dir: Path | None = None  # where privacy-state.json lives, if not in state_dir (simulation)
    # A missing privacy state may be created by a training call: in simulation only (see the
    # module docstring); a deployed node refuses instead of starting from zero.
    creates_privacy_state: bool = False

    @property
    def state_path(self) -> Path:
        return (self.privacy_dir or self.state_dir) / PRIVACY_STATE_FILE


def simulated_state_dir(run_dir: Path | str, merchant_id: str) -> Path:
    """A simulated merchant's own folder: ``RUN_DIR/nodes/<merchant>`` (its caches, optimizer
    state and local offsets; a synthetic merchant's privacy state too). Where the benchmarks read
    a run's local offsets from (``client.offsets.for_node``)."""
    return Path(run_dir) / "nodes" / merchant_id


def privacy_state_path(merchant_dir: Path) -> Path:
    """The privacy state kept with a merchant's data folder (deployment default, simulation, train-local)."""
    return Path(merchant_dir) / STATE_FOLDER / PRIVACY_STATE_FILE


def merchant_dirs(root: Path) -> list[Path]:
    """Merchant folders under a federation data folder, in a stable (sorted) order."""
    if not root.is_dir():
        raise NodeConfigError(f"data-dir {str(root)!r} is not a folder")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise NodeConfigError(f"data-dir {str(root)!r} holds no merchant folders")
    return dirs


def resolve_node(node_config: Mapping[str, Any], config: RunConfig) -> NodeIdentity:
    """Work out which merchant this node is. The merchant's own budget keys win over the run's."""
    target_epsilon = min(float(node_config.get("target-epsilon", config.target_epsilon)), config.target_epsilon)
    target_delta = float(node_config.get("target-delta", config.target_delta))
    device = str(node_config.get("device", config.device))
    if "data-dir" in node_config:  # deployment: the merchant names its own folder
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        merchant_id = str(node_config.get("merchant-id", data_dir.name))
        state_dir = Path(str(node_config.get("state-dir", data_dir / STATE_FOLDER))).expanduser()
        return NodeIdentity(merchant_id=merchant_id, data_dir=data_dir, synthetic_index=None,
                            state_dir=state_dir, target_epsilon=target_epsilon,
                            target_delta=target_delta, device=device)
    if "partition-id" not in node_config:
        raise NodeConfigError("node config has neither 'data-dir' (deployment) nor 'partition-id' (simulation)")
    pid = int(node_config["partition-id"])
    if config.data_dir.startswith(SYNTHETIC_PREFIX):
        from client.sources.synthetic import SyntheticFederation  # simulated merchants only

        federation = SyntheticFederation(synthetic_count(config.data_dir), seed=config.synthetic_seed)
        merchant_id = federation.merchant_id(pid)
        return NodeIdentity(merchant_id=merchant_id, data_dir=None, synthetic_index=pid,
                            state_dir=simulated_state_dir(config.run_dir, merchant_id), target_epsilon=target_epsilon,
                            target_delta=target_delta, device=device, creates_privacy_state=True)
    if not config.data_dir:
        raise NodeConfigError("run-config key 'data-dir' is empty: set it to a folder of merchant folders")
    dirs = merchant_dirs(Path(config.data_dir))
    if pid >= len(dirs):
        raise NodeConfigError(f"partition-id {pid} but data-dir {config.data_dir!r} has only {len(dirs)} merchants")
    return NodeIdentity(merchant_id=dirs[pid].name, data_dir=dirs[pid], synthetic_index=None,
                        state_dir=simulated_state_dir(config.run_dir, dirs[pid].name), target_epsilon=target_epsilon,
                        target_delta=target_delta, device=device,
                        privacy_dir=privacy_state_path(dirs[pid]).parent, creates_privacy_state=True)


def synthetic_count(data_dir: str) -> int:
    raw = data_dir[len(SYNTHETIC_PREFIX):]
    if not raw.isdigit() or int(raw) < 1:
        raise NodeConfigError(f"data-dir {data_dir!r}: expected 'synthetic:N' with N >= 1")
    return int(raw)


@dataclasses.dataclass(frozen=True)
class MerchantSplit:
    train: list[Example]
    test: list[Example]


def _subsample(examples: list[Example], limit: int, salt: str, unit: str) -> list[Example]:
    """At most ``limit`` whole units (``subsample_units``: by the hash of each unit's stable key,
    never a position), so evaluation sees the same records every round and a replaced unit
    changes the capped set by at most one replacement."""
    return subsample_units(examples, limit, salt, unit=unit)


def split_merchant(data: MerchantData, config: RunConfig) -> MerchantSplit:
    """A merchant's training examples and held-out examples, as every part of fedshop sees them.

    Federated training and evaluation, ``train-local`` and the utility benchmark all split
    through here, so every comparison is on the same held-out records.
    """
    examples = build_examples(data, conversion_label=config.conversion_label,
                              history_length=config.history_length, tasks=config.task_names,
                              privacy_unit=config.privacy_unit)
    if not examples:
        raise NodeConfigError(f"merchant {data.merchant_id!r} has no examples for tasks {config.tasks!r}")
    train, test = split_examples(examples, test_fraction=config.test_fraction, seed=config.split_seed,
                                 offset=config.test_offset, unit=config.privacy_unit)
    train = _subsample(train, config.max_train_examples, f"train:{data.merchant_id}", config.privacy_unit)
    test = _subsample(test, config.eval_max_examples, f"test:{data.merchant_id}", config.privacy_unit)
    return MerchantSplit(train=train, test=test)


class Merchant:
    """A node's merchant: loads its data once per call and trains or evaluates the model."""

    def __init__(self, identity: NodeIdentity, config: RunConfig, *, policy: MerchantPolicy | None = None) -> None:
        self.identity = identity
        self.policy = policy or MerchantPolicy()
        self.requested = config  # the run's request, before the merchant's own values replace its
        self.config = self.policy.apply(config)

    def load_data(self) -> MerchantData:
        if self.identity.synthetic_index is not None:
            from client.sources.synthetic import SyntheticFederation

            federation = SyntheticFederation(synthetic_count(self.config.data_dir), seed=self.config.synthetic_seed)
            return federation.merchant(self.identity.synthetic_index)
        assert self.identity.data_dir is not None
        return load_merchant(self.identity.data_dir)  # raises DataValidationError, writes nothing

    def split(self) -> MerchantSplit:
        """The merchant's train/held-out split; kept by the worker between calls while the
        merchant's files and the run config stay the same (``client.node_cache``)."""
        source = (self.identity.merchant_id, self.identity.data_dir, self.identity.synthetic_index)
        return node_cache.split(source, self.identity.data_dir, self.config,
                                lambda: split_merchant(self.load_data(), self.config))

    @property
    def feature_cache(self) -> Path:
        """Where this merchant's frozen-encoder states are kept (``trainable = heads``)."""
        return features.cache_dir(self.config.feature_cache_dir, self.identity.state_dir / "features",
                                  self.identity.merchant_id)

    @property
    def corpus_cache(self) -> Path:
        """Where ``precondition-corpus``'s states are kept: public text, so one folder may serve
        every merchant that shares ``feature-cache-dir``."""
        return features.cache_dir(self.config.feature_cache_dir, self.feature_cache) / precondition.CACHE_FOLDER

    @property
    def offsets_path(self) -> Path:
        """Where this merchant's own score offsets are kept (``local-offsets``, ``client.offsets``)."""
        return self.identity.state_dir / offsets.OFFSETS_FILE

    def own_offsets(self, run_id: str) -> offsets.Offsets | None:
        """The offsets this merchant's training calls of the run left, to evaluate with; None without."""
        if not self.config.local_offsets:
            return None
        return offsets.load(self.offsets_path, tasks=self.config.task_names, run_id=run_id)

    @contextlib.contextmanager
    def privacy_state(self) -> Iterator[PrivacyState | None]:
        """The merchant's state, locked for one training call (check → train → commit); None without DP.

        Raises ``PrivacyStateError`` naming the file if a deployed node has none (see the module
        docstring); a simulation creates it."""
        if not self.config.dp:
            yield None
            return
        with PrivacyState.locked(self.identity.state_path, merchant_id=self.identity.merchant_id,
                                 target_epsilon=self.identity.target_epsilon,
                                 target_delta=self.identity.target_delta,
                                 create=self.identity.creates_privacy_state) as state:
            yield state

    def _model(self, params: dict[str, np.ndarray]) -> Any:
        spec = ModelSpec.from_config(self.config)
        model = node_cache.model(spec)
        set_trainable(model, params)
        return model, node_cache.tokenizer(spec)

    def train(self, params: dict[str, np.ndarray], *, server_round: int, model_version: int,
              run_id: str = "", proximal_mu: float = 0.0,
              eval_settings: release.EvalSettings | None = None) -> TrainReply:
        """Train from the global parameters; a budget refusal is a typed reply, not a crash.
        ``proximal_mu``: FedProx's μ, when the server sent one (``trainer.proximal_term``).
        ``eval_settings``: the merchant's evaluation choices, so that a noise plan leaves room
        for the evaluations it will release in the rest of the run (``evaluations_ahead``)."""
        started = time.perf_counter()
        split = self.split()
        refusal = self.policy.refusal(self.requested)
        if not refusal and self.config.dp:
            refusal = delta_refusal(self.identity.target_delta,
                                    release.unit_count(split.train, unit=self.config.privacy_unit))
        if refusal:  # the run asks for less privacy than this merchant allows: nothing trains, nothing is spent
            log.warning("merchant %s refuses round %d: %s", self.identity.merchant_id, server_round, refusal)
            return TrainReply(facts=self._facts(None, status=STATUS_REFUSED, event=self._refused(),
                                                model_version=model_version, epsilon=0.0, reason=refusal),
                              params=None, metrics={})
        model, tokenizer = self._model(params)
        device = choose_device(self.identity.device)
        with self.privacy_state() as privacy:  # held from the budget check to the committed spend
            try:
                result = trainer.train(model, split.train, tokenizer, self.config, privacy=privacy,
                                       round=server_round, model_version=model_version, run_id=run_id,
                                       device=device, feature_cache=self.feature_cache, corpus_cache=self.corpus_cache,
                                       optimizer_state=self.identity.state_dir / "optimizer-state.pt",
                                       proximal_mu=proximal_mu, local_offsets=self.offsets_path,
                                       reserve=self.evaluations_ahead(split, eval_settings, server_round))
            except BudgetExceededError as exc:
                log.warning("%s", exc)
                assert privacy is not None
                return TrainReply(facts=self._facts(privacy, status=STATUS_REFUSED, event=self._refused(),
                                                    model_version=model_version, epsilon=exc.epsilon_now,
                                                    reason=str(exc)), params=None, metrics={})
        model.cpu()
        facts = self._facts(privacy, status=STATUS_OK, event=self._released(privacy, result),
                            model_version=model_version, epsilon=result.epsilon)
        # No loss: it would leave unaccounted (shared.wire.TRAIN_METRIC_KEYS); it stays in this process.
        log.debug("merchant %s round %d: mean train loss %.4f", self.identity.merchant_id, server_round,
                  result.mean_loss)
        metrics = {NUM_EXAMPLES: float(result.num_examples), STEPS: float(result.steps)}
        if self.config.report_timings:  # a timing side channel: sent only by the merchant's choice (client.policy)
            metrics |= {DURATION_S: result.duration_s, CLIENT_S: time.perf_counter() - started}
        return TrainReply(facts=facts, params=dict(get_trainable(model)), metrics=metrics)

    def _facts(self, privacy: PrivacyState | None, *, status: str, event: SpendEvent, model_version: int,
               epsilon: float, reason: str = "") -> PrivacyFacts:
        return PrivacyFacts(
            merchant_id=self.identity.merchant_id, status=status, dp=self.config.dp, event=event, epsilon=epsilon,
            epsilon_budget=privacy.target_epsilon if privacy else float(self.identity.target_epsilon),
            accountant=accounting.ACCOUNTANT, model_version=model_version, reason=reason,
        )

    def _released(self, privacy: PrivacyState | None, result: trainer.TrainResult) -> SpendEvent:
        """What a finished call released: a private call's spend is the one the trainer committed
        to the merchant's state; a non-private call's has no noise (σ = q = 0) and no δ."""
        if privacy is not None:
            committed = privacy.entries[-1].event
            assert committed.mechanism == result.mechanism, "the trainer did not commit this call's spend"
            return committed
        return SpendEvent.of(MechanismEvent(noise_multiplier=0.0, sample_rate=0.0, steps=result.steps,
                                            max_grad_norm=self.config.max_grad_norm),
                             unit_count=result.num_examples, delta=0.0, noise="")

    def _refused(self) -> SpendEvent:
        """A refused call released nothing: no steps, no units, no noise drawn (σ is the run's floor)."""
        return SpendEvent.of(MechanismEvent(noise_multiplier=self.config.noise_multiplier, sample_rate=0.0, steps=0,
                                            max_grad_norm=self.config.max_grad_norm),
                             unit_count=0, delta=self.identity.target_delta, noise="")

    def evaluations_ahead(self, split: MerchantSplit, settings: release.EvalSettings | None,
                          server_round: int) -> list[MechanismEvent]:
        """The evaluation releases this merchant expects from this round to the run's last: one
        per evaluated round (the server evaluates every merchant after every ``evaluate-every``-th
        round's aggregation and the last's), none when it does not evaluate or its held-out set
        is below its minimum (refused, unspent)."""
        if settings is None or not settings.evaluate or not self.config.dp:
            return []
        if release.unit_count(split.test, unit=self.config.privacy_unit) < settings.min_units:
            return []
        return [settings.mechanism] * self.config.evaluations_from(server_round)

    def evaluate(self, params: dict[str, np.ndarray], settings: release.EvalSettings, *, server_round: int = 0,
                 model_version: int = 0, run_id: str = "") -> EvalReply:
        """The global model's metrics on this merchant's held-out set, released only as noised
        sums (``client.release``) and accounted as an evaluation spend in its privacy state; with
        ``local-offsets``, the model it serves: the global model plus its own offsets.

        Nothing is released and nothing spent when the merchant does not evaluate
        (``settings.evaluate``), its held-out set has fewer than ``settings.min_units`` units,
        or its budget cannot afford the release; the reply then says why. Without DP (a
        non-private baseline) the metrics are exact and nothing is accounted."""
        if not settings.evaluate:
            return self._no_evaluation("evaluation is off (the merchant's 'evaluate = false')")
        split = self.split()
        units = release.unit_count(split.test, unit=self.config.privacy_unit)
        if units < settings.min_units:
            return self._no_evaluation(f"refused: the held-out set has {units} unit(s), fewer than "
                                       f"eval-min-units = {settings.min_units}")
        model, tokenizer = self._model(params)
        device = choose_device(self.identity.device)
        own = self.own_offsets(run_id)
        if not self.config.dp:
            exact = evaluation.evaluate(model, split.test, tokenizer, self.config, device=device,
                                        feature_cache=self.feature_cache, offsets=own)
            return EvalReply(merchant_id=self.identity.merchant_id, facts=None,
                             metrics={NUM_EXAMPLES: float(units), EVAL_LOSS: exact.loss, **exact.metrics})
        mechanism = settings.mechanism
        try:
            with self.privacy_state() as privacy:  # held from the budget check to the committed spend
                assert privacy is not None
                try:
                    privacy.check(mechanism)
                except BudgetExceededError as exc:
                    return self._no_evaluation(f"refused: {exc}")
                metrics = release.release(model, split.test, tokenizer, self.config,
                                          noise_multiplier=settings.noise_multiplier, device=device,
                                          feature_cache=self.feature_cache, offsets=own)
                epsilon = privacy.commit(mechanism, unit_count=units, round=server_round, model_version=model_version,
                                         run_id=run_id, unit=self.config.privacy_unit, release=RELEASE_EVALUATION)
                facts = self._facts(privacy, status=STATUS_OK, event=privacy.entries[-1].event,
                                    model_version=model_version, epsilon=epsilon)
        except PrivacyStateError as exc:
            return self._no_evaluation(f"refused: {exc}")
        return EvalReply(merchant_id=self.identity.merchant_id, facts=facts, metrics=metrics)

    def _no_evaluation(self, reason: str) -> EvalReply:
        log.info("merchant %s: no evaluation released: %s", self.identity.merchant_id, reason)
        return EvalReply(merchant_id=self.identity.merchant_id, facts=None, metrics={}, reason=reason)
