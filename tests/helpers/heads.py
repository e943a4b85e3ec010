"""Heads on the tiny encoder's cached states: the records and run config the heads tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.sources import adapters
from shared import atomic
from shared.config import RunConfig
from tests.helpers.examples import product_examples

TRAIN = product_examples(256, seed=0)


def heads_config(**changes: Any) -> RunConfig:
    """trainable = heads on the tiny encoder, unit-length states, 2 epochs of batches of 64."""
    base: dict[str, Any] = dict(encoder="tiny", trainable="heads", batch_size=64, local_epochs=2.0,
                                max_local_steps=0, dropout=0.0, max_seq_len=16, dp=False, pooling="mean-l2")
    base.update(changes)
    return RunConfig(**base)


def write_public_corpus(source: str, path: Path) -> Path:
    """A bundled dataset's public-corpus texts (``adapters.public_corpus_pairs``) as a corpus
    file, ``context<TAB>product`` per line (or the product alone), as a user would write one."""
    pairs = adapters.public_corpus_pairs(source)
    atomic.write_text(path, "".join(f"{c}\t{p}\n" if c else f"{p}\n" for c, p in pairs))
    return path
