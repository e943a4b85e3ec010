"""``fedshop simulate --set strategy=fedprox --set proximal-mu=X``: the merchants train by the μ
Flower's FedProx sends, end to end (Ray simulation in a subprocess, tiny encoder, two
merchants, one non-private round).

The FedAvg arm it is compared with is the same round computed here, in this process: each
merchant's own ``Merchant.train`` from the same initial model, without μ, averaged by examples
as FedAvg does. (A second simulation for it would only add a Ray start-up: FedAvg runs end to
end in every other simulation test.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.merchant import Merchant, resolve_node
from server import checkpoint as ckpt
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, get_trainable
from shared.wire import NUM_EXAMPLES
from tests.helpers.federation import FAST, simulate, write_scenario
from tests.helpers.merchants import write_merchants

pytestmark = pytest.mark.slow


def fedavg_round(config: RunConfig, start: dict[str, np.ndarray], merchants: int) -> dict[str, np.ndarray]:
    """One FedAvg round of the simulation's merchants (partition ids 0..merchants-1), without μ."""
    updates = []
    for pid in range(merchants):
        merchant = Merchant(resolve_node({"partition-id": pid}, config), config)
        reply = merchant.train(start, server_round=1, model_version=0, proximal_mu=0.0)
        assert reply.params is not None, reply.facts
        updates.append((reply.metrics[NUM_EXAMPLES], reply.params))
    total = sum(n for n, _ in updates)
    return {k: sum(n * params[k] for n, params in updates) / total for k in start}


def test_fedprox_keeps_the_global_model_nearer_where_it_started(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_merchants(data, ["shop-a", "shop-b"])
    settings = {**FAST, "data-dir": str(data), "num-server-rounds": 1, "merchants-per-round": 2, "dp": False,
                "max-local-steps": 4, "head-learning-rate": 0.05}
    scenario = write_scenario(tmp_path / "scenario.toml", settings)
    start = dict(get_trainable(build_model(ModelSpec.from_config(RunConfig.from_mapping(settings)))))

    result = simulate(scenario, tmp_path / "fedprox", log_dir=tmp_path / "log-fedprox",
                      sets={"strategy": "fedprox", "proximal-mu": 1.0})
    assert result.returncode == 0, result.describe()
    checkpoint = ckpt.load_latest(tmp_path / "fedprox")
    assert checkpoint is not None and checkpoint.round == 1
    assert sorted(checkpoint.parameters) == sorted(start)

    fedavg = fedavg_round(RunConfig.from_mapping({**settings, "run-dir": str(tmp_path / "fedavg")}), start, 2)
    moved = {name: float(np.sqrt(sum(((params[k] - start[k]) ** 2).sum() for k in start)))
             for name, params in (("fedavg", fedavg), ("fedprox", checkpoint.parameters))}
    assert 0 < moved["fedprox"] < 0.75 * moved["fedavg"], moved
