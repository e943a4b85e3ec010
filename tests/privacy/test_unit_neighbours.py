"""Neighbouring datasets differ by one privacy unit, end to end through the split.

For random merchants (repeated users, repeated (user, product) pairs, impression -> click ->
purchase funnels, missing timestamps, judgments), removing one unit from the data removes
exactly that unit's records from the training and the test set, and leaves every other
record's features (its context) as they were. Under ``privacy-unit = "record"`` removing one
row removes exactly one record (or one identical to it) from the training multiset.

``test_removing_one_row_of_a_repeated_pair_moves_no_other_row`` fails on the split before the
fix (``git show 7810aa8:client/data/split.py``: an interaction hashed (seed, user, product, k)
with k = earlier rows of that pair, so removing the pair's first row shifted every later one's
k and moved them across the split); ``_positional_sides`` below is that rule, kept to show it.
"""

from __future__ import annotations

import collections
import math
import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from client.data import MerchantData, build_examples, load_merchant, split_examples
from client.data.examples import PrivacyUnitError
from client.data.split import _unit_interval
from client.merchant import split_merchant
from client.sources.adapters import prepare_reviews
from shared.config import RunConfig
from shared.tasks import Example, group_records

LABELS = ("impression", "click", "purchase")


def random_merchant(seed: int, rows: int = 60) -> MerchantData:
    rng = random.Random(seed)
    products = [f"p{i}" for i in range(10)]
    catalog = pd.DataFrame({"product_id": products, "title": [f"title {p}" for p in products],
                            "category": ["" for _ in products], "brand": ["" for _ in products],
                            "description": ["" for _ in products]})
    users = [f"u{i}" for i in range(rng.randint(3, 8))]
    out: list[dict[str, Any]] = []
    while len(out) < rows:
        user, product = rng.choice(users), rng.choice(products)
        stamp = float(rng.randint(0, 10_000)) if rng.random() < 0.7 else math.nan
        query = rng.choice(["", "", "", "lamp", "mug"])
        if rng.random() < 0.25:  # a funnel: impression -> click -> purchase of one pair
            for depth in range(rng.randint(1, 3)):
                out.append(dict(user_id=user, product_id=product, label=LABELS[depth], query=query,
                                rating=math.nan, timestamp=stamp + depth if not math.isnan(stamp) else stamp))
            continue
        row = dict(user_id=user, product_id=product, label=rng.choice(LABELS), query=query,
                   rating=float(rng.randint(1, 5)) if rng.random() < 0.3 else math.nan, timestamp=stamp)
        out.extend([row] * (2 if rng.random() < 0.15 else 1))  # identical repeats too
    queries = ["lamp", "mug", "red scarf", "kettle", "tent"]
    judgments = pd.DataFrame([dict(query=rng.choice(queries), product_id=rng.choice(products), label=rng.randint(0, 3))
                              for _ in range(20)])
    return MerchantData("shop", catalog, pd.DataFrame(out), judgments)


def without(data: MerchantData, unit: str) -> MerchantData:
    """``data`` less every row of ``unit`` (``user:<id>`` or ``query:<query>``)."""
    kind, _, name = unit.partition(":")
    assert data.interactions is not None and data.judgments is not None
    interactions, judgments = data.interactions, data.judgments
    if kind == "user":
        interactions = interactions[interactions["user_id"] != name].reset_index(drop=True)
    else:
        judgments = judgments[judgments["query"] != name].reset_index(drop=True)
    return MerchantData(data.merchant_id, data.catalog, interactions, judgments)


def view(examples: list[Example]) -> list[tuple[Any, ...]]:
    """Everything an example holds but its record id (a row number, which removal shifts)."""
    return [(e.task, e.context, e.product, e.target, e.group, e.product_id, e.unit) for e in examples]


def config(**changes: Any) -> RunConfig:
    return RunConfig(**{"test_fraction": 0.3, "history_length": 2, "eval_max_examples": 0, **changes})


@pytest.mark.parametrize("seed", range(5))
def test_removing_a_unit_removes_exactly_its_records(seed: int) -> None:
    data = random_merchant(seed)
    cfg = config(split_seed=seed)
    full = split_merchant(data, cfg)
    units = sorted({e.unit for e in build_examples(data)})
    assert any(u.startswith("user:") for u in units) and any(u.startswith("query:") for u in units)
    assert full.train and full.test
    for unit in units:
        less = split_merchant(without(data, unit), cfg)
        assert view(less.train) == [v for v in view(full.train) if v[-1] != unit], unit
        assert view(less.test) == [v for v in view(full.test) if v[-1] != unit], unit


@pytest.mark.parametrize("seed", range(3))
def test_a_users_rows_are_all_on_one_side(seed: int) -> None:
    full = split_merchant(random_merchant(seed), config(split_seed=seed))
    assert {e.unit for e in full.train}.isdisjoint({e.unit for e in full.test})


def replaced(data: MerchantData, unit: str, rows: int) -> MerchantData:
    """``data`` with ``unit``'s rows (``user:<id>``) replaced by ``rows`` others: the records of
    another user, taken as its own. The unit and its id stay (so does its side of the split:
    N per side is public); what it did, and how much of it, changes."""
    kind, _, name = unit.partition(":")
    assert kind == "user" and data.interactions is not None
    interactions = data.interactions
    donor = interactions[interactions["user_id"] != name].head(rows).assign(user_id=name)
    interactions = pd.concat([interactions[interactions["user_id"] != name], donor], ignore_index=True)
    return MerchantData(data.merchant_id, data.catalog, interactions, data.judgments)


