"""Reading a merchant directory (CSV, JSON Lines or Parquet tables) into checked frames.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from client.data.schema import (
    _PARQUET_MAGIC,
    _SCHEMAS,
    _UNDECODABLE,
    FORMATS,
    TABLES,
    DataValidationError,
    MerchantData,
    Problem,
    _check_table,
    _CheckedTable,
    _RawTable,
    _show,
)

log = logging.getLogger(__name__)


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
    log.debug(
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

