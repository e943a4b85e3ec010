"""Merchant data: the one documented format in which a merchant's data enters fedshop.

A merchant directory holds a ``catalog`` table, and at least one event table:
``interactions`` (impressions, clicks, purchases, ratings) and/or ``judgments`` (graded
query-product relevance). Each table is exactly one ``.csv``, ``.jsonl`` or ``.parquet``
file. The full specification, with examples, is ``docs/data-format.md``; this module is
its reference implementation.

Everything here is strict on purpose: a merchant's node trains unattended under a privacy
budget, so a bad file must be refused before any budget is spent, with every problem named
at once (file, row, field, value), rather than discovered one re-run at a time.

The module also turns validated data into ``shared.tasks.Example`` records
(``build_examples``), splits them deterministically (``split_examples``), and writes the
format (``write_merchant``) so that adapters and generators produce exactly what
``load_merchant`` reads.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shared.tasks import TASKS, Example, group_records

logger = logging.getLogger(__name__)

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


def _looks_like(head: bytes) -> str:
    """A guess at what a file really is, from its first bytes, for error messages."""
    if head.startswith(_PARQUET_MAGIC):
        return "a Parquet file"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:1] in (b"{", b"["):
        return "JSON text"
    if not stripped:
        return "empty"
    try:
        stripped.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    return "CSV or other text"


def _read_csv(path: Path, problems: list[Problem]) -> _RawTable | None:
    name = path.name
    data = path.read_bytes()
    kind = _looks_like(data[:64])
    if kind in ("a Parquet file", "JSON text"):
        problems.append(Problem(name, None, None, f"is {kind}, not CSV; name it after its real format"))
        return None
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header: list[str] | None = None
        for record in reader:
            if record:
                header = [cell.strip() for cell in record]
                break
        if header is None:
            problems.append(Problem(name, None, None, "is empty: expected a header row"))
            return None
        if _header_problems(name, header, problems):
            return None
        columns: dict[str, list[Any]] = {column: [] for column in header}
        rows: list[int] = []
        row = unreadable = 0
        for record in reader:
            if not record:  # a blank line is not a data row
                continue
            row += 1
            if len(record) != len(header):
                problems.append(
                    Problem(name, row, None, f"has {len(record)} fields but the header has {len(header)}")
                )
                unreadable += 1
                continue
            for column, cell in zip(header, record, strict=True):
                columns[column].append(cell)
            rows.append(row)
    except csv.Error as error:
        problems.append(Problem(name, None, None, f"is not valid CSV near line {reader.line_num}: {error}"))
        return None
    return _RawTable(name, columns, rows, unreadable)


def _header_problems(name: str, header: Sequence[str], problems: list[Problem]) -> bool:
    """Report unusable column names; True when the file cannot be read further."""
    found = False
    for column in header:
        if _UNDECODABLE.search(column):
            shown = _show(column.encode("utf-8", errors="surrogateescape"))
            problems.append(Problem(name, None, None, f"column name {shown} is not valid UTF-8"))
            found = True
    duplicated = sorted(c for c, n in collections.Counter(header).items() if n > 1)
    if duplicated:
        problems.append(
            Problem(name, None, None, f"repeats column name(s) {duplicated}; names must be unique")
        )
        found = True
    return found


def _read_jsonl(path: Path, problems: list[Problem]) -> _RawTable | None:
    name = path.name
    data = path.read_bytes()
    kind = _looks_like(data[:64])
    if kind == "a Parquet file":
        problems.append(
            Problem(name, None, None, f"is {kind}, not JSON Lines; name it after its real format")
        )
        return None
    text = data.decode("utf-8-sig", errors="surrogateescape")
    records: list[tuple[int, dict[str, Any]]] = []
    broken: list[Problem] = []
    # split("\n") rather than splitlines(): JSON text may legally contain U+2028 and other
    # characters that splitlines() treats as line ends.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            broken.append(
                Problem(name, line_number, None, f"line {line_number} is not valid JSON: {error.msg} "
                        f"(column {error.colno})")
            )
            continue
        if not isinstance(value, dict):
            broken.append(
                Problem(name, line_number, None,
                        f"line {line_number} is a JSON {type(value).__name__}, not an object")
            )
            continue
        records.append((line_number, value))
    if broken and not records:
        # Nothing parses: the whole file is something else (often CSV); one problem says
        # so better than one per line.
        problems.append(
            Problem(name, None, None, f"is not JSON Lines ({kind}): no line holds a JSON object; "
                    f"first failure: {broken[0].message}")
        )
        return None
    problems.extend(broken)
    names: dict[str, None] = {}  # ordered set: columns in order of first appearance
    for _, record in records:
        names.update(dict.fromkeys(record))
    columns = {column: [record.get(column) for _, record in records] for column in names}
    return _RawTable(name, columns, [line_number for line_number, _ in records], len(broken))


def _read_parquet(path: Path, problems: list[Problem]) -> _RawTable | None:
    name = path.name
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head.startswith(_PARQUET_MAGIC):
        problems.append(
            Problem(name, None, None, f"is not a Parquet file (it is {_looks_like(head)}); "
                    "name it after its real format")
        )
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as error:
        problems.append(Problem(name, None, None, f"cannot be read as Parquet: {error}"))
        return None
    if _header_problems(name, table.column_names, problems):
        return None
    columns = {column: table.column(column).to_pylist() for column in table.column_names}
    return _RawTable(name, columns, list(range(1, table.num_rows + 1)))


_READERS: dict[str, Callable[[Path, list[Problem]], _RawTable | None]] = {
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


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


def _find_tables(directory: Path, problems: list[Problem]) -> tuple[dict[str, Path], set[str]]:
    """The file of each table present, and the tables whose files are ambiguous or unusable."""
    files: dict[str, Path] = {}
    spoiled: set[str] = set()
    for table in TABLES:
        found = [directory / f"{table}.{ext}" for ext in FORMATS if (directory / f"{table}.{ext}").is_file()]
        supported = {path.name for path in found}
        others = sorted(p.name for p in directory.glob(f"{table}.*") if p.name not in supported)
        for other in others:
            problems.append(
                Problem(other, None, None, f"is not a supported table file; use {table}.csv, {table}.jsonl "
                        f"or {table}.parquet")
            )
            spoiled.add(table)
        if len(found) > 1:
            extra = ", ".join(path.name for path in found[1:])
            message = f"is also present as {extra}; keep exactly one file per table"
            problems.append(Problem(found[0].name, None, None, message))
            spoiled.add(table)
        elif found and not others:
            files[table] = found[0]
    return files, spoiled


def _inspect(path: str | os.PathLike[str]) -> tuple[list[Problem], dict[str, _CheckedTable]]:
    directory = Path(path)
    if not directory.exists():
        return [Problem(str(directory), None, None, "merchant directory does not exist")], {}
    if not directory.is_dir():
        return [Problem(str(directory), None, None, "is not a directory")], {}
    problems: list[Problem] = []
    files, spoiled = _find_tables(directory, problems)
    if "catalog" not in files and "catalog" not in spoiled:
        problems.append(
            Problem("catalog.{csv,jsonl,parquet}", None, None, "is missing; every merchant needs a catalog")
        )
    if not {"interactions", "judgments"} & (set(files) | spoiled):
        problems.append(
            Problem(directory.resolve().name, None, None,
                    "has no event table: add interactions.{csv,jsonl,parquet} and/or "
                    "judgments.{csv,jsonl,parquet}")
        )
    checked: dict[str, _CheckedTable] = {}
    for table in TABLES:  # catalog first: the event tables' product ids are checked against it
        if table not in files:
            continue
        file = files[table]
        try:
            raw = _READERS[file.suffix[1:]](file, problems)
        except OSError as error:
            problems.append(Problem(file.name, None, None, f"cannot be read: {error}"))
            continue
        if raw is None:
            continue
        checked[table] = _check_table(table, raw, problems, catalog=checked.get("catalog"))
    return problems, checked


def validate_merchant_dir(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem with a merchant directory (empty list = loadable). Reads, never writes."""
    problems, _ = _inspect(path)
    return problems


