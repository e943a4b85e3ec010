"""Small merchant folders in the documented format (``docs/data-format.md``), written as CSV.

Written by hand rather than by ``client.sources.synthetic`` so that the federation tests do not
depend on the generator: a few dozen rows per merchant, enough for all three tasks.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path

GOOD = ("premium", "durable", "handcrafted", "sturdy")
BAD = ("cheap", "flimsy", "knockoff", "faded")
NOUNS = ("scarf", "kettle", "lamp", "jacket", "mug", "backpack", "rug", "tent")
COLOURS = ("red", "blue", "green", "black")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def write_merchant(root: Path, name: str, *, seed: int, products: int = 16, interactions: int = 60,
                   judgments: int = 16, users: int = 12) -> Path:
    """``root/name`` with a catalog, interactions (clicks, purchases, ratings) by ``users``
    users (the privacy unit: more interactions alone add no units) and judgments."""
    rng = random.Random(seed)
    directory = root / name
    directory.mkdir(parents=True)
    catalog = []
    for i in range(products):
        good = i % 2 == 0
        title = f"{rng.choice(GOOD if good else BAD)} {rng.choice(COLOURS)} {rng.choice(NOUNS)}"
        catalog.append((f"p{i}", title, "home", "Acme", f"{10 + i}.5"))
    _write_csv(directory / "catalog.csv", ("product_id", "title", "category", "brand", "price"), catalog)
    rows = []
    for i in range(interactions):
        pid = rng.randrange(products)
        good = pid % 2 == 0
        label = rng.choice(("purchase", "click") if good else ("impression", "click"))
        rating = rng.choice((4, 5)) if label == "purchase" else ""
        query = rng.choice(NOUNS) if i % 3 == 0 else ""
        rows.append((f"u{i % users}", f"p{pid}", label, query, rating, 1_700_000_000 + 60 * i))
    _write_csv(directory / "interactions.csv",
               ("user_id", "product_id", "label", "query", "rating", "timestamp"), rows)
    judged = [(rng.choice(NOUNS), f"p{rng.randrange(products)}", rng.randrange(4)) for _ in range(judgments)]
    _write_csv(directory / "judgments.csv", ("query", "product_id", "label"), judged)
    return directory


def write_merchants(root: Path, names: Sequence[str], *, seed: int = 0) -> list[Path]:
    """One folder per name under ``root`` (the run's ``data-dir``); sorted names = partition ids."""
    root.mkdir(parents=True, exist_ok=True)
    return [write_merchant(root, name, seed=seed * 1000 + i) for i, name in enumerate(names)]
