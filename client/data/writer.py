"""Writing the merchant data format, so adapters and generators produce exactly what
``client.data.load_merchant`` reads.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pandas as pd

from client.data.readers import validate_merchant_dir
from client.data.schema import FORMATS, TABLES, DataValidationError, FileFormat, MerchantData


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
