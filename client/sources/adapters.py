"""Adapters from the bundled real datasets onto the merchant data format.

Each adapter writes ordinary merchant directories (``docs/data-format.md``) and nothing
else: training, evaluation and the apps never know which adapter, if any, produced a
merchant. Every merchant directory is written atomically (``client.data.write_merchant``),
and the whole source is read and split before anything is written.

- ``prepare_reviews``: Women's E-Commerce Clothing Reviews (CC0), one merchant per
  department (6).
- ``prepare_esci``: a 500-query subset of Amazon's Shopping Queries dataset (Apache-2.0),
  queries spread over ``merchants`` merchants by a stable hash of the query id.
- ``public_corpus_pairs``: one bundled dataset's texts as a public
  corpus (``precondition-corpus``) for a federation of *other* shops: the utility benchmark's
  reviews heads train in the geometry of the ESCI texts (client.precondition).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any

import pandas as pd

from client.data import FileFormat, MerchantData, check_output_dir, write_merchant

log = logging.getLogger(__name__)

# The repository's data/ folder (present in a checkout and in an editable install).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
REVIEWS_SOURCE = DATA_DIR / "womens_ecommerce_reviews" / "WomensClothingE-CommerceReviews.parquet.brotli"
ESCI_SOURCE = DATA_DIR / "esci_subset_500q" / "esci_subset.json"

_REVIEW_COLUMNS = ("Title", "Review Text", "Rating", "Recommended IND", "Department Name", "Class Name")


def _merchant_name(label: str) -> str:
    """A directory-safe merchant id from a free-text label: lowercase, runs of other chars -> '-'."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _clean(value: Any) -> str:
    """A source cell as text: missing (None/NaN) and blank become ''."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _write_all(
    merchants: list[MerchantData],
    out_dir: str | os.PathLike[str],
    *,
    file_format: FileFormat,
    overwrite: bool,
) -> list[Path]:
    directory = check_output_dir(out_dir, overwrite=overwrite)
    written = [write_merchant(m, directory, file_format=file_format, overwrite=overwrite) for m in merchants]
    expected = {path.name for path in written}
    others = sorted(
        p.name for p in directory.iterdir() if p.name not in expected and not p.name.startswith(".")
    )
    if others:
        log.warning("%s also holds entries this run did not write (left alone): %s", directory, others)
    return written


# --------------------------------------------------------------------------- reviews
def prepare_reviews(
    out_dir: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    file_format: FileFormat = "parquet",
) -> list[Path]:
    """Write Women's E-Commerce Clothing Reviews as one merchant per department.

    Each review becomes a catalogue entry ``r<row>`` (title = review title, or the class
    name when the title is blank; description = review text; category = class; brand =
    department) and one interaction by the single-review user ``reviewer-<row>``: label
    ``purchase`` when the reviewer recommends the item, else ``click``; rating = stars;
    no query and no timestamp (the source has neither). Rows without a department, then
    rows with a blank review text, are dropped and counted in the log. ``<row>`` is the
    0-based row of the source file.
    """
    path = Path(source) if source is not None else REVIEWS_SOURCE
    frame = pd.read_parquet(path)
    absent = [column for column in _REVIEW_COLUMNS if column not in frame.columns]
    if absent:
        raise ValueError(f"{path}: missing column(s) {absent}; columns found: {list(frame.columns)}")
    frame = frame.reset_index(drop=True)
    department = [_clean(value) for value in frame["Department Name"]]
    text = [_clean(value) for value in frame["Review Text"]]
    title = [_clean(value) for value in frame["Title"]]
    category = [_clean(value) for value in frame["Class Name"]]
    recommended = frame["Recommended IND"].tolist()
    stars = frame["Rating"].tolist()
    no_department = sum(1 for d in department if not d)
    no_text = sum(1 for d, t in zip(department, text, strict=True) if d and not t)
    rows_by_merchant: dict[str, list[int]] = collections.defaultdict(list)
    for row, (d, t) in enumerate(zip(department, text, strict=True)):
        if d and t:
            rows_by_merchant[_merchant_name(d)].append(row)
    log.info(
        "%s: %d reviews; dropped %d without a department and %d more with blank review text; %d kept",
        path.name, len(frame), no_department, no_text, len(frame) - no_department - no_text,
    )
    merchants = []
    for name in sorted(rows_by_merchant):
        rows = rows_by_merchant[name]
        catalog = pd.DataFrame(
            {
                "product_id": [f"r{row}" for row in rows],
                "title": [title[row] or category[row] or "review" for row in rows],
                "description": [text[row] for row in rows],
                "category": [category[row] for row in rows],
                "brand": [department[row] for row in rows],
            }
        )
        interactions = pd.DataFrame(
            {
                "user_id": [f"reviewer-{row}" for row in rows],
                "product_id": [f"r{row}" for row in rows],
                "label": ["purchase" if recommended[row] == 1 else "click" for row in rows],
                "rating": [float(stars[row]) for row in rows],
            }
        )
        merchants.append(MerchantData(name, catalog, interactions, None))
    return _write_all(merchants, out_dir, file_format=file_format, overwrite=overwrite)


# --------------------------------------------------------------------------- ESCI
def esci_merchant(query_id: object, merchants: int) -> int:
    """The merchant a query belongs to: ``zlib.crc32(str(query_id)) % merchants``.

    CRC-32 of the decimal id is fixed across Python versions and machines (unlike
    ``hash()``), and it sends all judgments of one query to the same merchant.
    """
    return zlib.crc32(str(query_id).encode("utf-8")) % merchants


def _esci_queries(path: Path) -> list[dict[str, Any]]:
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of queries, got {type(records).__name__}")
    for index, record in enumerate(records):
        for key in ("query_id", "query", "products"):
            if not isinstance(record, dict) or key not in record:
                raise ValueError(f"{path}: query #{index} has no field {key!r}")
        for number, product in enumerate(record["products"]):
            for key in ("product_id", "product_text", "relevance"):
                if not isinstance(product, dict) or key not in product:
                    raise ValueError(
                        f"{path}: query #{index} (query_id {record['query_id']}), product #{number} "
                        f"has no field {key!r}"
                    )
    return records


def prepare_esci(
    out_dir: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    merchants: int = 4,
    overwrite: bool = False,
    file_format: FileFormat = "parquet",
) -> list[Path]:
    """Write the ESCI subset as ``merchants`` merchants ``esci-0`` ... of judgments only.

    Query ``q`` goes to merchant ``esci_merchant(q.query_id, merchants)``, with all its
    judgments. A merchant's catalogue is every product judged in its queries (title =
    product text; where the source gives one product several titles, which it does for
    products listed in several locales, the first in file order is kept). Each judgment
    becomes a row (query, product_id, label = relevance 0..3), with ``query_id`` kept as an
    extra column for traceability. Merchants that receive no query are not written.
    """
    if merchants < 1:
        raise ValueError(f"merchants {merchants!r} must be >= 1")
    path = Path(source) if source is not None else ESCI_SOURCE
    queries = _esci_queries(path)
    titles: list[dict[str, str]] = [{} for _ in range(merchants)]
    judgments: list[list[dict[str, Any]]] = [[] for _ in range(merchants)]
    retitled: set[str] = set()
    for record in queries:
        index = esci_merchant(record["query_id"], merchants)
        for product in record["products"]:
            product_id = str(product["product_id"])
            title = str(product["product_text"]).strip()
            known = titles[index].setdefault(product_id, title)
            if known != title:
                retitled.add(product_id)
            judgments[index].append(
                {
                    "query": str(record["query"]).strip(),
                    "product_id": product_id,
                    "label": int(product["relevance"]),
                    "query_id": record["query_id"],
                }
            )
    log.info(
        "%s: %d queries, %d judgments into %d merchants; %d products had several titles (first kept)",
        path.name, len(queries), sum(len(rows) for rows in judgments), merchants, len(retitled),
    )
    built = []
    for index in range(merchants):
        if not judgments[index]:
            log.info("merchant esci-%d received no query; not written", index)
            continue
        catalog = pd.DataFrame(
            {"product_id": list(titles[index]), "title": list(titles[index].values())}
        )
        built.append(MerchantData(f"esci-{index}", catalog, None, pd.DataFrame(judgments[index])))
    return _write_all(built, out_dir, file_format=file_format, overwrite=overwrite)


# The bundled datasets a public corpus can be made of (``precondition-corpus = "bundled:NAME"``).
PUBLIC_CORPUS_SOURCES = ("esci", "reviews")


def public_corpus_pairs(source: str) -> list[tuple[str, str]]:
    """Every distinct (context, product) text pair of the bundled ``source`` dataset
    (``PUBLIC_CORPUS_SOURCES``), in file order: public text whose frozen-encoder states set the
    geometry a federation of *other* shops trains its heads in (``precondition-corpus =
    "bundled:esci"``, the utility benchmark's; client.precondition)."""
    import tempfile

    from client.data import build_examples, load_merchant

    if source not in PUBLIC_CORPUS_SOURCES:
        raise ValueError(f"public corpus source {source!r}: expected one of {', '.join(PUBLIC_CORPUS_SOURCES)}")
    prepare = prepare_esci if source == "esci" else prepare_reviews
    pairs: dict[tuple[str, str], None] = {}
    with tempfile.TemporaryDirectory(prefix=f"fedshop-corpus-{source}-") as tmp:
        for folder in prepare(Path(tmp) / source):
            for example in build_examples(load_merchant(folder)):
                pairs[(" ".join(example.context.split()), " ".join(example.product.split()))] = None
    return list(pairs)

