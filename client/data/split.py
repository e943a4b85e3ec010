"""The deterministic train/test split of a merchant's examples, and its unit-wise subsamples.

Both hash a stable key of each privacy unit (``unit_keys``), never a position, so a
neighbouring dataset (one unit removed) splits and subsamples every other unit as before.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
from collections.abc import Sequence

from shared.tasks import Example, group_records

UnitKey = tuple[object, ...]


def _unit_interval(*parts: object) -> float:
    """A uniform number in [0, 1) from a stable hash of the parts (same on every machine)."""
    digest = hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _content(members: Sequence[Example]) -> tuple[object, ...]:
    """Everything a record's examples hold but its id: identical records are interchangeable."""
    return tuple((e.task, e.context, e.product, e.target, e.group, e.product_id) for e in members)


def unit_keys(examples: Sequence[Example], *, unit: str = "user") -> list[tuple[UnitKey, list[Example]]]:
    """Each record (``group_records``, in order) with the stable key of the unit it belongs to.

    - A judgment: its query (``(query, "", "judgment", 0)``), under either unit: a query's
      whole candidate list goes together, and the key reads no other row.
    - An interaction, ``unit = "user"``: its unit id (``Example.unit``, ``user:<user_id>``),
      so all of a user's rows share one key.
    - An interaction, ``unit = "record"`` (or without a unit id): ``(user, product, "interaction",
      k)``, ``k`` counting earlier records with *identical* content. Identical records are
      interchangeable, so removing one changes the training multiset by exactly one record;
      distinct rows (an impression and a click of one pair) never shift each other.
    """
    if unit not in ("user", "record"):
        raise ValueError(f"privacy-unit = {unit!r}: must be 'user' or 'record'")
    seen: collections.Counter[tuple[object, ...]] = collections.Counter()
    keyed: list[tuple[UnitKey, list[Example]]] = []
    for members in group_records(examples):
        first = members[0]
        if first.task == "relevance":
            key: UnitKey = (first.group, "", "judgment", 0)
        elif unit == "user" and first.unit:
            key = (first.unit,)
        else:
            content = _content(members)
            key = (first.group, first.product_id, "interaction", seen[content])
            seen[content] += 1
        keyed.append((key, members))
    return keyed


def split_examples(
    examples: Sequence[Example], *, test_fraction: float, seed: int, offset: float = 0.0, unit: str = "user"
) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, test) split, unit by unit (``unit_keys``).

    A unit is held out when the hash of ``(seed, *key)``, a uniform number in [0, 1), lies in the
    window ``[offset, offset + test_fraction)`` (wrapping past 1): windows of one seed that do not
    overlap hold out disjoint units, so ``K`` of width ``1/K`` make K-fold folds.

    A unit's side depends only on ``seed`` and its own key, so it stays on its side across
    runs, machines and Python hash seeds, and adding or removing other units never moves it:
    the split of D minus a unit is the split of D minus that unit's records. A user's rows
    (``unit = "user"``) and a query's candidates are held out together (ranking is measured on
    queries the model never trained on), and all examples of one record (a click label and a
    rating of the same row) land together. Input order is kept within each side.
    """
    if not (math.isfinite(test_fraction) and 0.0 <= test_fraction <= 1.0):
        raise ValueError(f"test_fraction {test_fraction!r} must lie in [0, 1]")
    if not (math.isfinite(offset) and 0.0 <= offset < 1.0):
        raise ValueError(f"offset {offset!r} must lie in [0, 1)")
    train: list[Example] = []
    test: list[Example] = []
    for key, members in unit_keys(examples, unit=unit):
        side = test if (_unit_interval(seed, *key) - offset) % 1.0 < test_fraction else train
        side.extend(members)
    return train, test


def subsample_units(examples: Sequence[Example], limit: int, salt: str, *, unit: str = "user") -> list[Example]:
    """The examples of at most ``limit`` *units*: the first ``limit`` in the order of the hash
    of ``(salt, *key)``, each with all its examples. Input order is kept; 0 = no limit.

    Counted in units, never in records or positions, so the cap commutes with a neighbour:
    replacing one unit by another changes the capped set by at most that one replacement (the
    unit out, and the next in hash order in; or the newcomer in, and the last one out), and
    the capped set always holds min(limit, N) units, a public count. A cap on records would not:
    a replacement of another size lets more or fewer units in after it.
    """
    keyed = unit_keys(examples, unit=unit)  # one entry per record: a unit's records share its key
    units = set(key for key, _ in keyed)
    if not limit or len(units) <= limit:
        return list(examples)
    taken = set(sorted(units, key=lambda k: _unit_interval(salt, *k))[:limit])
    return [e for key, members in keyed if key in taken for e in members]
