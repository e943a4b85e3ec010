"""client.app: the ClientApp's handlers, driven by real Flower Messages and Contexts.

No simulation and no mocks: each test builds the Message a SuperLink would deliver (with
its metadata) and the Context a deployed SuperNode would pass (node config naming the
merchant's own data folder and state folder), calls the ClientApp, and reads the reply
back with ``shared.wire``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

import client.app as client_app
from server.audit import read_rows
from server.ledger import PrivacyLedger
from server.ledger_record import spend_record
from shared.config import RunConfig
from shared.eval_sums import layout
from shared.metrics import SUM_NOISE_SD, released_sum_key
from shared.model import ModelError, ModelSpec, build_model, get_trainable
from shared.privacy.accounting import epsilon
from shared.privacy.budget import PrivacyState
from shared.privacy.events import NOISE_SOURCE, MechanismEvent, SpendEvent
from shared.run_files import LEDGER_FILE
from shared.wire import (
    ARRAYS,
    CONFIG,
    EVAL_LOSS,
    MERCHANT,
    MERCHANT_ID,
    METRICS,
    MODEL_VERSION,
    NUM_EXAMPLES,
    PRIVACY,
    SERVER_ROUND,
    STATUS_OK,
    STATUS_REFUSED,
    TIMING_METRIC_KEYS,
    TRAIN_METRIC_KEYS,
    EvalReply,
    PrivacyFacts,
    TrainReply,
    WireError,
    params_to_record,
    record_to_params,
)
from tests.helpers.merchants import write_merchant

CONFIG_ = RunConfig(encoder="tiny", max_local_steps=3, batch_size=16, max_seq_len=32, eval_max_examples=32,
                    noise_multiplier=2.0, target_epsilon=8.0)
NODE_ID = 7


@pytest.fixture(scope="module")
def global_params() -> dict[str, np.ndarray]:
    return dict(get_trainable(build_model(ModelSpec.from_config(CONFIG_))))


@pytest.fixture
def merchant_dir(tmp_path: Path) -> Path:
    return write_merchant(tmp_path / "data", "shop-a", seed=1)


def make_context(merchant_dir: Path, state_dir: Path, **node: Any) -> Context:
    # A deployed node trains only on a privacy state created explicitly (what `fedshop deploy
    # add-merchant` does); finding none, it refuses rather than start from zero.
    PrivacyState.create(state_dir / "privacy-state.json", merchant_id="shop-a", target_epsilon=CONFIG_.target_epsilon,
                        target_delta=CONFIG_.target_delta)
    node_config = {"data-dir": str(merchant_dir), "merchant-id": "shop-a", "state-dir": str(state_dir),
                   **node}
    return Context(run_id=1, node_id=NODE_ID, node_config=node_config, state=RecordDict(),
                   run_config=CONFIG_.to_mapping())


def make_message(message_type: str, params: dict[str, np.ndarray], *, server_round: int = 1,
                 model_version: int = 0) -> Message:
    """An instruction as the SuperLink delivers it: content plus metadata with a message id."""
    content = RecordDict({ARRAYS: params_to_record(params),
                          CONFIG: ConfigRecord({SERVER_ROUND: server_round, MODEL_VERSION: model_version})})
    metadata = Metadata(run_id=1, message_id=f"msg-{message_type}-{server_round}", src_node_id=0,
                        dst_node_id=NODE_ID, reply_to_message_id="", group_id=str(server_round),
                        created_at=time.time(), ttl=3600.0, message_type=message_type)
    # ``metadata=`` is how Flower itself builds a delivered message (the id set by the SuperLink).
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]


def state_events(state_dir: Path) -> list[MechanismEvent]:
    raw = json.loads((state_dir / "privacy-state.json").read_text())
    return [MechanismEvent.from_dict(e["event"]) for e in raw["entries"]]


def test_train_replies_with_trainable_arrays_metrics_and_privacy_facts(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray]
) -> None:
    state_dir = tmp_path / "state"
    context = make_context(merchant_dir, state_dir)
    msg = make_message("train", global_params, server_round=1, model_version=0)

    reply = client_app.app(msg, context)  # through the ClientApp's message-type dispatch

    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.message_type == "train"
    assert reply.metadata.dst_node_id == 0 and reply.metadata.src_node_id == NODE_ID
    content = reply.content
    # Exactly one ArrayRecord, one MetricRecord, one ConfigRecord of privacy facts.
    assert set(content.array_records) == {ARRAYS}
    assert set(content.metric_records) == {METRICS}
    assert set(content.config_records) == {PRIVACY}
    # One packed array (shared.wire), laid out as the global model was sent.
    assert len(content.array_records[ARRAYS]) == 1
    assert list(record_to_params(content.array_records[ARRAYS])) == list(global_params)
    assert set(content.metric_records[METRICS]) == set(TRAIN_METRIC_KEYS)
    assert not set(TIMING_METRIC_KEYS) & set(content.metric_records[METRICS])  # report-timings is off by default

    parsed = TrainReply.from_recorddict(content)
    assert parsed.params is not None
    for name, value in parsed.params.items():
        assert value.shape == global_params[name].shape and value.dtype == global_params[name].dtype
        assert np.all(np.isfinite(value))
    changed = [k for k in global_params if not np.array_equal(parsed.params[k], global_params[k])]
    assert changed, "nothing trained"
    assert parsed.metrics["num-examples"] > 0
    # One epoch at q = 1/ceil(N/16), capped at max-local-steps; N counts units (privacy-unit = user:
    # the fixture's 12 users and its queries), so fewer steps than the 3 its ~60 records took.
    assert parsed.metrics["steps"] == min(3, math.ceil(parsed.facts.event.unit_count / 16))
    assert not any("loss" in key for key in content.metric_records[METRICS])  # docs/privacy.md

    facts = parsed.facts
    assert facts.status == STATUS_OK and facts.reason == ""
    assert facts.merchant_id == "shop-a"
    mechanism = facts.event.mechanism
    assert facts.dp and mechanism.steps == parsed.metrics["steps"] and facts.model_version == 0
    assert mechanism.noise_multiplier == 2.0 and mechanism.max_grad_norm == 1.0 and facts.event.delta == 1e-5
    assert facts.event.neighbours == "replace-one" and content.config_records[PRIVACY]["neighbours"] == "replace-one"
    assert facts.event.noise == NOISE_SOURCE and content.config_records[PRIVACY]["noise"] == NOISE_SOURCE
    assert 0 < mechanism.sample_rate <= 1
    assert 0 < facts.epsilon <= facts.epsilon_budget == 8.0
    # The reported ε is the merchant's persisted accountant, recomputable from its events.
    events = state_events(state_dir)
    assert events == [MechanismEvent(noise_multiplier=2.0, sample_rate=mechanism.sample_rate, steps=mechanism.steps,
                                     max_grad_norm=1.0)]
    assert facts.epsilon == pytest.approx(epsilon(events, facts.event.delta), rel=1e-9)

    # A second call composes with the first (one accountant across calls, never per round).
    second = TrainReply.from_recorddict(client_app.train(make_message("train", parsed.params, server_round=2,
                                                                      model_version=1), context).content)
    assert second.facts.status == STATUS_OK and second.facts.model_version == 1
    assert second.facts.epsilon > facts.epsilon
    assert second.facts.epsilon == pytest.approx(epsilon(state_events(state_dir), facts.event.delta),
                                                 rel=1e-9)
    rounds = [e["round"] for e in json.loads((state_dir / "privacy-state.json").read_text())["entries"]]
    assert rounds == [1, 2]


def test_budget_refusal_is_a_typed_reply_and_spends_nothing(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray]
) -> None:
    state_dir = tmp_path / "state"
    # The merchant's own budget (node config) is far below the run's 8.0: the smaller one wins.
    context = make_context(merchant_dir, state_dir, **{"target-epsilon": 0.01})
    msg = make_message("train", global_params, server_round=3, model_version=2)

    reply = client_app.app(msg, context)

    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert ARRAYS not in reply.content.array_records
    assert METRICS not in reply.content.metric_records
    parsed = TrainReply.from_recorddict(reply.content)
    assert parsed.params is None and parsed.metrics == {}
    facts = parsed.facts
    assert facts.status == STATUS_REFUSED
    assert facts.event.mechanism.steps == 0 and facts.epsilon == 0.0
    assert facts.epsilon_budget == 0.01
    assert facts.model_version == 2
    assert "budget" in facts.reason and "shop-a" in facts.reason
    assert facts.event.noise == ""  # no noise was drawn
    # Nothing spent: no state entry was written.
    path = state_dir / "privacy-state.json"
    assert not path.exists() or json.loads(path.read_text())["entries"] == []


def test_evaluate_replies_with_noised_metrics_and_accounts_them(tmp_path: Path,
                                                                global_params: dict[str, np.ndarray]) -> None:
    # Every metric must stay defined under the noise: the merchant's own node config lowers the
    # minimum of held-out units and picks a small σ_eval (under a large budget). The unit is the
    # user, so this merchant has 240 of them (~46 held out, 64 at most evaluated): its noiseless
    # totals are ctr positives 2.7, ratings 2.7, informative queries 0.3. At σ_eval = 0.05 the
    # histogram's estimability floor (shared.eval_sums.ESTIMABLE_SDS: 3 · 0.05 · √20 = 0.67) is 9
    # noise sds below the positives and the queries' count 6 above 0. A smaller σ costs the
    # accountant more than the test (PLD at σ 0.02: ε ≈ 5,400, 11 s per ε; at 0.05 2 s).
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1, interactions=240, users=240, judgments=48)
    PrivacyState.create(tmp_path / "state" / "privacy-state.json", merchant_id="shop-a", target_epsilon=1e7,
                        target_delta=CONFIG_.target_delta)
    context = make_context(merchant_dir, tmp_path / "state", **{"eval-min-units": 1, "eval-noise-multiplier": 0.05})
    config = CONFIG_.replace(target_epsilon=1e7, eval_max_examples=64)
    context.run_config = config.to_mapping()
    msg = make_message("evaluate", global_params)

    reply = client_app.app(msg, context)

    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.message_type == "evaluate"
    parsed = EvalReply.from_recorddict(reply.content)
    metrics = parsed.metrics
    assert 0 < metrics[NUM_EXAMPLES] <= config.eval_max_examples  # held-out units (declared public)
    assert math.isfinite(metrics[EVAL_LOSS])
    # Metrics from noised sums; one the noise leaves undefined (a histogram all ≤ 0) is left out.
    figures = {
        EVAL_LOSS, "ctr_auc", "ctr_logloss", "ctr_precision", "ctr_recall", "ctr_f1", "rating_rmse",
        "rating_mae", "relevance_rmse", "relevance_ndcg@10", "relevance_mrr", "relevance_recall@10",
        # the constant predictors' scores, AP and the threshold P/R/F1 are taken at: the same noised sums
        "ctr_ap", "ctr_threshold", "ctr_logloss_baseline", "rating_rmse_baseline", "relevance_rmse_baseline",
        "relevance_ndcg@10_baseline", "relevance_mrr_baseline"}
    # ... each with its noise scale (``<key>_sd``: post-processing of the same sums and σ_eval),
    # the public count without one; and the noised sums themselves (the DP release, which the
    # server pools), every coordinate of the run's layout, with their public noise sd σ_eval·C_eval.
    sums = {released_sum_key(n) for n in layout(CONFIG_.task_names)} | {SUM_NOISE_SD}
    assert sums <= set(metrics) and metrics[SUM_NOISE_SD] == pytest.approx(0.05)
    assert {"ctr_auc", "rating_rmse", "relevance_ndcg@10", f"{EVAL_LOSS}_sd"} <= set(metrics) - sums <= {
        NUM_EXAMPLES, *figures, *(f"{k}_sd" for k in figures)}
    assert all(k.removesuffix("_sd") in metrics and metrics[k] >= 0 for k in metrics if k.endswith("_sd"))
    assert f"{NUM_EXAMPLES}_sd" not in metrics
    assert parsed.merchant_id == reply.content.config_records[MERCHANT][MERCHANT_ID] == "shop-a"
    assert ARRAYS not in reply.content.array_records  # evaluation sends no parameters back
    # The release is accounted: its own spend, in the merchant's state and in the reply's facts.
    assert parsed.facts is not None and parsed.facts.status == STATUS_OK
    event = parsed.facts.event
    assert (event.release, event.mechanism.sample_rate, event.mechanism.steps) == ("evaluation", 1.0, 1)
    assert event.mechanism.noise_multiplier == 0.05  # the merchant's own (node config), not the run's
    assert event.unit_count == metrics[NUM_EXAMPLES]
    entries = json.loads((tmp_path / "state" / "privacy-state.json").read_text())["entries"]
    assert [e["event"]["release"] for e in entries] == ["evaluation"]

    # The decorated function is the handler itself: it releases (and spends) again, with fresh noise.
    direct = EvalReply.from_recorddict(client_app.evaluate(msg, context).content)
    assert direct.metrics[NUM_EXAMPLES] == metrics[NUM_EXAMPLES] and direct.metrics[EVAL_LOSS] != metrics[EVAL_LOSS]
    assert direct.facts is not None and direct.facts.epsilon > parsed.facts.epsilon


def test_train_with_foreign_parameters_fails_before_spending(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "state"
    wrong = dict(global_params)
    wrong["not-a-parameter"] = np.zeros(3, dtype=np.float32)
    public = "ModelError in the train call of merchant 'shop-a'"
    with caplog.at_level(logging.ERROR, logger="client.app"), \
            pytest.raises(client_app.MerchantCallError, match=public) as info:
        client_app.train(make_message("train", wrong), make_context(merchant_dir, state_dir))
    assert "not-a-parameter" not in str(info.value)  # the text stays with the merchant ...
    (record,) = [r for r in caplog.records if r.name == "client.app"]
    assert "not-a-parameter" in record.getMessage() and record.exc_info is not None  # ... in its log
    assert isinstance(record.exc_info[1], ModelError)
    assert json.loads((state_dir / "privacy-state.json").read_text())["entries"] == []


def test_invalid_data_reaches_the_server_as_where_not_what(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """A data-validation error quotes the offending value; the error the ClientApp raises (whose
    text Flower sends to the server) names the class and the merchant only, not even where the
    data is invalid. The value, and the whole error with its traceback, are in the merchant's own log."""
    catalog = merchant_dir / "catalog.csv"
    lines = catalog.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",SECRET-4711"  # row 3's price
    catalog.write_text("\n".join(lines) + "\n")
    state_dir = tmp_path / "state"
    with caplog.at_level(logging.ERROR, logger="client.app"), \
            pytest.raises(client_app.MerchantCallError) as info:
        client_app.train(make_message("train", global_params), make_context(merchant_dir, state_dir))
    public = str(info.value)
    assert public.startswith("DataValidationError in the train call of merchant 'shop-a'"), public
    assert "merchant's own log" in public and "price" not in public and "row 3" not in public
    assert "SECRET" not in public and str(merchant_dir) not in public
    # What a SuperNode would send (flwr.supernode.runtime.run_clientapp builds the reason so).
    reason = str(type(info.value)) + ":<'" + str(info.value) + "'>"
    assert "SECRET" not in reason and info.value.__cause__ is None and info.value.__suppress_context__
    (record,) = [r for r in caplog.records if r.name == "client.app"]
    assert "SECRET-4711" in record.getMessage() and record.exc_info is not None
    assert json.loads((state_dir / "privacy-state.json").read_text())["entries"] == []


