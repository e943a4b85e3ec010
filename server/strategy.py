"""Which Flower strategy aggregates, and which nodes it may sample.

fedshop composes Flower's strategies rather than copying them: FedAvg, FedAdam or FedProx
aggregate accepted updates unchanged. Who may be sampled is decided outside the strategy,
by handing its ``configure_*`` hooks an ``EligibleNodesGrid``: a view of the real grid
that shows only this round's sampled nodes (connected, budget not exhausted). So Flower's
own sampling never blocks waiting for nodes, and exhausted merchants are never sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from shared.config import RunConfig
from shared.wire import pack, unpack

log = logging.getLogger(__name__)


def build_strategy(config: RunConfig) -> Strategy:
    common: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    if config.strategy == "fedadam":
        return FedAdam(eta=config.server_learning_rate, **common)
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    return FedAvg(**common)


class EligibleNodesGrid:
    """A grid view whose ``get_node_ids`` lists only the nodes chosen for this round."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


# Server-side optimiser state (FedAdam's moments) must survive a resume, or the first
# resumed round would restart Adam from zero.
_STATE_ATTRS = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's moments, one array per parameter name (``<attr>/<name>``): Flower keys them
    by the ArrayRecord's keys, which for a packed model (shared.wire) is its one layout key."""
    state: dict[str, np.ndarray] = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if isinstance(value, dict):
            state.update({f"{attr}/{k}": np.asarray(v) for k, v in unpack(value).items()})
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray], order: Iterable[str]) -> None:
    """Give ``strategy`` the moments ``strategy_state`` saved, keyed as the model's parameters
    (named in ``order``, the global model's) travel: packed as ``shared.wire`` packs them."""
    names = list(order)
    for attr in _STATE_ATTRS:
        prefix = f"{attr}/"
        values = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if values and hasattr(strategy, attr):
            missing = [n for n in names if n not in values]
            if missing:
                log.warning("strategy state %r lacks parameter(s) %s; the strategy starts it afresh", attr, missing[:3])
                continue
            setattr(strategy, attr, dict(pack({n: values[n] for n in names})))
