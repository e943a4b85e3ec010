"""client.node_cache: a worker reuses a merchant's split and its frozen encoder between calls,
and sees a changed file or a different trainable set at once."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client import features, node_cache
from client.merchant import Merchant, resolve_node
from shared.model import ModelSpec, build_model, get_trainable
from tests.helpers.heads import heads_config
from tests.helpers.merchants import write_merchants


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    node_cache.clear()
    yield
    node_cache.clear()


def merchant(root: Path, **changes: object) -> Merchant:
    config = heads_config(data_dir=str(root), run_dir=str(root.parent / "run"), **changes)
    return Merchant(resolve_node({"partition-id": 0}, config), config)


def test_a_merchants_split_is_reused_until_one_of_its_files_changes(tmp_path: Path) -> None:
    (folder,) = write_merchants(tmp_path / "data", ["acme"])
    first = merchant(tmp_path / "data").split()
    assert merchant(tmp_path / "data").split() is first  # a new call of the same worker

    (folder / ".fedshop").mkdir()
    (folder / ".fedshop" / "privacy-state.json").write_text("{}")  # the node's own state: not data
    assert merchant(tmp_path / "data").split() is first

    path = folder / "interactions.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    rows = rows[:1] + rows[1:-1]  # one row fewer: a smaller held-out or training set
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    changed = merchant(tmp_path / "data").split()
    assert changed is not first
    assert len(changed.train) + len(changed.test) < len(first.train) + len(first.test)


def test_same_size_rewrite_is_seen(tmp_path: Path) -> None:
    (folder,) = write_merchants(tmp_path / "data", ["acme"])
    first = merchant(tmp_path / "data").split()
    path = folder / "interactions.csv"
    text = path.read_text(encoding="utf-8")
    rewritten = text.replace("\nu0,", "\nu9,", 1)  # another user: same size, same instant
    assert len(rewritten) == len(text) and rewritten != text
    path.write_text(rewritten, encoding="utf-8")
    assert merchant(tmp_path / "data").split() is not first


def test_a_run_config_change_is_a_new_split(tmp_path: Path) -> None:
    write_merchants(tmp_path / "data", ["acme"])
    first = merchant(tmp_path / "data").split()
    other = merchant(tmp_path / "data", test_fraction=0.5).split()
    assert other is not first
    assert len(other.test) > len(first.test)


def test_a_frozen_encoder_is_shared_and_its_digest_is_the_computed_one() -> None:
    spec = ModelSpec.from_config(heads_config())
    one, two = node_cache.model(spec), node_cache.model(spec)
    assert one.encoder is two.encoder and one.heads is not two.heads
    fresh = build_model(spec)
    for name, value in get_trainable(fresh).items():  # the same initial heads as a fresh build
        torch.testing.assert_close(torch.as_tensor(get_trainable(one)[name]), torch.as_tensor(value))
    assert not any(p.requires_grad for p in one.encoder.parameters())
    assert features.encoder_digest(one.encoder) == features.encoder_digest(fresh.encoder)  # memo = computed
    with torch.no_grad():
        next(fresh.encoder.parameters()).add_(1.0)
    assert features.encoder_digest(fresh.encoder) != features.encoder_digest(one.encoder)


def test_a_trained_encoder_is_never_shared() -> None:
    spec = ModelSpec.from_config(heads_config(trainable="top-k", top_k_layers=1))
    assert node_cache.model(spec).encoder is not node_cache.model(spec).encoder
