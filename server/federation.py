"""The federated run: rounds of sample -> train -> screen -> ledger -> aggregate -> checkpoint.

fedshop owns the round loop (instead of ``Strategy.start``) because durability has to sit
*between* Flower's steps: the privacy ledger is written after replies arrive and before
their aggregate is used, and a checkpoint is written after every round so a run resumes
from its last complete round. Sampling and aggregation stay the strategy's (see
``server.strategy``).

Guards for Flower's two silent failure modes:
- a round never waits forever: enough nodes must connect within ``node-wait-timeout-s``,
  and replies are awaited for at most ``round-timeout-s``;
- a round in which no update was accepted raises ``RoundFailedError`` (non-zero exit) with
  every merchant's outcome, instead of ending "completed".
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server import checkpoint as ckpt
from server.ledger import PrivacyLedger
from server.ledger_record import SpendRecord, spend_record
from server.round_report import FederationResult, RoundReport, combine_metrics
from server.run_log import RunLog
from server.screening import screen_update
from server.secure_aggregation import SecureAggregation, masked_bytes
from server.strategy import EligibleNodesGrid, build_strategy, restore_strategy_state, strategy_state
from shared import atomic
from shared.config import RunConfig
from shared.metrics import HIGHER_IS_BETTER, is_noise_scale, is_released_sum
from shared.privacy import merchant_level
from shared.run_files import CONFIG_FILE, LEDGER_FILE
from shared.wire import (
    ARRAYS,
    CLIENT_S,
    DURATION_S,
    MERCHANT,
    MERCHANT_ID,
    METRICS,
    MODEL_VERSION,
    PRIVACY,
    RUN_ID,
    STATUS_OK,
    STATUS_REFUSED,
    TIMING_METRIC_KEYS,
    EvalReply,
    MalformedUpdateError,
    PrivacyFacts,
    TrainReply,
    WireError,
    array_bytes,
    packed_key,
    params_to_record,
    record_to_params,
)

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The run cannot go on; the message says why. Entry points exit non-zero on it."""


class RoundFailedError(FederationError):
    """No update was accepted in a round."""


class NotEnoughNodesError(FederationError):
    """Too few nodes connected within the bounded wait."""


