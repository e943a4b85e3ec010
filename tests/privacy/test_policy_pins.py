"""The merchant owns the settings that decide its privacy (issue "Privacy end to end", finding 4).

Before ``client.policy``, ``dp`` was a run-config key the node obeyed: a server could ask a
deployed merchant for non-private training and get it. Now a node whose config pins
``dp = true`` (what ``fedshop deploy add-merchant`` writes) refuses such a run: it trains
nothing, spends nothing, and its refusal, with the reason, is what the server's ledger records.
These tests drive the real ClientApp with Flower messages, as a SuperNode would.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import client.app as client_app
from server.audit import read_rows
from server.ledger import PrivacyLedger
from server.ledger_record import spend_record
from shared.model import ModelSpec, build_model, get_trainable
from shared.privacy.budget import PrivacyState
from shared.run_files import LEDGER_FILE
from shared.wire import STATUS_OK, STATUS_REFUSED, TrainReply
from tests.client.test_app import CONFIG_, NODE_ID, make_message  # noqa: I001  (the ClientApp tests' fixtures)
from tests.helpers.merchants import write_merchant


@pytest.fixture(scope="module")
def global_params() -> dict[str, np.ndarray]:
    return dict(get_trainable(build_model(ModelSpec.from_config(CONFIG_))))


def node(tmp_path: Path, run_config: dict[str, object], **pinned: object) -> tuple[Context, Path]:
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1)
    state = tmp_path / "state" / "privacy-state.json"
    PrivacyState.create(state, merchant_id="shop-a", target_epsilon=8.0, target_delta=1e-5)
    node_config = {"data-dir": str(merchant_dir), "merchant-id": "shop-a", "state-dir": str(state.parent),
                   **{k: str(v) for k, v in pinned.items()}}
    return Context(run_id=1, node_id=NODE_ID, node_config=node_config, state=RecordDict(),
                   run_config=run_config), state


def train(context: Context, params: dict[str, np.ndarray]) -> TrainReply:
    reply = client_app.app(make_message("train", params), context)
    assert not reply.has_error()
    return TrainReply.from_recorddict(reply.content)


def test_a_node_pinning_dp_refuses_a_non_private_run_and_the_ledger_shows_it(
        tmp_path: Path, global_params: dict[str, np.ndarray]) -> None:
    asked = dataclasses.replace(CONFIG_, dp=False).to_mapping()
    context, state = node(tmp_path, asked, dp="true")
    reply = train(context, global_params)
    assert reply.facts.status == STATUS_REFUSED and reply.params is None
    assert "pins dp = true" in reply.facts.reason
    assert json.loads(state.read_text())["entries"] == []  # nothing trained, nothing spent

    # What the server writes for that reply: a refused row with the merchant's reason.
    with PrivacyLedger(tmp_path / "run" / LEDGER_FILE) as ledger:
        ledger.set_meta("run_id", "run-1")
        ledger.record_round([spend_record(reply.facts, run_id="run-1", round=1, node_id=NODE_ID,
                                          status="refused", reason=reply.facts.reason)])
    rows = read_rows(tmp_path / "run" / LEDGER_FILE)
    assert [(r.merchant_id, r.round, r.status, r.event.mechanism.steps) for r in rows] == [("shop-a", 1, "refused", 0)]
    with PrivacyLedger(tmp_path / "run" / LEDGER_FILE) as ledger:
        assert "pins dp = true" in ledger.rows()[0].reason


def test_without_the_pin_the_same_request_trains_non_privately(
        tmp_path: Path, global_params: dict[str, np.ndarray]) -> None:
    """The control: the refusal above comes from the pin, not from the request being malformed."""
    context, _ = node(tmp_path, dataclasses.replace(CONFIG_, dp=False).to_mapping())
    reply = train(context, global_params)
    assert reply.facts.status == STATUS_OK and reply.params is not None and not reply.facts.dp


def test_a_noise_floor_refuses_less_noise(tmp_path: Path, global_params: dict[str, np.ndarray]) -> None:
    context, state = node(tmp_path, dataclasses.replace(CONFIG_, noise_multiplier=0.5).to_mapping(),
                          **{"noise-multiplier": 0.9})
    reply = train(context, global_params)
    assert reply.facts.status == STATUS_REFUSED and "noise floor" in reply.facts.reason
    assert json.loads(state.read_text())["entries"] == []


def test_the_merchants_own_split_and_clipping_replace_the_runs(
        tmp_path: Path, global_params: dict[str, np.ndarray]) -> None:
    asked = dataclasses.replace(CONFIG_, max_grad_norm=5.0, test_fraction=0.9).to_mapping()
    context, state = node(tmp_path, asked, **{"max-grad-norm": 0.5, "test-fraction": 0.25})
    reply = train(context, global_params)
    assert reply.facts.status == STATUS_OK
    assert reply.facts.event.mechanism.max_grad_norm == 0.5  # the merchant's C, not the run's 5.0
    spent = json.loads(state.read_text())["entries"]
    assert len(spent) == 1 and spent[0]["event"]["max_grad_norm"] == 0.5


def test_a_delta_too_large_for_the_merchants_units_is_refused(
        tmp_path: Path, global_params: dict[str, np.ndarray]) -> None:
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1)
    state = tmp_path / "state" / "privacy-state.json"
    PrivacyState.create(state, merchant_id="shop-a", target_epsilon=8.0, target_delta=0.05)
    context = Context(run_id=1, node_id=NODE_ID, node_config={
        "data-dir": str(merchant_dir), "merchant-id": "shop-a", "state-dir": str(state.parent),
        "target-delta": "0.05"}, state=RecordDict(), run_config=CONFIG_.to_mapping())
    reply = train(context, global_params)
    assert reply.facts.status == STATUS_REFUSED and "too large for" in reply.facts.reason
    assert json.loads(state.read_text())["entries"] == []