def test_an_evaluate_failure_is_sanitised_too(merchant_dir: Path, tmp_path: Path,
                                               global_params: dict[str, np.ndarray]) -> None:
    (merchant_dir / "interactions.csv").write_text("user_id,product_id,label\nu1,p1,SECRET-LABEL\n")
    public = "DataValidationError in the evaluate call of merchant 'shop-a'"
    with pytest.raises(client_app.MerchantCallError, match=public) as info:
        client_app.evaluate(make_message("evaluate", global_params), make_context(merchant_dir, tmp_path / "state"))
    assert str(info.value).startswith("DataValidationError in the evaluate call of merchant 'shop-a'")
    assert "SECRET" not in str(info.value) and "label" not in str(info.value)


def test_without_a_merchant_id_the_failure_names_the_node() -> None:
    context = Context(run_id=1, node_id=NODE_ID, node_config={}, state=RecordDict(), run_config={})
    assert client_app._merchant_id(context) == f"node {NODE_ID}"


@pytest.mark.parametrize(("node", "asks", "reported"), [
    ({"report-timings": True}, False, True),  # the merchant's own true: sent whatever the run asks
    ({"report-timings": False}, True, False),  # its false wins over a run asking: none sent, no refusal
    ({}, True, False),  # a deployed node that says nothing sends none
    (None, True, True),  # simulation: the run config decides
])
def test_timings_leave_only_by_the_merchants_choice(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray],
    node: dict[str, Any] | None, asks: bool, reported: bool,
) -> None:
    config = CONFIG_.replace(report_timings=asks)
    if node is None:  # a simulated node: partition 0 of the run's data-dir
        config = config.replace(data_dir=str(merchant_dir.parent), run_dir=str(tmp_path / "run"))
        context = Context(run_id=1, node_id=NODE_ID, node_config={"partition-id": 0, "num-partitions": 1},
                          state=RecordDict(), run_config=config.to_mapping())
    else:
        context = make_context(merchant_dir, tmp_path / "state", **node)
        context.run_config = config.to_mapping()
    reply = client_app.app(make_message("train", global_params), context)
    parsed = TrainReply.from_recorddict(reply.content)
    assert parsed.facts.status == STATUS_OK
    metrics = reply.content.metric_records[METRICS]
    if reported:
        assert set(metrics) == {*TRAIN_METRIC_KEYS, *TIMING_METRIC_KEYS}
        assert 0 < parsed.metrics["duration-s"] <= parsed.metrics["client-s"]
    else:
        assert set(metrics) == set(TRAIN_METRIC_KEYS)


