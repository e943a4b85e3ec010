"""No raw training loss leaves a merchant (issue "Privacy end to end", finding 1).

The first DP-SGD step's loss is a deterministic function of the records sampled for it, so
an update released with its loss has no finite ε. The train reply, driven through the real
ClientApp with Flower messages, carries no loss under any key; the server's round report
and run log have no field for one. (Before the fix the reply carried ``train-loss`` and the
run log ``train_loss``: these tests failed there.)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

import client.app as client_app
from server.round_report import RoundReport
from server.run_log import RunLog
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, get_trainable
from shared.privacy.budget import PrivacyState
from shared.wire import ARRAYS, CONFIG, METRICS, PRIVACY, SERVER_ROUND, TRAIN_METRIC_KEYS, TrainReply, params_to_record
from tests.helpers.merchants import write_merchant

CONFIG_ = RunConfig(encoder="tiny", max_local_steps=2, batch_size=16, max_seq_len=32, eval_max_examples=32,
                    noise_multiplier=2.0, target_epsilon=8.0)


def _train_reply(tmp_path: Path) -> Message:
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1)
    state_dir = tmp_path / "state"
    PrivacyState.create(state_dir / "privacy-state.json", merchant_id="shop-a", target_epsilon=8.0,
                        target_delta=CONFIG_.target_delta)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=CONFIG_.to_mapping(),
                      node_config={"data-dir": str(merchant_dir), "merchant-id": "shop-a",
                                   "state-dir": str(state_dir)})
    params = dict(get_trainable(build_model(ModelSpec.from_config(CONFIG_))))
    metadata = Metadata(run_id=1, message_id="msg-train-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    content = RecordDict({ARRAYS: params_to_record(params), CONFIG: ConfigRecord({SERVER_ROUND: 1})})
    return client_app.app(Message(content=content, metadata=metadata), context)  # type: ignore[call-overload]


def test_the_train_reply_carries_no_loss(tmp_path: Path) -> None:
    reply = _train_reply(tmp_path)
    assert not reply.has_error()
    content = reply.content
    metrics = content.metric_records[METRICS]
    assert set(metrics) == set(TRAIN_METRIC_KEYS)
    assert not any("loss" in key for key in TRAIN_METRIC_KEYS)
    # Under no key of any record: the metrics, the privacy facts.
    keys = [*content.metric_records[METRICS].keys(), *content.config_records[PRIVACY].keys()]
    assert not any("loss" in key for key in keys), keys
    assert set(content.config_records) == {PRIVACY}
    parsed = TrainReply.from_recorddict(content)
    assert parsed.params is not None and parsed.metrics[TRAIN_METRIC_KEYS[0]] > 0
    assert all(np.isfinite(v).all() for v in parsed.params.values())


def test_the_server_keeps_no_training_loss(tmp_path: Path) -> None:
    assert not any("loss" in f.name for f in dataclasses.fields(RoundReport))
    log = RunLog(tmp_path)
    log.append(RoundReport(round=1, accepted=["shop-a"], aggregated=True))
    (row,) = log.rows()
    assert not any("loss" in key for key in row)
