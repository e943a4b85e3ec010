"""A seeded synthetic federation: any number of merchants, each built only when asked for.

``SyntheticFederation(10_000)`` costs nothing to construct; ``.merchant(i)`` builds merchant
``i`` from ``(seed, i)`` alone, in time proportional to its size, so a simulation can sample a
few of many thousands of merchants per round. ``write_merchants`` writes them in the format.

Planted truth, so that learning can be checked:

- Product titles are built from a small vocabulary: optional quality words, an optional
  neutral adjective, a colour, a material and a product type, e.g.
  "Premium vintage navy leather jacket".
- A product's latent quality is a fixed, global, linear rule over title words
  (``planted_quality``): "premium", "durable", ... raise it; "cheap", "flimsy", ... lower
  it; a few materials nudge it. The same rule holds at every merchant.
- Click and purchase probabilities rise with quality (and, for searches, with the overlap
  of query and title words); ratings follow quality; relevance grades follow query-title
  word overlap plus quality. A text model that learns word weights can recover all three.

Merchants are not identically distributed: each has its own size (0.5x-2x the nominal
counts), category mix (Dirichlet), share of good vs. bad quality words, brands, price level
and baseline click rate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.data import FileFormat, MerchantData, check_output_dir, write_merchant

log = logging.getLogger(__name__)

CATEGORIES: Mapping[str, tuple[str, ...]] = {
    "apparel": ("shirt", "dress", "jacket", "scarf", "sweater", "jeans"),
    "kitchen": ("pan", "kettle", "mug", "knife", "skillet", "teapot"),
    "outdoor": ("tent", "backpack", "lantern", "flask", "hammock", "compass"),
    "home": ("lamp", "rug", "pillow", "blanket", "vase", "clock"),
    "electronics": ("headphones", "charger", "speaker", "keyboard", "mouse", "cable"),
    "toys": ("puzzle", "kite", "robot", "doll", "blocks", "yoyo"),
    "beauty": ("serum", "lotion", "brush", "mirror", "perfume", "soap"),
    "sports": ("ball", "racket", "mat", "gloves", "helmet", "skates"),
}
COLOURS = (
    "red", "blue", "green", "black", "white", "grey", "navy", "beige", "pink", "yellow", "orange", "teal",
)
ADJECTIVES = ("classic", "modern", "compact", "vintage", "slim", "oversized", "soft", "bright", "minimalist",
              "portable", "everyday", "rustic")
POSITIVE_WORDS = ("premium", "durable", "handcrafted", "certified")
NEGATIVE_WORDS = ("cheap", "flimsy", "knockoff", "faded")

# The planted rule: latent quality = sum of these weights over the distinct words of a title.
QUALITY_WEIGHTS: Mapping[str, float] = {
    "premium": 1.4, "durable": 1.2, "handcrafted": 1.0, "certified": 0.8,
    "cheap": -1.4, "flimsy": -1.2, "knockoff": -1.0, "faded": -0.8,
    "leather": 0.3, "wool": 0.25, "silk": 0.2, "steel": 0.15,
    "plastic": -0.3, "polyester": -0.25, "acrylic": -0.2,
}
MATERIALS = (
    "cotton", "leather", "wool", "silk", "steel", "bamboo", "linen", "ceramic", "plastic", "polyester",
    "acrylic", "denim",
)

# How labels follow the latent (logits). Steep enough that the planted signal dominates.
_CLICK_BASE, _CLICK_QUALITY, _QUERY_MATCH = 0.0, 1.6, 2.5
_PURCHASE_BASE, _PURCHASE_QUALITY = -0.4, 2.0
_RATING_BASE, _RATING_QUALITY, _RATING_NOISE = 3.3, 1.1, 0.5
_GRADE_OVERLAP, _GRADE_QUALITY, _GRADE_NOISE = 2.6, 0.6, 0.35
_QUERY_SHARE = 0.35  # interactions that came from a search
_RATED_SHARE = 0.6  # purchases that were rated
_JUDGED_PER_QUERY = 5
_EPOCH_2024 = 1_704_067_200.0
_SYLLABLES = (
    "nor", "vik", "ala", "ber", "cor", "dan", "eli", "fen", "gro", "hal", "ist", "jun", "kel", "lum", "mar",
    "ost", "pel", "qua", "ros", "sol", "tor", "umb", "val", "wen",
)
_WORD = re.compile(r"[a-z]+")


def planted_quality(title: str) -> float:
    """The planted latent quality of a product title (the generator's ground truth)."""
    return sum(QUALITY_WEIGHTS.get(word, 0.0) for word in set(_WORD.findall(title.lower())))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def purchase_probability(title: str, *, query_match: float | None = None, click_offset: float = 0.0) -> float:
    """P(purchase) of one impression under the planted model (``query_match`` in [0, 1])."""
    quality = planted_quality(title)
    click = _CLICK_BASE + click_offset + _CLICK_QUALITY * quality
    if query_match is not None:
        click += _QUERY_MATCH * (query_match - 0.5)
    return _sigmoid(click) * _sigmoid(_PURCHASE_BASE + _PURCHASE_QUALITY * quality)


@dataclasses.dataclass(frozen=True)
class MerchantProfile:
    """What makes one synthetic merchant different from the others (cheap to compute)."""

    merchant_id: str
    size_factor: float  # multiplies the nominal product / interaction / judgment counts
    category_mix: dict[str, float]
    positive_share: float  # chance that a quality word in a title is a good one
    click_offset: float  # merchant's baseline click logit
    price_level: float
    brands: tuple[str, ...]
    products: int
    interactions: int
    judgments: int


@dataclasses.dataclass(frozen=True)
class _Product:
    product_id: str
    title: str
    words: frozenset[str]
    product_type: str
    colour: str
    material: str
    quality: float


class SyntheticFederation:
    """``num_merchants`` synthetic merchants, described by ``(seed, i)`` and built on demand."""

    def __init__(
        self,
        num_merchants: int,
        seed: int = 0,
        products_per_merchant: int = 60,
        interactions_per_merchant: int = 300,
        judgments_per_merchant: int = 60,
    ) -> None:
        if num_merchants < 1:
            raise ValueError(f"num_merchants {num_merchants!r} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed {seed!r} must be >= 0")
        if products_per_merchant < 1:
            raise ValueError(f"products_per_merchant {products_per_merchant!r} must be >= 1")
        if interactions_per_merchant < 0 or judgments_per_merchant < 0:
            raise ValueError(
                f"interactions_per_merchant {interactions_per_merchant!r} and judgments_per_merchant "
                f"{judgments_per_merchant!r} must be >= 0"
            )
        if interactions_per_merchant == 0 and judgments_per_merchant == 0:
            raise ValueError("a merchant needs interactions or judgments; both counts are 0")
        self.num_merchants = num_merchants
        self.seed = seed
        self.products_per_merchant = products_per_merchant
        self.interactions_per_merchant = interactions_per_merchant
        self.judgments_per_merchant = judgments_per_merchant
        self._width = max(5, len(str(num_merchants - 1)))

    def __len__(self) -> int:
        return self.num_merchants

    def __repr__(self) -> str:
        return f"SyntheticFederation(num_merchants={self.num_merchants}, seed={self.seed})"

    def merchant_id(self, index: int) -> str:
        self._check(index)
        return f"synth-{index:0{self._width}d}"

    def _check(self, index: int) -> None:
        if not 0 <= index < self.num_merchants:
            raise IndexError(f"merchant index {index!r} is outside 0..{self.num_merchants - 1}")

    def _rng(self, index: int) -> np.random.Generator:
        # PCG64 seeded from (seed, index) only: merchant i is the same whatever else was built.
        return np.random.default_rng(np.random.SeedSequence([self.seed, index]))

    def _profile(self, index: int, rng: np.random.Generator) -> MerchantProfile:
        size = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        mix = rng.dirichlet(np.full(len(CATEGORIES), 0.4))
        brands = tuple(
            "".join(rng.choice(_SYLLABLES, size=2)).capitalize() for _ in range(int(rng.integers(2, 5)))
        )

        def scaled(count: int, floor: int) -> int:
            return 0 if count == 0 else max(floor, round(count * size))

        return MerchantProfile(
            merchant_id=self.merchant_id(index),
            size_factor=size,
            category_mix={name: float(share) for name, share in zip(CATEGORIES, mix, strict=True)},
            positive_share=float(rng.beta(2.0, 2.0)),
            click_offset=float(rng.normal(0.0, 0.3)),
            price_level=math.exp(rng.normal(0.0, 0.3)),
            brands=brands,
            products=scaled(self.products_per_merchant, 4),
            interactions=scaled(self.interactions_per_merchant, 10),
            judgments=scaled(self.judgments_per_merchant, 5),
        )

    def profile(self, index: int) -> MerchantProfile:
        """Merchant ``index``'s profile, without generating its data."""
        self._check(index)
        return self._profile(index, self._rng(index))

    def merchant(self, index: int) -> MerchantData:
        """Build merchant ``index`` (deterministic from ``(seed, index)``)."""
        self._check(index)
        rng = self._rng(index)
        profile = self._profile(index, rng)
        products = _products(profile, rng)
        brands = [str(brand) for brand in rng.choice(profile.brands, size=len(products))]
        catalog = pd.DataFrame(
            {
                "product_id": pd.Series([p.product_id for p in products], dtype=str),
                "title": pd.Series([p.title for p in products], dtype=str),
                "description": pd.Series(
                    [f"A {p.colour} {p.material} {p.product_type} from {brand}."
                     for p, brand in zip(products, brands, strict=True)],
                    dtype=str,
                ),
                "category": pd.Series([_category_of(p.product_type) for p in products], dtype=str),
                "brand": pd.Series(brands, dtype=str),
                "price": pd.Series(
                    [
                        round(_BASE_PRICE[_category_of(p.product_type)] * profile.price_level
                              * math.exp(0.25 * p.quality) * float(rng.uniform(0.8, 1.2)), 2)
                        for p in products
                    ],
                    dtype="float64",
                ),
            }
        )
        interactions = _interactions(profile, products, rng) if profile.interactions else None
        judgments = _judgments(profile, products, rng) if profile.judgments else None
        return MerchantData(profile.merchant_id, catalog, interactions, judgments)


_BASE_PRICE = {"apparel": 40.0, "kitchen": 30.0, "outdoor": 60.0, "home": 35.0, "electronics": 50.0,
               "toys": 20.0, "beauty": 18.0, "sports": 45.0}
_TYPE_CATEGORY = {product_type: name for name, types in CATEGORIES.items() for product_type in types}


def _category_of(product_type: str) -> str:
    return _TYPE_CATEGORY[product_type]


def _products(profile: MerchantProfile, rng: np.random.Generator) -> list[_Product]:
    names = list(CATEGORIES)
    mix = np.array([profile.category_mix[name] for name in names])
    products = []
    for j in range(profile.products):
        category = names[int(rng.choice(len(names), p=mix))]
        product_type = str(rng.choice(CATEGORIES[category]))
        colour, material = str(rng.choice(COLOURS)), str(rng.choice(MATERIALS))
        count = int(rng.choice(3, p=[0.25, 0.5, 0.25]))
        quality_words: list[str] = []
        for _ in range(count):
            pool = POSITIVE_WORDS if rng.random() < profile.positive_share else NEGATIVE_WORDS
            word = str(rng.choice(pool))
            if word not in quality_words:
                quality_words.append(word)
        adjective = [str(rng.choice(ADJECTIVES))] if rng.random() < 0.5 else []
        words = [*quality_words, *adjective, colour, material, product_type]
        title = " ".join(words).capitalize()
        products.append(
            _Product(
                product_id=f"{profile.merchant_id}-p{j:04d}",
                title=title,
                words=frozenset(words),
                product_type=product_type,
                colour=colour,
                material=material,
                quality=planted_quality(title),
            )
        )
    return products


def _query_for(product: _Product, rng: np.random.Generator) -> list[str]:
    """A short search a user would type for ``product``: its type, maybe colour and material."""
    words = [product.product_type]
    if rng.random() < 0.5:
        words.insert(0, product.colour)
    if rng.random() < 0.3:
        words.insert(-1, product.material)
    return words


def _overlap(query: list[str], product: _Product) -> float:
    return sum(word in product.words for word in query) / len(query)


def _interactions(
    profile: MerchantProfile, products: list[_Product], rng: np.random.Generator
) -> pd.DataFrame:
    by_category: dict[str, list[int]] = {}
    for j, product in enumerate(products):
        by_category.setdefault(_category_of(product.product_type), []).append(j)
    categories = sorted(by_category)
    weights = np.array([profile.category_mix[name] for name in categories])
    users = max(3, round(profile.interactions / 6))
    # Each user mostly browses one category (their taste) and has a clock of their own.
    taste = [categories[int(k)] for k in rng.choice(len(categories), size=users, p=weights / weights.sum())]
    clock = _EPOCH_2024 + rng.uniform(0.0, 300 * 86_400.0, size=users)
    names = ("user_id", "product_id", "label", "query", "rating")
    columns: dict[str, list[Any]] = {name: [] for name in names}
    stamps: list[float] = []
    for _ in range(profile.interactions):
        user = int(rng.integers(users))
        pool: Sequence[int] = by_category[taste[user]] if rng.random() < 0.7 else range(len(products))
        product = products[pool[int(rng.integers(len(pool)))]]
        query: list[str] = []
        logit = _CLICK_BASE + profile.click_offset + _CLICK_QUALITY * product.quality
        if rng.random() < _QUERY_SHARE:
            searched = product if rng.random() < 0.7 else products[int(rng.integers(len(products)))]
            query = _query_for(searched, rng)
            logit += _QUERY_MATCH * (_overlap(query, product) - 0.5)
        clicked = rng.random() < _sigmoid(logit)
        bought = clicked and rng.random() < _sigmoid(_PURCHASE_BASE + _PURCHASE_QUALITY * product.quality)
        rating = math.nan
        if bought and rng.random() < _RATED_SHARE:
            stars = _RATING_BASE + _RATING_QUALITY * product.quality + rng.normal(0.0, _RATING_NOISE)
            rating = float(min(5, max(1, round(stars))))
        clock[user] += round(float(rng.exponential(6 * 3600.0)))
        stamps.append(float(round(clock[user])))
        columns["user_id"].append(f"{profile.merchant_id}-u{user:04d}")
        columns["product_id"].append(product.product_id)
        columns["label"].append("purchase" if bought else "click" if clicked else "impression")
        columns["query"].append(" ".join(query))
        columns["rating"].append(rating)
    order = sorted(range(len(stamps)), key=lambda k: (stamps[k], k))  # a log is written in time order
    frame = {name: [values[k] for k in order] for name, values in columns.items()}
    return pd.DataFrame(
        {
            "user_id": pd.Series(frame["user_id"], dtype=str),
            "product_id": pd.Series(frame["product_id"], dtype=str),
            "label": pd.Series(frame["label"], dtype=str),
            "query": pd.Series(frame["query"], dtype=str),
            "rating": pd.Series(frame["rating"], dtype="float64"),
            "timestamp": pd.Series([stamps[k] for k in order], dtype="float64"),
        }
    )


def _judgments(profile: MerchantProfile, products: list[_Product], rng: np.random.Generator) -> pd.DataFrame:
    by_type: dict[str, list[int]] = {}
    for j, product in enumerate(products):
        by_type.setdefault(product.product_type, []).append(j)
    queries: list[str] = []
    judged: list[str] = []
    grades: list[int] = []
    while len(grades) < profile.judgments:
        seed_product = products[int(rng.integers(len(products)))]
        query = _query_for(seed_product, rng)
        # Judge some products of the searched type (likely relevant) and some at random.
        similar = [int(j) for j in rng.permutation(by_type[seed_product.product_type])[:3]]
        others = [int(j) for j in rng.permutation(len(products)) if int(j) not in similar]
        chosen = (similar + others)[: min(_JUDGED_PER_QUERY, profile.judgments - len(grades))]
        for j in chosen:
            product = products[j]
            score = (_GRADE_OVERLAP * _overlap(query, product) + _GRADE_QUALITY * product.quality
                     + rng.normal(0.0, _GRADE_NOISE))
            queries.append(" ".join(query))
            judged.append(product.product_id)
            grades.append(int(min(3, max(0, round(score)))))
    return pd.DataFrame(
        {
            "query": pd.Series(queries, dtype=str),
            "product_id": pd.Series(judged, dtype=str),
            "label": pd.Series(grades, dtype="int64"),
        }
    )


def write_merchants(
    federation: SyntheticFederation,
    out_dir: str | os.PathLike[str],
    *,
    indices: Iterable[int] | None = None,
    file_format: FileFormat = "parquet",
    overwrite: bool = False,
) -> list[Path]:
    """Write merchants ``indices`` (default: all) as merchant directories under ``out_dir``.

    Each merchant directory is written atomically; a non-empty ``out_dir`` is refused
    unless ``overwrite`` (which replaces only the merchants written now).
    """
    directory = check_output_dir(out_dir, overwrite=overwrite)
    chosen = range(len(federation)) if indices is None else indices
    written = [
        write_merchant(federation.merchant(i), directory, file_format=file_format, overwrite=overwrite)
        for i in chosen
    ]
    log.info("wrote %d synthetic merchants to %s", len(written), directory)
    return written
