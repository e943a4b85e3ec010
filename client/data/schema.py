"""The merchant data format's schema: tables, columns, cell values and the checks that
refuse bad data with every problem named (file, row, field, value).

The full specification, with examples, is ``docs/data-format.md``; this module and
``client.data.readers`` are its reference implementation. Everything here is strict on
purpose: a merchant's node trains unattended under a privacy budget, so a bad file must be
refused before any budget is spent, with every problem named at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pandas as pd

FileFormat = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[FileFormat, ...] = ("csv", "jsonl", "parquet")
TABLES: tuple[str, ...] = ("catalog", "interactions", "judgments")
EVENT_LABELS: tuple[str, ...] = ("impression", "click", "purchase")
CONVERSION_LABELS: dict[str, frozenset[str]] = {
    "purchase": frozenset({"purchase"}),
    "click": frozenset({"click", "purchase"}),
}
RATING_RANGE = (1.0, 5.0)
GRADE_RANGE = (0, 3)
PRODUCT_TEXT_SEPARATOR = " | "
HISTORY_SEPARATOR = " ; "
MAX_LISTED_PROBLEMS = 50  # in an exception message; ``.problems`` always holds all of them

_PARQUET_MAGIC = b"PAR1"
# Bytes that are not UTF-8 are decoded with "surrogateescape", which maps each bad byte to
# one lone surrogate; finding those per cell lets a problem name the exact row and field.
_UNDECODABLE = re.compile("[\udc80-\udcff]")



# --------------------------------------------------------------------------- problems
@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a merchant directory, located as precisely as possible.

    ``row`` is the 1-based data row (the CSV header is not counted; JSON Lines rows are
    numbered by line), ``None`` for a problem with the whole file or directory.
    """

    file: str
    row: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} row {self.row}"
        if self.field is not None:
            where += f", field {self.field!r}"
        return f"{where}: {self.message}"


