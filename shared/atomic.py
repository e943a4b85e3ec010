"""Whole-file writes: a crash leaves the previous file or none, never half of one.

Every writer here goes the same way: write a temporary file beside the target, fsync it,
rename it over the target (``os.replace``: atomic on POSIX and Windows), then fsync the
folder so that the rename itself survives a power cut. A failure before the rename removes
the temporary file and leaves the target as it was. The cost is two fsyncs per write: fine
for state and reports, wrong for anything written many times a second.

The temporary file is ``<target name>.<random hex>.tmp`` in the target's folder (same file
system, so the rename cannot turn into a copy). A process killed mid-write can leave one
behind; nothing reads it, and whoever owns the folder may delete it. It is created with the
usual permissions (0o666 less the umask), like a file opened for writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends cleanly it becomes ``path``.

    For writers that take a file name (``torch.save``, ``savefig``, ``save_file``): write the
    whole content to the yielded path inside the block. The temporary name ends in ``.tmp``,
    so tell writers that infer the format from the suffix which one to use. If the block
    raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful replace
    fsync_dir(path.parent)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data``, atomically and durably."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` by ``text``, atomically and durably."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_json(path: PathLike, payload: Any, *, indent: int | None = 1) -> None:
    """Replace ``path`` by ``payload`` as JSON (plus a final newline), atomically and durably.

    ``json.dumps`` runs before anything is written: a payload that cannot be serialised
    raises with ``path`` untouched and no temporary file left.
    """
    write_text(path, json.dumps(payload, indent=indent) + "\n")


def torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    import torch  # here, not at the top: the server side uses this module without torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)


def fsync_file(path: PathLike) -> None:
    """Flush ``path``'s contents to disk (whichever descriptor wrote them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Make renames and new entries in folder ``path`` durable.

    Without this a rename may not survive a power cut. POSIX only: elsewhere a folder cannot
    be opened for fsync, and this does nothing.
    """
    if os.name != "posix":
        return
    fsync_file(path)


def _create_temporary(path: Path) -> Path:
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # a name drawn twice: draw again
            continue
        os.close(fd)
        return tmp
