"""``fedshop simulate --set aggregation=secagg+``: a round of Flower's SecAgg+ protocol through
the Flower simulation engine (Ray, in a subprocess), three merchants, tiny encoder.

The round is non-private so that its result can be checked exactly: each merchant's own
``Merchant.train`` from the same initial model, computed here, gives the updates, and the
global model after the masked round must be the initial one plus their plain mean, to within
the protocol's quantisation. (What the protocol hides, dropouts and cheating are in
tests/server/test_secure_aggregation.py, in-process.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.merchant import Merchant, resolve_node
from server import checkpoint as ckpt
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, get_trainable
from tests.helpers.federation import FAST, ledger_rows, metrics_rows, simulate, write_scenario
from tests.helpers.merchants import write_merchants

pytestmark = pytest.mark.slow

MERCHANTS = ["shop-a", "shop-b", "shop-c"]
RANGE, LEVELS = 8.0, 2 ** 22


def test_a_secagg_round_moves_the_model_by_the_plain_mean_of_the_updates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_merchants(data, MERCHANTS)
    settings = {**FAST, "data-dir": str(data), "num-server-rounds": 1, "merchants-per-round": 3, "dp": False,
                "trainable": "heads", "secagg-clipping-range": RANGE, "secagg-quantization-range": LEVELS}
    scenario = write_scenario(tmp_path / "scenario.toml", settings)
    config = RunConfig.from_mapping({**settings, "aggregation": "secagg+", "run-dir": str(tmp_path / "here")})
    start = dict(get_trainable(build_model(ModelSpec.from_config(config))))

    # The README's command: `fedshop simulate ... --set aggregation=secagg+`.
    result = simulate(scenario, tmp_path / "run", log_dir=tmp_path / "log", sets={"aggregation": "secagg+"})
    assert result.returncode == 0, result.describe()
    checkpoint = ckpt.load_latest(tmp_path / "run")
    assert checkpoint is not None and checkpoint.round == 1

    updates = []
    for pid in range(len(MERCHANTS)):
        reply = Merchant(resolve_node({"partition-id": pid}, config), config).train(
            start, server_round=1, model_version=0)
        assert reply.params is not None, reply.facts
        updates.append({k: reply.params[k].astype(np.float64) - start[k] for k in start})
    step = 2 * RANGE / LEVELS
    for k, v in start.items():
        mean = np.mean([u[k] for u in updates], axis=0)
        assert np.max(np.abs(mean)) > 100 * step  # the round moved the model: the check below can fail
        assert np.max(np.abs(checkpoint.parameters[k] - (v + mean))) <= 2 * step + 1e-6, k

    rows = ledger_rows(tmp_path / "run")
    assert sorted((r.merchant_id, r.status) for r in rows) == [(m, "accepted") for m in MERCHANTS]
    (row,) = metrics_rows(tmp_path / "run")
    model_bytes = sum(v.nbytes for v in start.values())
    # What arrived: three masked vectors of int64 coordinates (and their weight), not the float32 updates.
    assert row["bytes_received"] > 3 * model_bytes