def _frame(table: str, checked: _CheckedTable) -> pd.DataFrame:
    count = len(checked.rows)
    columns: dict[str, pd.Series] = {}
    for column in _SCHEMAS[table]:
        values = checked.values.get(column.name, [None] * count)
        if column.kind in ("id", "text", "event"):
            columns[column.name] = pd.Series(["" if v is None else v for v in values], dtype=str)
        elif column.kind == "grade":
            columns[column.name] = pd.Series(values, dtype="int64")
        else:
            columns[column.name] = pd.Series([math.nan if v is None else v for v in values], dtype="float64")
    return pd.DataFrame(columns)


def load_merchant(path: str | os.PathLike[str]) -> MerchantData:
    """Validate and load one merchant directory; raises DataValidationError listing every problem."""
    directory = Path(path)
    problems, checked = _inspect(directory)
    if problems:
        raise DataValidationError(problems, source=str(directory))
    data = MerchantData(
        merchant_id=directory.resolve().name,
        catalog=_frame("catalog", checked["catalog"]),
        interactions=_frame("interactions", checked["interactions"]) if "interactions" in checked else None,
        judgments=_frame("judgments", checked["judgments"]) if "judgments" in checked else None,
    )
    logger.debug(
        "loaded merchant %s: %d products, %s interactions, %s judgments", data.merchant_id, len(data.catalog),
        "no" if data.interactions is None else len(data.interactions),
        "no" if data.judgments is None else len(data.judgments),
    )
    return data