def test_planned_noise_is_the_merchants_own_and_travels_in_the_facts(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray]
) -> None:
    """noise-plan-calls = 3: the merchant picks σ so three calls fit ε = 2; the facts (and so the
    server's ledger) carry that σ, and the third call still fits the budget."""
    config = CONFIG_.replace(noise_plan_calls=3, noise_multiplier=0.5, target_epsilon=2.0)
    state_dir = tmp_path / "state"
    context = make_context(merchant_dir, state_dir)
    context.run_config = config.to_mapping()
    facts = []
    for rnd in (1, 2, 3):
        reply = client_app.app(make_message("train", global_params, server_round=rnd), context)
        facts.append(TrainReply.from_recorddict(reply.content).facts)
    assert [f.status for f in facts] == [STATUS_OK] * 3
    events = state_events(state_dir)
    assert [f.event.mechanism.noise_multiplier for f in facts] == [e.noise_multiplier for e in events]
    assert all(e.noise_multiplier > 0.5 for e in events)  # the floor alone would overspend
    assert facts[-1].epsilon <= 2.0
    assert facts[-1].epsilon > 1.8  # and the plan used the budget, not a fraction of it


def test_facts_from_a_version_that_did_not_send_the_noise_source_read_as_unmarked() -> None:
    event = SpendEvent.of(MechanismEvent(noise_multiplier=1.0, sample_rate=0.1, steps=3, max_grad_norm=1.0),
                          unit_count=100, delta=1e-5, noise=NOISE_SOURCE)
    facts = PrivacyFacts(merchant_id="shop-a", status=STATUS_OK, dp=True, event=event, epsilon=0.5,
                         epsilon_budget=8.0, accountant="prv", model_version=0)
    record = facts.to_record()
    assert PrivacyFacts.from_record(record) == facts
    del record["noise"]
    assert PrivacyFacts.from_record(record) == dataclasses.replace(facts, event=dataclasses.replace(event, noise=""))
    del record["steps"]
    with pytest.raises(WireError, match="'steps'"):
        PrivacyFacts.from_record(record)


