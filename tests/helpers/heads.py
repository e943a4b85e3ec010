"""Heads on the tiny encoder's cached states: the records and run config the heads tests share."""

from __future__ import annotations

from typing import Any

from shared.config import RunConfig
from tests.helpers.examples import product_examples

TRAIN = product_examples(256, seed=0)


def heads_config(**changes: Any) -> RunConfig:
    """trainable = heads on the tiny encoder, unit-length states, 2 epochs of batches of 64."""
    base: dict[str, Any] = dict(encoder="tiny", trainable="heads", batch_size=64, local_epochs=2.0,
                                max_local_steps=0, dropout=0.0, max_seq_len=16, dp=False, pooling="mean-l2")
    base.update(changes)
    return RunConfig(**base)
