"""Turning a merchant's validated tables into task examples (``shared.tasks.Example``).
"""

from __future__ import annotations

import collections
import math

import pandas as pd

from client.data.schema import CONVERSION_LABELS, HISTORY_SEPARATOR, PRODUCT_TEXT_SEPARATOR, MerchantData
from shared.tasks import TASKS, Example


def product_text(title: str, *, category: str = "", brand: str = "", description: str = "") -> str:
    """The text a model reads for a product: title | category | brand | description.

    Missing parts are skipped; nothing is truncated here (the tokenizer truncates to the
    model's sequence length, so the most informative part goes first).
    """
    parts = (title, category, brand, description)
    return PRODUCT_TEXT_SEPARATOR.join(part for part in parts if part)


PRIVACY_UNITS = ("user", "record")


class PrivacyUnitError(ValueError):
    """``privacy-unit = "record"`` on data whose records' features read other records."""


def _history_contexts(interactions: pd.DataFrame, titles: dict[str, str],
                      history_length: int) -> tuple[list[str], list[bool]]:
    """For each interaction row: the titles of the same user's previous interactions, and
    whether it has any (its context, when it has no query, then reads other rows).

    Order is by timestamp, ties broken by file order. A row without a timestamp takes the
    timestamp of that user's previous row in the file (or sorts first), so a file with no
    timestamps at all is read in file order. Most recent first: the tokenizer truncates the
    end of a long context, and the latest products say most about what comes next.
    """
    users = interactions["user_id"].tolist()
    stamps = interactions["timestamp"].tolist()
    products = interactions["product_id"].tolist()
    by_user: dict[str, list[int]] = collections.defaultdict(list)
    for index, user in enumerate(users):
        by_user[user].append(index)
    contexts = [""] * len(users)
    earlier = [False] * len(users)
    if history_length == 0:
        return contexts, earlier
    for indices in by_user.values():
        keyed: list[tuple[float, int]] = []
        carried = -math.inf
        for index in indices:
            if not math.isnan(stamps[index]):
                carried = stamps[index]
            keyed.append((carried, index))
        ordered = [index for _, index in sorted(keyed)]
        for position, index in enumerate(ordered):
            previous = ordered[max(0, position - history_length):position]
            contexts[index] = HISTORY_SEPARATOR.join(titles[products[i]] for i in reversed(previous))
            earlier[index] = bool(previous)
    return contexts, earlier


def supported_tasks(data: MerchantData) -> tuple[str, ...]:
    """The tasks ``data`` has examples for, in ``TASKS`` order: ``ctr`` when it has interactions,
    ``rating`` when any interaction carries a rating, ``relevance`` when it has judgments."""
    interactions, judgments = data.interactions, data.judgments
    has = {
        "ctr": interactions is not None and len(interactions) > 0,
        "rating": interactions is not None and bool(interactions["rating"].notna().any()),
        "relevance": judgments is not None and len(judgments) > 0,
    }
    return tuple(task for task in TASKS if has[task])


def build_examples(
    data: MerchantData,
    *,
    conversion_label: str = "purchase",
    history_length: int = 3,
    tasks: tuple[str, ...] = TASKS,
    privacy_unit: str = "user",
) -> list[Example]:
    """Turn one merchant's tables into task examples, in file order.

    Interactions give a ``ctr`` example per row (target 1.0 when the row's label counts as a
    conversion) and a ``rating`` example per row that has a rating; judgments give a
    ``relevance`` example per row. Each example names its row (``record``): the trainer
    trains a row's examples as one sample, the split keeps them on one side. The context of
    an interaction is its query, else the user's recent product titles, else empty; a
    judgment's context is its query.

    Each example also names its privacy unit (``unit``): ``user:<user_id>`` for an
    interaction, ``query:<query>`` for a judgment. ``privacy_unit = "record"`` (each row its
    own unit) is refused with ``PrivacyUnitError`` when a row's context came from the same
    user's other rows (``history_length > 0``, no query, earlier rows): removing one row
    would then change other rows' features too, so one row is not what a neighbour removes.
    """
    if privacy_unit not in PRIVACY_UNITS:
        raise ValueError(f"privacy-unit = {privacy_unit!r}: must be one of {list(PRIVACY_UNITS)}")
    if conversion_label not in CONVERSION_LABELS:
        raise ValueError(f"conversion_label {conversion_label!r} must be one of {sorted(CONVERSION_LABELS)}")
    if history_length < 0:
        raise ValueError(f"history_length {history_length!r} must be >= 0")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"tasks {unknown!r} are not among {list(TASKS)}")
    converted = CONVERSION_LABELS[conversion_label]
    catalog = data.catalog
    titles = dict(zip(catalog["product_id"], catalog["title"], strict=True))
    texts = {
        row.product_id: product_text(
            row.title, category=row.category, brand=row.brand, description=row.description
        )
        for row in catalog.itertuples(index=False)
    }
    examples: list[Example] = []
    wants_ctr, wants_rating = "ctr" in tasks, "rating" in tasks
    if data.interactions is not None and (wants_ctr or wants_rating):
        frame = data.interactions
        history, earlier = _history_contexts(frame, titles, history_length)
        rows = zip(
            frame["user_id"], frame["product_id"], frame["label"], frame["query"], frame["rating"], history, earlier,
            strict=True,
        )
        for row, (user, product_id, label, query, rating, recent, reads_others) in enumerate(rows):
            if privacy_unit == "record" and reads_others and not query:
                raise PrivacyUnitError(
                    f"privacy-unit = 'record' is refused for merchant {data.merchant_id!r}: interaction row {row} "
                    f"(user {user!r}) takes its context from the user's earlier rows (history-length = "
                    f"{history_length}), so removing one record changes others; use privacy-unit = 'user' "
                    "(the default) or history-length = 0")
            context = query or recent
            unit = f"user:{user}"
            product = texts[product_id]
            record = f"{data.merchant_id}/interaction:{row}"
            if wants_ctr:
                target = 1.0 if label in converted else 0.0
                examples.append(Example("ctr", context, product, target, group=user, product_id=product_id,
                                        record=record, unit=unit))
            if wants_rating and not math.isnan(rating):
                examples.append(Example("rating", context, product, float(rating), group=user,
                                        product_id=product_id, record=record, unit=unit))
    if data.judgments is not None and "relevance" in tasks:
        frame = data.judgments
        rows_j = zip(frame["query"], frame["product_id"], frame["label"], strict=True)
        for row, (query, product_id, grade) in enumerate(rows_j):
            product = texts[product_id]
            examples.append(Example("relevance", query, product, float(grade), group=query, product_id=product_id,
                                    record=f"{data.merchant_id}/judgment:{row}", unit=f"query:{query}"))
    return examples


