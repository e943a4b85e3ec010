"""``fedshop simulate --set strategy=fedprox --set proximal-mu=X``: the merchants train by the μ
Flower's FedProx sends, end to end (Ray simulation in a subprocess, tiny encoder, two
merchants, one non-private round each way: the two runs differ only by μ)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server import checkpoint as ckpt
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, get_trainable
from tests.helpers.federation import FAST, simulate, write_scenario
from tests.helpers.merchants import write_merchants

pytestmark = pytest.mark.slow


def test_fedprox_keeps_the_global_model_nearer_where_it_started(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_merchants(data, ["shop-a", "shop-b"])
    settings = {**FAST, "data-dir": str(data), "num-server-rounds": 1, "merchants-per-round": 2, "dp": False,
                "max-local-steps": 4, "head-learning-rate": 0.05}
    scenario = write_scenario(tmp_path / "scenario.toml", settings)
    start = dict(get_trainable(build_model(ModelSpec.from_config(RunConfig.from_mapping(settings)))))
    moved = {}
    for name, sets in (("fedavg", {}), ("fedprox", {"strategy": "fedprox", "proximal-mu": 1.0})):
        result = simulate(scenario, tmp_path / name, log_dir=tmp_path / f"log-{name}", sets=sets)
        assert result.returncode == 0, result.describe()
        checkpoint = ckpt.load_latest(tmp_path / name)
        assert checkpoint is not None and checkpoint.round == 1
        assert sorted(checkpoint.parameters) == sorted(start)
        moved[name] = float(np.sqrt(sum(((checkpoint.parameters[k] - start[k]) ** 2).sum() for k in start)))
    assert 0 < moved["fedprox"] < 0.75 * moved["fedavg"], moved
