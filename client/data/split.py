"""The deterministic train/test split of a merchant's examples.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
from collections.abc import Sequence

from shared.tasks import Example, group_records


def _unit_interval(*parts: object) -> float:
    """A uniform number in [0, 1) from a stable hash of the parts (same on every machine)."""
    digest = hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_examples(
    examples: Sequence[Example], *, test_fraction: float, seed: int, offset: float = 0.0
) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, test) split, record by record; judgments query by query.

    A record is held out when its hash, a uniform number in [0, 1), lies in the window
    ``[offset, offset + test_fraction)`` (wrapping past 1): windows of one seed that do not
    overlap hold out disjoint records, so ``K`` of width ``1/K`` make K-fold folds.

    An interaction's side depends only on ``(seed, user, product_id, k)``, ``k`` counting
    earlier interactions of the same user and product; a judgment's side only on
    ``(seed, query)``, so a query's whole candidate list is held out together and ranking is
    measured on queries the model never trained on. So a record stays on its side across
    runs, machines and Python hash seeds, adding other records never moves it, and all
    examples of one record (a click label and a rating of the same row) land together. Input
    order is kept within each side.
    """
    if not (math.isfinite(test_fraction) and 0.0 <= test_fraction <= 1.0):
        raise ValueError(f"test_fraction {test_fraction!r} must lie in [0, 1]")
    if not (math.isfinite(offset) and 0.0 <= offset < 1.0):
        raise ValueError(f"offset {offset!r} must lie in [0, 1)")
    seen: collections.Counter[tuple[str, str, str]] = collections.Counter()
    train: list[Example] = []
    test: list[Example] = []
    for members in group_records(examples):
        first = members[0]
        if first.task == "relevance":
            key, occurrence = (first.group, "", "judgment"), 0
        else:
            key = (first.group, first.product_id, "interaction")
            occurrence = seen[key]
            seen[key] += 1
        side = test if (_unit_interval(seed, *key, occurrence) - offset) % 1.0 < test_fraction else train
        side.extend(members)
    return train, test