class DataValidationError(ValueError):
    """Merchant data that fedshop refuses to use; ``.problems`` lists every reason."""

    def __init__(self, problems: Sequence[Problem], *, source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        listed = [f"  - {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            listed.append(f"  ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
        where = f" in {source}" if source else ""
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{count}{where}:\n" + "\n".join(listed))


# --------------------------------------------------------------------------- schema
_Kind = Literal["id", "text", "price", "rating", "grade", "event", "timestamp"]


@dataclasses.dataclass(frozen=True)
class _Column:
    name: str
    kind: _Kind
    required: bool  # the column must exist and every row must hold a value


_SCHEMAS: dict[str, tuple[_Column, ...]] = {
    "catalog": (
        _Column("product_id", "id", True),
        _Column("title", "text", True),
        _Column("description", "text", False),
        _Column("category", "text", False),
        _Column("brand", "text", False),
        _Column("price", "price", False),
    ),
    "interactions": (
        _Column("user_id", "id", True),
        _Column("product_id", "id", True),
        _Column("label", "event", True),
        _Column("query", "text", False),
        _Column("rating", "rating", False),
        _Column("timestamp", "timestamp", False),
    ),
    "judgments": (
        _Column("query", "text", True),
        _Column("product_id", "id", True),
        _Column("label", "grade", True),
    ),
}


# --------------------------------------------------------------------------- loaded data
# eq=False: the fields are DataFrames, whose == is elementwise, so a generated __eq__
# would raise instead of answering; compare frames with pandas' own tools.
@dataclasses.dataclass(frozen=True, eq=False)
class MerchantData:
    """One merchant's tables.

    As ``load_merchant`` returns them: every schema column is present, in schema order,
    unknown columns dropped; missing optional text is ``""`` and missing numbers are NaN;
    ``timestamp`` is seconds since the Unix epoch (UTC); row order is file order. Data given
    to ``write_merchant`` may omit optional columns and carry extra ones.
    """

    merchant_id: str
    catalog: pd.DataFrame
    interactions: pd.DataFrame | None
    judgments: pd.DataFrame | None


# --------------------------------------------------------------------------- reading files
@dataclasses.dataclass
class _RawTable:
    file: str
    columns: dict[str, list[Any]]  # column name -> raw cell values (None = absent)
    rows: list[int]  # the row number each record is reported under
    unreadable_rows: int = 0  # rows already reported as malformed and left out



def _show(value: Any) -> str:
    """A value as a problem message quotes it: repr, shortened, bad bytes visible."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."



# --------------------------------------------------------------------------- cell values
class _Bad(Exception):
    """One cell's value is unusable; the message completes 'field X: <message>'."""


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str:
    if isinstance(value, bytes):  # a Parquet BINARY column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{_show(value)} is not valid UTF-8 text") from None
    if not isinstance(value, str):
        raise _Bad(f"{_show(value)} is not text ({type(value).__name__})")
    if _UNDECODABLE.search(value):
        shown = value.encode("utf-8", errors="surrogateescape")
        raise _Bad(f"{_show(shown)} is not valid UTF-8 text")
    return value.strip()


def _identifier(value: Any) -> str:
    # Integer ids are common in Parquet and JSON exports; their decimal form is the id, so
    # 42 in one table matches "42" in another.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value)


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise _Bad(f"{_show(value)} is not a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Bad(f"{_show(value)} is not a number") from None
    else:
        raise _Bad(f"{_show(value)} is not a number ({type(value).__name__})")
    if not math.isfinite(number):
        raise _Bad(f"{_show(value)} is not a finite number")
    return number


def _price(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise _Bad(f"{_show(value)} is negative; a price must be >= 0")
    return number


def _rating(value: Any) -> float:
    number = _number(value)
    low, high = RATING_RANGE
    if not low <= number <= high:
        raise _Bad(f"{_show(value)} is outside the rating range {low:g}..{high:g}")
    return number


def _grade(value: Any) -> int:
    try:
        number = _number(value)
    except _Bad:
        raise _Bad(f"{_show(value)} is not an integer grade {GRADE_RANGE[0]}..{GRADE_RANGE[1]}") from None
    low, high = GRADE_RANGE
    if not number.is_integer() or not low <= number <= high:
        raise _Bad(f"{_show(value)} is not an integer grade {low}..{high}")
    return int(number)


def _event(value: Any) -> str:
    if isinstance(value, str) and value.strip() in EVENT_LABELS:
        return value.strip()
    raise _Bad(f"{_show(value)} is not one of {', '.join(EVENT_LABELS)}")


def _timestamp(value: Any) -> float:
    if isinstance(value, dt.datetime):  # a Parquet timestamp column
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            return _number(value)
        except _Bad:
            pass
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise _Bad(f"{_show(value)} is neither an ISO-8601 time nor an epoch number") from None
    else:
        return _number(value)
    if moment.tzinfo is None:  # naive times are read as UTC, so ordering never depends on the host
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


_PARSERS: dict[_Kind, Callable[[Any], Any]] = {
    "id": _identifier,
    "text": _text,
    "price": _price,
    "rating": _rating,
    "grade": _grade,
    "event": _event,
    "timestamp": _timestamp,
}


# --------------------------------------------------------------------------- validation
@dataclasses.dataclass
class _CheckedTable:
    file: str
    values: dict[str, list[Any]]  # schema column -> parsed values (None = missing or invalid)
    rows: list[int]
    complete: bool  # every row of the file was readable


def _check_table(
    table: str, raw: _RawTable, problems: list[Problem], *, catalog: _CheckedTable | None
) -> _CheckedTable:
    """Parse every schema column of one table, reporting each bad cell and missing column."""
    found: list[Problem] = []
    if not raw.rows and not raw.unreadable_rows:
        found.append(Problem(raw.file, None, None, "has no data rows"))
    values: dict[str, list[Any]] = {}
    for column in _SCHEMAS[table]:
        cells = raw.columns.get(column.name)
        if cells is None:
            if column.required:
                found.append(
                    Problem(raw.file, None, column.name,
                            f"required column is missing (columns found: {', '.join(raw.columns) or 'none'})")
                )
            continue
        parse = _PARSERS[column.kind]
        parsed: list[Any] = []
        for row, cell in zip(raw.rows, cells, strict=True):
            try:
                value = None if _is_missing(cell) else parse(cell)
            except _Bad as bad:
                found.append(Problem(raw.file, row, column.name, str(bad)))
                parsed.append(None)
                continue
            if value is None or value == "":
                if column.required:
                    found.append(Problem(raw.file, row, column.name, "is empty; a value is required"))
                value = None
            parsed.append(value)
        values[column.name] = parsed
    checked = _CheckedTable(raw.file, values, raw.rows, complete=not raw.unreadable_rows)
    if table == "catalog" and "product_id" in values:
        first_row: dict[str, int] = {}
        for row, product_id in zip(raw.rows, values["product_id"], strict=True):
            if product_id is None:
                continue
            if product_id in first_row:
                found.append(
                    Problem(raw.file, row, "product_id",
                            f"{_show(product_id)} is a duplicate (first at row {first_row[product_id]})")
                )
            else:
                first_row[product_id] = row
    elif table != "catalog" and catalog is not None and catalog.complete and "product_id" in catalog.values:
        # Only against a catalog read in full: rows left out as malformed would otherwise
        # turn into a flood of false "not in catalog" problems.
        known = {product_id for product_id in catalog.values["product_id"] if product_id is not None}
        for row, product_id in zip(raw.rows, values.get("product_id", []), strict=False):
            if product_id is not None and product_id not in known:
                message = f"{_show(product_id)} is not in {catalog.file}"
                found.append(Problem(raw.file, row, "product_id", message))
    order = {column.name: i for i, column in enumerate(_SCHEMAS[table])}
    found.sort(key=lambda p: (p.row is not None, p.row or 0, order.get(p.field or "", -1)))
    problems.extend(found)
    return checked