class Federation:
    """Drives one run over a Flower grid; all state lives under ``config.run_dir``."""

    def __init__(self, grid: Grid, config: RunConfig, initial_params: dict[str, np.ndarray]) -> None:
        self.grid = grid
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.strategy: Strategy = build_strategy(config)
        # aggregation = secagg+: training rounds run Flower's SecAgg+ protocol instead.
        self.secure = SecureAggregation(config) if config.aggregation == "secagg+" else None
        self.params = dict(initial_params)
        self.start_round = 1
        # The round whose aggregate self.params is (0 = initial). Not start_round - 1: a round
        # recorded in the ledger but never checkpointed is skipped, and its aggregate is lost.
        self.model_version = 0
        self.node_merchant: dict[int, str] = {}  # learned from replies; merchant ids come from nodes
        self.exhausted: set[str] = set()
        self._prepare_run_dir(config)
        self.ledger = PrivacyLedger(self.run_dir / LEDGER_FILE)
        self._init_ledger_meta()
        self.run_log = RunLog(self.run_dir)

    # ------------------------------------------------------------------ set-up / resume
    def _prepare_run_dir(self, config: RunConfig) -> None:
        existing = (self.run_dir / LEDGER_FILE).exists()
        if existing and not config.resume:
            # Two front doors reach this: `fedshop simulate --out DIR` and `flwr run` (whose
            # run-config cannot combine a scenario file with KEY=VALUE overrides), so say both.
            raise FederationError(
                f"run dir {self.run_dir} already holds a run (ledger present). To continue it: "
                f"`fedshop simulate --resume {self.run_dir}`, or with `flwr run` a run-config that sets "
                "resume = true. To start a new run: `fedshop simulate --out NEW_DIR`, or with `flwr run` a "
                "run-config (a copy of the scenario file) whose run-dir names a new folder"
            )
        if config.resume and not existing:
            raise FederationError(f"--resume {self.run_dir}: no run there (no {LEDGER_FILE})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config.resume:
            latest = ckpt.load_latest(self.run_dir)
            if latest is not None:
                self.params = dict(latest.parameters)
                restore_strategy_state(self.strategy, latest.extra_arrays, self.params)
                self.start_round = latest.round + 1
                self.model_version = latest.round
        # Atomic: --resume reads it back, and a torn one would leave the run unresumable.
        atomic.write_json(self.run_dir / CONFIG_FILE, config.to_mapping())

    def _init_ledger_meta(self) -> None:
        meta = self.ledger.meta()
        if "run_id" not in meta:
            self.ledger.set_meta("run_id", uuid.uuid4().hex)
            # The run's unit; a merchant may pin its own, and every row names the unit it was accounted for.
            guarantee = f"{self.config.privacy_unit}-level (ε, δ)-DP per merchant, replace-one neighbours"
            if self.config.merchant_epsilon > 0:
                guarantee += (f"; merchant-level (ε = {self.config.merchant_epsilon:g}, δ = "
                              f"{self.config.merchant_delta:g})-DP over the run, replace-one merchants, under secagg+")
            self.ledger.set_meta("guarantee", guarantee)
        self.run_id = self.ledger.meta()["run_id"]
        if self.config.resume:
            # A round recorded in the ledger but not checkpointed really spent privacy; its
            # aggregate is lost, and its number is not reused (that spend stays as recorded).
            last_ledger = self.ledger.last_round()
            if last_ledger >= self.start_round:
                log.warning("round %d is in the ledger but was not checkpointed; continuing at round %d",
                            last_ledger, last_ledger + 1)
                self.start_round = last_ledger + 1
            self.exhausted = self.ledger.exhausted()
            log.info("resuming run %s at round %d", self.run_id, self.start_round)

    # ------------------------------------------------------------------ the loop
    def run(self) -> FederationResult:
        reports: list[RoundReport] = []
        best: float | None = None
        since_best = 0
        stopped = "all rounds done"
        model_version = self.model_version
        if self.config.early_stopping_rounds and is_noise_scale(self.config.early_stopping_metric):
            log.warning("early-stopping-metric = %r is a noise scale, not a metric: early stopping is off",
                        self.config.early_stopping_metric)
        for rnd in range(self.start_round, self.config.num_server_rounds + 1):
            eligible = self._eligible_nodes()
            if not eligible:
                stopped = "every merchant's privacy budget is spent"
                log.warning("stopping before round %d: %s", rnd, stopped)
                break
            report = self._train_round(rnd, eligible, model_version=model_version)
            if report.aggregated:
                model_version = rnd
            # evaluate = false: nobody is asked (a merchant releases metrics only when asked,
            # and a deployed round would still pay a round trip for replies holding nothing).
            if self.config.evaluate and self.config.evaluates_after(rnd):
                self._evaluate_round(rnd, eligible, report, model_version=model_version)
            self.run_log.append(report)
            ckpt.save_checkpoint(self.run_dir, ckpt.Checkpoint(
                round=rnd, parameters=self.params, config=self.config.to_mapping(),
                extra={"run_id": self.run_id}, extra_arrays=strategy_state(self.strategy)))
            reports.append(report)
            if self.config.early_stopping_rounds:
                value = report.stopping_value(self.config.early_stopping_metric)  # never a noise scale
                if value is not None:
                    higher = HIGHER_IS_BETTER.get(self.config.early_stopping_metric, True)
                    if best is None or (value > best if higher else value < best):
                        best, since_best = value, 0
                    else:
                        since_best += 1
                    if since_best >= self.config.early_stopping_rounds:
                        stopped = (f"early stopping: {self.config.early_stopping_metric} has not improved "
                                   f"for {since_best} rounds (best {best:.4f})")
                        log.info(stopped)
                        break
        return FederationResult(rounds_completed=self.ledger.last_round(), params=self.params,
                                reports=reports, stopped_because=stopped)

    def close(self) -> None:
        self.ledger.close()

    # ------------------------------------------------------------------ sampling
    def _eligible_nodes(self) -> list[int]:
        """Connected nodes, minus exhausted merchants, after a bounded wait for enough of them."""
        need = self.config.min_available_nodes or self.config.merchants_per_round
        deadline = time.monotonic() + self.config.node_wait_timeout_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= need:
                break
            if time.monotonic() > deadline:
                raise NotEnoughNodesError(
                    f"only {len(nodes)} node(s) connected after waiting {self.config.node_wait_timeout_s:.0f} s "
                    f"(need {need}; run-config keys 'min-available-nodes' / 'node-wait-timeout-s'; a local "
                    "simulation started by `flwr run` has as many nodes as its --federation-config "
                    "\"num-supernodes=N\", 2 by default)"
                )
            time.sleep(0.5)
        return [n for n in nodes if self.node_merchant.get(n) not in self.exhausted]

    def _sample(self, rnd: int, eligible: list[int]) -> list[int]:
        # Seeded per round, so a resumed run samples what the uninterrupted one would have.
        rng = random.Random(self.config.seed * 1_000_003 + rnd)
        return sorted(rng.sample(eligible, min(self.config.merchants_per_round, len(eligible))))

    # ------------------------------------------------------------------ training
    def _train_round(self, rnd: int, eligible: list[int], *, model_version: int) -> RoundReport:
        start = time.monotonic()
        sampled = self._sample(rnd, eligible)
        report = RoundReport(round=rnd)
        report.sampled = [self.node_merchant.get(n, f"node-{n}") for n in sampled]
        log.info("round %d/%d: training on %d merchant(s)", rnd, self.config.num_server_rounds, len(sampled))
        train_config = ConfigRecord({MODEL_VERSION: model_version, RUN_ID: self.run_id})
        global_record = params_to_record(self.params)
        global_key = packed_key(global_record)
        messages = list(self.strategy.configure_train(
            rnd, global_record, train_config, EligibleNodesGrid(self.grid, sampled)))  # type: ignore[arg-type]
        if self.secure is not None:
            return self._secure_train_round(rnd, messages, report, start)
        replies = self._collect(messages, phase="train", rnd=rnd)

        accepted: list[Message] = []
        records: list[SpendRecord] = []
        for node_id, msg in replies:
            if msg is None or msg.has_error():
                reason = "no reply within round-timeout-s" if msg is None else short_reason(msg.error.reason or "")
                report.failed[self.node_merchant.get(node_id, f"node-{node_id}")] = reason
                continue
            try:
                reply = TrainReply.from_recorddict(msg.content)
            except MalformedUpdateError as exc:  # the facts read: the call's spend is recorded
                records.append(self._outcome(rnd, node_id, exc.facts, "rejected", f"malformed update: {exc.reason}",
                                             report))
                continue
            except WireError as exc:
                report.failed[f"node-{node_id}"] = f"malformed reply: {exc}"
                continue
            facts = reply.facts
            status = "accepted"
            reason = ""
            if facts.status == STATUS_REFUSED:
                status, reason = "refused", facts.reason
            else:
                assert reply.params is not None
                report.bytes_received += array_bytes(reply.params)
                verdict = screen_update(reply.params, self.params, max_update_norm=self.config.max_update_norm)
                if verdict.accepted:
                    if packed_key(msg.content.array_records[ARRAYS]) != global_key:
                        # Same parameters in another order (or unpacked): Flower averages arrays
                        # by key, so every reply is laid out as the global model is.
                        msg.content.array_records[ARRAYS] = params_to_record({k: reply.params[k] for k in self.params})
                    accepted.append(msg)
                    report.accepted.append(facts.merchant_id)
                    _count_timings(report, reply.metrics)
                else:
                    status, reason = "rejected", verdict.reason
            records.append(self._outcome(rnd, node_id, facts, status, reason, report))
        # The ledger is written before this round's aggregate is used for anything.
        if records:
            self.ledger.record_round(records)
        if not accepted:
            return self._nothing_accepted(rnd, report, start, "no update was accepted")
        # Flower's aggregation reads exactly one ArrayRecord + one MetricRecord per reply, with
        # the same keys in each: timings are there only where a merchant chose to report them.
        for msg in accepted:
            del msg.content.config_records[PRIVACY]
            if METRICS in msg.content.metric_records:
                for key in TIMING_METRIC_KEYS:
                    msg.content.metric_records[METRICS].pop(key, None)
        arrays, _ = self.strategy.aggregate_train(rnd, accepted)
        if arrays is None:
            raise RoundFailedError(f"round {rnd}: the strategy produced no aggregate")
        self.params = dict(record_to_params(arrays))
        report.aggregated = True
        report.wall_s = time.monotonic() - start
        log.info("round %d: %d accepted, %d rejected, %d refused, %d failed",
                 rnd, len(report.accepted), len(report.rejected), len(report.refused), len(report.failed))
        return report

    def _outcome(self, rnd: int, node_id: int, facts: PrivacyFacts, status: str, reason: str,
                 report: RoundReport) -> SpendRecord:
        """One merchant's outcome of a training round, in the round's report and as its ledger
        row; a refusing or spent merchant is not sampled again."""
        self.node_merchant[node_id] = facts.merchant_id
        report.epsilon[facts.merchant_id] = facts.epsilon
        if status == "refused":
            report.refused[facts.merchant_id] = reason
            self.exhausted.add(facts.merchant_id)
        elif status == "rejected":
            report.rejected[facts.merchant_id] = reason
            log.warning("round %d: rejected update from merchant %s: %s", rnd, facts.merchant_id, reason)
        if facts.dp and facts.epsilon >= facts.epsilon_budget:
            self.exhausted.add(facts.merchant_id)
        return spend_record(facts, run_id=self.run_id, round=rnd, node_id=node_id, status=status, reason=reason)

    def _nothing_accepted(self, rnd: int, report: RoundReport, start: float, why: str) -> RoundReport:
        """A round without an aggregate: the normal end when every merchant refused, else a failure."""
        report.wall_s = time.monotonic() - start
        if report.refused and not report.rejected and not report.failed:
            # Budgets running out is the normal end of a private federation, not a fault:
            # the model stays as it was and those merchants are not sampled again. A
            # refusal may also be a merchant's pin (dp, noise floor, δ): say theirs, not "budget".
            reasons = "; ".join(f"{m}: {r}" for m, r in sorted(report.refused.items()))
            log.warning("round %d: every sampled merchant refused; model unchanged (%s)", rnd, reasons)
            return report
        self.run_log.append(report)
        raise RoundFailedError(f"round {rnd}: {why} ({report.outcome_text()})")

    def _secure_train_round(self, rnd: int, messages: list[Message], report: RoundReport,
                            start: float) -> RoundReport:
        """A training round as SecAgg+ (``server.secure_aggregation``): the ledger gets every
        merchant whose third-stage reply arrived (each trained, and says what it spent), the
        model the unmasked mean update. The server never holds one merchant's update, so it
        screens none: quantisation bounds each (module docstring there)."""
        assert self.secure is not None
        outcome = self.secure.run(rnd, messages, list(self.params),
                                  lambda batch, phase: self._collect(batch, phase=phase, rnd=rnd))
        records: list[SpendRecord] = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            reply = outcome.replies.get(node_id)
            who = self.node_merchant.get(node_id, f"node-{node_id}")
            if reply is None:
                report.failed[who] = outcome.reason or "left the protocol before sending its masked update"
                continue
            try:
                facts = PrivacyFacts.from_record(reply.content.config_records[PRIVACY])
            except (KeyError, WireError) as exc:
                report.failed[who] = f"malformed reply: {exc}"
                continue
            report.bytes_received += masked_bytes(reply)
            if facts.status == STATUS_REFUSED:
                status, reason = "refused", facts.reason
            elif outcome.mean_update is None:
                status, reason = "rejected", f"update not used: {outcome.reason}"
            else:
                status, reason = "accepted", ""
                report.accepted.append(facts.merchant_id)
                record = reply.content.metric_records.get(METRICS)
                _count_timings(report, {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
                               if record else {})
            records.append(self._outcome(rnd, node_id, facts, status, reason, report))
        if records:
            self.ledger.record_round(records)
        if outcome.unmasked and self.config.merchant_epsilon > 0:
            self._record_merchant_level(rnd, outcome.contributors)
        if outcome.mean_update is None:
            if not outcome.fault:  # too few trained (the rest refused): as a round everyone refused
                report.wall_s = time.monotonic() - start
                log.warning("round %d: %s; model unchanged", rnd, outcome.reason)
                return report
            return self._nothing_accepted(rnd, report, start, outcome.reason or "no update was accepted")
        self.params = {k: (v + outcome.mean_update[k]).astype(v.dtype) for k, v in self.params.items()}
        report.aggregated = True
        report.wall_s = time.monotonic() - start
        log.info("round %d (secagg+): mean of %d masked update(s); %d refused, %d failed",
                 rnd, len(report.accepted), len(report.refused), len(report.failed))
        return report

    def _record_merchant_level(self, rnd: int, contributors: int) -> None:
        """The round's merchant-level release in the ledger, with the run's ε after it: written
        once the server has unmasked the sum, before the sum is used (or refused) at all."""
        past = self.ledger.merchant_level_rows()
        row = merchant_level.MerchantLevelRound(
            run_id=self.run_id, round=rnd, contributors=contributors,
            noise_multiplier=merchant_level.noise_multiplier(self.config), clip_norm=self.config.merchant_clip_norm,
            delta=self.config.merchant_delta, epsilon=0.0)
        row = dataclasses.replace(row, epsilon=merchant_level.epsilon([*past, row], self.config.merchant_delta))
        self.ledger.record_merchant_level(row)
        log.info("round %d: merchant-level ε %.3f of %.3f (σ_m %.3f, %d merchants in the sum)", rnd, row.epsilon,
                 self.config.merchant_epsilon, row.noise_multiplier, contributors)

    def _evaluate_round(self, rnd: int, eligible: list[int], report: RoundReport, *, model_version: int) -> None:
        """Federated evaluation of the new global model on merchants' held-out data.

        Each merchant releases noised metrics and accounts them (``client.release``); their
        spend is written to the ledger (release ``"evaluation"``) before the metrics are used.
        A merchant that released nothing (evaluation off, held-out set too small, budget
        spent) says why; that is logged and spends nothing."""
        nodes = eligible if len(eligible) <= 50 else self._sample(rnd + 7919, eligible)
        config = ConfigRecord({MODEL_VERSION: model_version, RUN_ID: self.run_id})
        messages = list(self.strategy.configure_evaluate(
            rnd, params_to_record(self.params), config, EligibleNodesGrid(self.grid, nodes)))  # type: ignore[arg-type]
        records: list[SpendRecord] = []
        released: list[EvalReply] = []
        for node_id, msg in self._collect(messages, phase="evaluate", rnd=rnd):
            if msg is None or msg.has_error():
                continue
            try:
                reply = EvalReply.from_recorddict(msg.content)
            except WireError as exc:
                log.warning("round %d evaluate: node %d sent a malformed reply: %s", rnd, node_id, exc)
                continue
            if not reply.released:
                log.info("round %d evaluate: merchant %s released no metrics: %s", rnd, reply.merchant_id,
                         reply.reason or "no reason given")
                continue
            if reply.facts is not None:
                if reply.facts.status != STATUS_OK:
                    continue
                records.append(spend_record(reply.facts, run_id=self.run_id, round=rnd, node_id=node_id,
                                            status="accepted", reason=""))
                report.epsilon[reply.facts.merchant_id] = reply.facts.epsilon
                if reply.facts.dp and reply.facts.epsilon >= reply.facts.epsilon_budget:
                    self.exhausted.add(reply.facts.merchant_id)
            released.append(reply)
        # The ledger is written before the released metrics are used for anything.
        if records:
            self.ledger.record_round(records)
        # The metrics of the merchants' pooled noised sums (a unit-weighted mean of their metrics
        # where some merchant sent no sums: a non-private run); each merchant's own for its view.
        report.eval_metrics = combine_metrics([reply.metrics for reply in released])
        report.eval_per_merchant = {
            reply.merchant_id: {k: v for k, v in reply.metrics.items() if not is_released_sum(k)} for reply in released}
        if report.eval_metrics:
            log.info("round %d evaluation (noised): %s", rnd, report.eval_text())

    def _collect(self, messages: list[Message], *, phase: str, rnd: int) -> list[tuple[int, Message | None]]:
        """Push messages, then gather replies as they come (logging each), up to the round timeout."""
        if not messages:
            return []
        for message in messages:
            # A message outliving its round could be pulled by a node that comes back later
            # and trained on: spend the ledger would never see. Expire it with the round.
            message.metadata.ttl = self.config.round_timeout_s
        ids = list(self.grid.push_messages(messages))
        dst = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
        pending = set(i for i in ids if i)
        got: dict[str, Message] = {}
        deadline = time.monotonic() + self.config.round_timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    got[mid] = reply
                    self._log_reply(phase, rnd, dst[mid], reply, done=len(got), total=len(ids))
            if pending:
                time.sleep(0.1)
        if pending:
            log.warning("round %d %s: %d node(s) did not reply within %.0f s", rnd, phase, len(pending),
                        self.config.round_timeout_s)
        return [(dst[mid], got.get(mid)) for mid in ids]

    def _log_reply(self, phase: str, rnd: int, node_id: int, reply: Message, *, done: int, total: int) -> None:
        who = self.node_merchant.get(node_id, f"node {node_id}")
        if reply.has_error():
            log.warning("round %d %s [%d/%d] %s failed: %s", rnd, phase, done, total, who,
                        short_reason(reply.error.reason or ""))
            return
        merchant = reply.content.config_records.get(MERCHANT)
        if merchant is not None and MERCHANT_ID in merchant:
            self.node_merchant[node_id] = who = str(merchant[MERCHANT_ID])
        privacy = reply.content.config_records.get(PRIVACY)
        if privacy is not None:
            who = str(privacy.get("merchant-id", who))
            log.info("round %d %s [%d/%d] %s: %s, ε %.3f / %.3f", rnd, phase, done, total, who,
                     privacy.get("status"), float(privacy.get("epsilon", 0.0)),  # type: ignore[arg-type]
                     float(privacy.get("epsilon-budget", 0.0)))  # type: ignore[arg-type]
        else:
            log.info("round %d %s [%d/%d] %s done", rnd, phase, done, total, who)


def _count_timings(report: RoundReport, metrics: Mapping[str, float]) -> None:
    """An accepted merchant's timings in the round's report. They come only from merchants that
    report them (report-timings): 0 otherwise."""
    report.slowest_train_s = max(report.slowest_train_s, metrics.get(DURATION_S, 0.0))
    report.slowest_client_s = max(report.slowest_client_s, metrics.get(CLIENT_S, 0.0))
    report.total_client_s += metrics.get(CLIENT_S, 0.0)


def short_reason(reason: str) -> str:
    """The client's own exception message out of a Flower/Ray error string (which wraps it
    in tracebacks and terminal colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    return " ".join(text.split())[:300]