# --------------------------------------------------------------------------- examples
def load_table(path: str | os.PathLike[str], table: str) -> pd.DataFrame:
    """One table file on its own (a catalogue to rank, a user's history), checked as in a folder.

    Cross-table checks (product ids against a catalogue) are the caller's: a lone file has
    no catalogue beside it.
    """
    file = Path(path)
    if table not in _SCHEMAS:
        raise ValueError(f"unknown table {table!r}; one of {', '.join(_SCHEMAS)}")
    if not file.is_file():
        raise DataValidationError([Problem(str(file), None, None, "file does not exist")], source=str(file))
    readers = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}
    reader = readers.get(file.suffix.lstrip(".").lower())
    if reader is None:
        message = f"unsupported extension {file.suffix!r}; use .csv, .jsonl or .parquet"
        raise DataValidationError([Problem(file.name, None, None, message)], source=str(file))
    problems: list[Problem] = []
    raw = reader(file, problems)
    checked = _check_table(table, raw, problems, catalog=None) if raw is not None else None
    if problems or checked is None:
        raise DataValidationError(problems, source=str(file))
    return _frame(table, checked)


def product_text(title: str, *, category: str = "", brand: str = "", description: str = "") -> str:
    """The text a model reads for a product: title | category | brand | description.

    Missing parts are skipped; nothing is truncated here (the tokenizer truncates to the
    model's sequence length, so the most informative part goes first).
    """
    parts = (title, category, brand, description)
    return PRODUCT_TEXT_SEPARATOR.join(part for part in parts if part)