@pytest.mark.parametrize("seed", range(3))
def test_unit_caps_take_whole_units_by_hash_and_a_replacement_moves_no_other(seed: int) -> None:
    """``max-train-examples`` counts units: whole units, the first by hash. Replacing one unit's
    records by any number of others leaves the capped set of units as it was, and every other
    unit its exact records: the capped sets are replace-one neighbours. (A cap on records, the
    rule before, let a unit that grew push later units out.)"""
    data = random_merchant(seed, rows=80)
    cfg = config(split_seed=seed, max_train_examples=4)
    taken = split_merchant(data, cfg).train
    everything = split_merchant(data, cfg.replace(max_train_examples=0)).train
    taken_units = {e.unit for e in taken}
    assert len(taken_units) == min(4, len({e.unit for e in everything}))
    assert view(taken) == [v for v in view(everything) if v[-1] in taken_units]  # whole units, input order
    users = sorted({e.unit for e in everything if e.unit.startswith("user:")})
    assert users
    for unit in users:
        for rows in (1, 12):
            other = split_merchant(replaced(data, unit, rows), cfg).train
            assert {e.unit for e in other} == taken_units, (unit, rows)
            rest = taken_units - {unit}
            assert [v for v in view(other) if v[-1] in rest] == [v for v in view(taken) if v[-1] in rest], unit


# ----------------------------------------------------------------- privacy-unit = "record"
def record_multiset(examples: list[Example]) -> collections.Counter[tuple[Any, ...]]:
    return collections.Counter(tuple(view(members)) for members in group_records(examples))


@pytest.mark.parametrize("seed", range(4))
def test_record_unit_removing_a_row_removes_one_record(seed: int) -> None:
    data = random_merchant(seed)
    assert data.interactions is not None
    cfg = config(split_seed=seed, privacy_unit="record", history_length=0)
    full = split_merchant(data, cfg)
    for row in range(len(data.interactions)):
        less_data = MerchantData("shop", data.catalog, data.interactions.drop(index=row).reset_index(drop=True),
                                 data.judgments)
        less = split_merchant(less_data, cfg)
        removed = record_multiset(full.train) - record_multiset(less.train)
        removed_test = record_multiset(full.test) - record_multiset(less.test)
        assert sum(removed.values()) + sum(removed_test.values()) == 1, row
        assert not (record_multiset(less.train) - record_multiset(full.train)), row  # nothing moved in
        assert not (record_multiset(less.test) - record_multiset(full.test)), row
        gone = next(iter(removed or removed_test))
        row_of = [e for e in build_examples(data, history_length=0) if e.record == f"shop/interaction:{row}"]
        assert gone == tuple(view(row_of)), row  # the removed row itself, or one identical to it


def _positional_sides(examples: list[Example], seed: int, fraction: float) -> list[bool]:
    """The split before the fix: (seed, user, product, k), k = earlier rows of the pair."""
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    sides = []
    for e in examples:
        k = seen[(e.group, e.product_id)]
        seen[(e.group, e.product_id)] += 1
        sides.append(_unit_interval(seed, e.group, e.product_id, "interaction", k) < fraction)
    return sides


def test_removing_one_row_of_a_repeated_pair_moves_no_other_row() -> None:
    funnel = [Example("ctr", "", "lamp", float(label == "purchase"), group="u1", product_id="p1",
                      record=f"r{i}-{label}") for i, label in enumerate(["impression", "click", "purchase"] * 2)]
    fraction = 0.5
    for seed in range(50):  # a seed where the positional rule moves a row when row 0 goes
        before = _positional_sides(funnel, seed, fraction)[1:]
        if before != _positional_sides(funnel[1:], seed, fraction):
            break
    else:
        pytest.fail("no seed shows the positional split moving rows")
    train, test = split_examples(funnel, test_fraction=fraction, seed=seed, unit="record")
    less_train, less_test = split_examples(funnel[1:], test_fraction=fraction, seed=seed, unit="record")
    # Rows are records of their own here: only the removed row (or an identical one) may leave.
    assert record_multiset(less_train) <= record_multiset(train)
    assert record_multiset(less_test) <= record_multiset(test)
    assert sum((record_multiset(train) + record_multiset(test) - record_multiset(less_train)
                - record_multiset(less_test)).values()) == 1


# ----------------------------------------------------------------- refusal
def test_record_unit_is_refused_when_contexts_read_other_rows() -> None:
    data = random_merchant(0)
    with pytest.raises(PrivacyUnitError, match=r"privacy-unit = 'record'.*interaction row \d+ \(user 'u\d+'\)"):
        build_examples(data, history_length=2, privacy_unit="record")
    with pytest.raises(PrivacyUnitError, match="history-length = 2"):
        split_merchant(data, config(privacy_unit="record"))
    build_examples(data, history_length=0, privacy_unit="record")  # no history: rows stand alone
    assert {e.unit for e in build_examples(data)} >= {"user:u0", "query:lamp"}


def test_reviews_have_one_row_per_user(tmp_path: Path) -> None:
    """The bundled reviews: every reviewer writes one review, so a user is a record there and
    user-level DP-SGD (k = 1) samples, clips and accounts exactly as record-level did."""
    merchants = [load_merchant(path) for path in prepare_reviews(tmp_path / "merchants")]
    for merchant in merchants:
        assert merchant.interactions is not None and merchant.interactions["user_id"].is_unique
        examples = build_examples(merchant, privacy_unit="record")  # accepted: no row reads another
        assert len({e.unit for e in examples}) == len({e.record for e in examples})