def test_one_spend_is_one_value_at_every_hop(merchant_dir: Path, tmp_path: Path,
                                             global_params: dict[str, np.ndarray],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The spend the trainer commits to the merchant's state is, unchanged, the event in the reply's
    privacy facts, in the server's ledger row read back, and in the row the audit reads."""
    committed: list[SpendEvent] = []
    real_commit = PrivacyState.commit

    def commit(self: PrivacyState, *args: Any, **kwargs: Any) -> float:
        epsilon = real_commit(self, *args, **kwargs)
        committed.append(self.entries[-1].event)
        return epsilon

    monkeypatch.setattr(PrivacyState, "commit", commit)
    state_dir = tmp_path / "state"
    reply = client_app.app(make_message("train", global_params, server_round=1), make_context(merchant_dir, state_dir))
    assert not reply.has_error()
    wire = reply.content.config_records[PRIVACY]
    facts = TrainReply.from_recorddict(reply.content).facts
    run_dir = tmp_path / "run"
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        ledger.record_round([spend_record(facts, run_id="run-1", round=1, node_id=NODE_ID, status="accepted",
                                          reason="")])
        (row,) = ledger.rows()
    (audited,) = read_rows(run_dir / LEDGER_FILE)
    persisted = PrivacyState.open(state_dir / "privacy-state.json", merchant_id="shop-a", target_epsilon=8.0,
                                  target_delta=1e-5).entries[-1].event

    (event,) = committed
    assert event == persisted == facts.event == row.event == audited.event
    # What it says: N units (the same N the metrics count; users and queries under the default
    # privacy-unit = user), q·N expected per batch, the unit and the release, δ and the noise
    # source, each under its own key on the wire.
    records = int(TrainReply.from_recorddict(reply.content).metrics["num-examples"])
    assert event.unit_count == records > 0
    assert event.expected_batch == pytest.approx(event.mechanism.sample_rate * records)
    assert (event.unit, event.release, event.delta, event.noise) == ("user", "update", 1e-5, NOISE_SOURCE)
    assert (wire["unit-count"], wire["expected-batch"], wire["unit"], wire["release"]) == (
        records, event.expected_batch, "user", "update")
    assert row.epsilon_reported == facts.epsilon and audited.epsilon_reported == facts.epsilon


def test_refused_spend_reaches_the_ledger_as_nothing_released(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray]
) -> None:
    context = make_context(merchant_dir, tmp_path / "state", **{"target-epsilon": 0.01})
    facts = TrainReply.from_recorddict(client_app.app(make_message("train", global_params), context).content).facts
    assert facts.status == STATUS_REFUSED
    assert (facts.event.mechanism.steps, facts.event.mechanism.sample_rate, facts.event.unit_count,
            facts.event.expected_batch, facts.event.noise) == (0, 0.0, 0, 0.0, "")
    with PrivacyLedger(tmp_path / LEDGER_FILE) as ledger:
        ledger.record_round([spend_record(facts, run_id="run-1", round=1, node_id=NODE_ID, status="refused",
                                          reason=facts.reason)])
        assert [r.event for r in ledger.rows()] == [facts.event]