def _history_contexts(interactions: pd.DataFrame, titles: dict[str, str], history_length: int) -> list[str]:
    """For each interaction row: the titles of the same user's previous interactions.

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
    if history_length == 0:
        return contexts
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
    return contexts


def build_examples(
    data: MerchantData,
    *,
    conversion_label: str = "purchase",
    history_length: int = 3,
    tasks: tuple[str, ...] = TASKS,
) -> list[Example]:
    """Turn one merchant's tables into task examples, in file order.

    Interactions give a ``ctr`` example per row (target 1.0 when the row's label counts as a
    conversion) and a ``rating`` example per row that has a rating; judgments give a
    ``relevance`` example per row. Each example names its row (``record``): the trainer
    trains a row's examples as one sample, the split keeps them on one side. The context of
    an interaction is its query, else the user's recent product titles, else empty; a
    judgment's context is its query.
    """
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
        history = _history_contexts(frame, titles, history_length)
        rows = zip(
            frame["user_id"], frame["product_id"], frame["label"], frame["query"], frame["rating"], history,
            strict=True,
        )
        for row, (user, product_id, label, query, rating, recent) in enumerate(rows):
            context = query or recent
            product = texts[product_id]
            record = f"{data.merchant_id}/interaction:{row}"
            if wants_ctr:
                target = 1.0 if label in converted else 0.0
                examples.append(Example("ctr", context, product, target, group=user, product_id=product_id,
                                        record=record))
            if wants_rating and not math.isnan(rating):
                examples.append(Example("rating", context, product, float(rating), group=user,
                                        product_id=product_id, record=record))
    if data.judgments is not None and "relevance" in tasks:
        frame = data.judgments
        rows_j = zip(frame["query"], frame["product_id"], frame["label"], strict=True)
        for row, (query, product_id, grade) in enumerate(rows_j):
            product = texts[product_id]
            examples.append(Example("relevance", query, product, float(grade), group=query, product_id=product_id,
                                    record=f"{data.merchant_id}/judgment:{row}"))
    return examples


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


# --------------------------------------------------------------------------- writing
def check_output_dir(out_dir: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Create ``out_dir`` if needed; refuse a non-empty one unless ``overwrite``.

    ``overwrite`` lets writers replace the merchant directories they write; other entries
    in ``out_dir`` are left alone (deleting a user's files is never implied).
    """
    directory = Path(out_dir)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"output path {directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {directory} is not empty; choose an empty one or pass overwrite=True "
            "to replace the merchant directories written there"
        )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _write_table(frame: pd.DataFrame, path: Path, file_format: FileFormat) -> None:
    if file_format == "csv":
        frame.to_csv(path, index=False)  # NaN -> empty cell, which the reader takes as missing
    elif file_format == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False, double_precision=15)
    else:
        frame.to_parquet(path, index=False)


def _is_table_file(name: str) -> bool:
    return any(name.startswith(f"{table}.") for table in TABLES)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging``, carrying over ``target``'s non-table entries.

    Directory renames, so readers see the old tables or the new ones, never a mix. On
    failure everything is put back where it was before re-raising.
    """
    retired = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    target.rename(retired)
    try:
        for entry in list(retired.iterdir()):
            if not _is_table_file(entry.name):
                entry.rename(staging / entry.name)
        staging.rename(target)
    except BaseException:
        for entry in list(staging.iterdir()):
            if not _is_table_file(entry.name):
                entry.rename(retired / entry.name)
        retired.rename(target)
        raise
    shutil.rmtree(retired)  # only the old table files are left in it


def write_merchant(
    data: MerchantData,
    out_dir: str | os.PathLike[str],
    *,
    file_format: FileFormat = "parquet",
    overwrite: bool = False,
) -> Path:
    """Write ``data`` as the merchant directory ``out_dir/<merchant_id>``, atomically.

    Files go into a hidden temporary sibling, are validated there, and the directory is
    renamed into place only if valid; a failure at any point leaves no partial merchant.
    ``overwrite`` replaces the table files of an existing merchant directory and keeps
    everything else in it (a deployed node keeps its privacy state in ``.fedshop/`` there,
    and regenerating data must never erase what was spent).
    """
    merchant_id = data.merchant_id
    if not merchant_id or merchant_id.startswith(".") or any(sep in merchant_id for sep in ("/", "\\")):
        raise ValueError(f"merchant_id {merchant_id!r} cannot be a directory name (empty, hidden or a path)")
    if file_format not in FORMATS:
        raise ValueError(f"file_format {file_format!r} must be one of {list(FORMATS)}")
    parent = Path(out_dir)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / merchant_id
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"merchant directory {target} already exists; pass overwrite=True to replace it"
        )
    staging = parent / f".{merchant_id}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        tables = {"catalog": data.catalog, "interactions": data.interactions, "judgments": data.judgments}
        for table, frame in tables.items():
            if frame is not None:
                _write_table(frame, staging / f"{table}.{file_format}", file_format)
        problems = validate_merchant_dir(staging)
        if problems:
            raise DataValidationError(problems, source=f"merchant {merchant_id!r} as written")
        if target.exists():
            _swap_in(staging, target)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
