"""Merchant data: the one documented format in which a merchant's data enters fedshop.

A merchant directory holds a ``catalog`` table, and at least one event table:
``interactions`` (impressions, clicks, purchases, ratings) and/or ``judgments`` (graded
query-product relevance). Each table is exactly one ``.csv``, ``.jsonl`` or ``.parquet``
file; the full specification is ``docs/data-format.md``.

The rooms, in the order data flows through them: ``schema`` (tables, columns, cell checks),
``readers`` (files -> validated frames), ``examples`` (frames -> task examples), ``split``
(the deterministic train/test split) and ``writer`` (frames -> the format, for adapters and
generators). This package re-exports their public names.
"""

from client.data.examples import build_examples, product_text, supported_tasks
from client.data.readers import load_merchant, load_table, validate_merchant_dir
from client.data.schema import (
    CONVERSION_LABELS,
    EVENT_LABELS,
    FORMATS,
    GRADE_RANGE,
    HISTORY_SEPARATOR,
    PRODUCT_TEXT_SEPARATOR,
    RATING_RANGE,
    TABLES,
    DataValidationError,
    FileFormat,
    MerchantData,
    Problem,
)
from client.data.split import split_examples
from client.data.writer import check_output_dir, write_merchant

__all__ = [
    "CONVERSION_LABELS", "EVENT_LABELS", "FORMATS", "GRADE_RANGE", "HISTORY_SEPARATOR", "PRODUCT_TEXT_SEPARATOR",
    "RATING_RANGE", "TABLES", "DataValidationError", "FileFormat", "MerchantData", "Problem", "build_examples",
    "check_output_dir", "load_merchant", "load_table", "product_text", "split_examples", "supported_tasks",
    "validate_merchant_dir",
    "write_merchant",
]
