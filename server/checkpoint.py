"""Round checkpoints: the global trainable parameters, the run config and the round, saved atomically.

Layout under ``RUN_DIR/checkpoints/``::

    round-0007/                  one complete checkpoint
        parameters.safetensors   global trainable parameters
        extra_arrays.safetensors strategy state as arrays (e.g. FedAdam moments)
        checkpoint.json          round, config, extra (JSON), array names in order, sha256s
        COMPLETE                 written and fsynced last: a dir without it is not a checkpoint
    round-0008.tmp-<pid>/        a save in progress (or a crashed one): always ignored
    LATEST                       the round number of the newest committed checkpoint

A save writes everything into the ``.tmp-<pid>`` dir, fsyncs it, renames it into place with
``os.replace`` and only then rewrites ``LATEST`` (``shared.atomic``: temp file + rename). Updating
``LATEST`` is the commit point: a crash at any moment leaves either the previous checkpoint
or the new one, never a torn one.

Safetensors stores arrays in its own order, so the original key order — which a caller may
rely on to rebuild Flower's ordered array lists — is kept in ``checkpoint.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from shared import atomic
from shared.run_files import CHECKPOINTS_DIR

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST_FILE = "LATEST"
COMPLETE_FILE = "COMPLETE"
MANIFEST_FILE = "checkpoint.json"
PARAMETERS_FILE = "parameters.safetensors"
EXTRA_ARRAYS_FILE = "extra_arrays.safetensors"

_ROUND_DIR = re.compile(r"^round-(\d+)$")
# Leftovers of interrupted saves: the temp dir being written, a replaced dir set aside, or
# shared.atomic's temporary file for LATEST.
_LEFTOVER = re.compile(r"^(?:round-\d+\.(?:tmp|old)-\d+|LATEST\.[0-9a-f]+\.tmp)$")

ConfigValue = bool | int | float | str


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, corrupt or from a newer format."""


# eq=False: comparing dicts of arrays with == raises ("truth value of an array is
# ambiguous"); compare fields explicitly instead.
@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    round: int
    parameters: dict[str, np.ndarray]
    config: dict[str, ConfigValue]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON: tuples come back as lists
    extra_arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def round_dir_name(round_: int) -> str:
    return f"round-{round_:04d}"


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


# ---------------------------------------------------------------------------- saving
def save_checkpoint(run_dir: str | os.PathLike[str], checkpoint: Checkpoint, *, keep_last: int = 3) -> Path:
    """Save ``checkpoint`` atomically, point ``LATEST`` at it and prune old rounds.

    Returns the checkpoint's directory. Re-saving a round replaces it. Pruning keeps the
    ``keep_last`` highest complete rounds and never the one ``LATEST`` names.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    _validate(checkpoint)
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)

    name = round_dir_name(checkpoint.round)
    final = root / name
    tmp = root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_round_dir(tmp, checkpoint)
        if final.exists():
            # os.replace cannot replace a non-empty directory: set the old one aside first.
            # A crash in between leaves no dir for this round; LATEST then names a missing
            # dir and load_latest falls back to the previous round.
            aside = root / f"{name}.old-{os.getpid()}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.fsync_dir(root)  # makes the rename durable before LATEST can name it

    atomic.write_text(root / LATEST_FILE, f"{checkpoint.round}\n")
    log.info("checkpoint: saved round %d to %s", checkpoint.round, final)
    _prune(root, keep_last=keep_last, latest=checkpoint.round)
    return final


def _validate(checkpoint: Checkpoint) -> None:
    if isinstance(checkpoint.round, bool) or not isinstance(checkpoint.round, int) or checkpoint.round < 0:
        raise ValueError(f"checkpoint round must be an int >= 0, got {checkpoint.round!r}")
    for key, value in checkpoint.config.items():
        if not isinstance(value, bool | int | float | str):
            raise TypeError(
                f"config {key!r} must be a scalar (bool, int, float, str), got {type(value).__name__}"
            )
    for what, arrays in (("parameters", checkpoint.parameters), ("extra_arrays", checkpoint.extra_arrays)):
        for key, array in arrays.items():
            if not isinstance(key, str) or not isinstance(array, np.ndarray):
                raise TypeError(f"{what} must map str to numpy arrays; {key!r} is {type(array).__name__}")


def _write_round_dir(directory: Path, checkpoint: Checkpoint) -> None:
    files = {PARAMETERS_FILE: checkpoint.parameters, EXTRA_ARRAYS_FILE: checkpoint.extra_arrays}
    digests: dict[str, str] = {}
    for filename, arrays in files.items():
        path = directory / filename
        save_file(dict(arrays), str(path))
        atomic.fsync_file(path)
        digests[filename] = _sha256(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "round": checkpoint.round,
        "config": checkpoint.config,
        "extra": checkpoint.extra,
        "parameter_names": list(checkpoint.parameters),
        "extra_array_names": list(checkpoint.extra_arrays),
        "sha256": digests,
    }
    _write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    # Last, after everything else is on disk: its presence is what "complete" means.
    _write_text(directory / COMPLETE_FILE, f"{checkpoint.round}\n")
    atomic.fsync_dir(directory)


def _prune(root: Path, *, keep_last: int, latest: int) -> None:
    complete = _complete_rounds(root)
    keep = set(complete[-keep_last:]) | {latest}
    for round_ in complete:
        if round_ not in keep:
            shutil.rmtree(root / round_dir_name(round_), ignore_errors=True)
            log.debug("checkpoint: pruned round %d", round_)


def _remove_leftovers(root: Path) -> None:
    # One server writes one run dir, so any temp or set-aside dir here is from a save that
    # crashed; it is never read, only wasting disk.
    for entry in root.iterdir():
        if _LEFTOVER.match(entry.name):
            log.info("checkpoint: removing leftover %s from an interrupted save", entry.name)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- loading
def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[int]:
    """Rounds with a complete checkpoint, ascending."""
    root = checkpoints_dir(run_dir)
    return _complete_rounds(root) if root.is_dir() else []


def load_latest(run_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """The checkpoint ``LATEST`` names; else the highest complete round that loads; else None.

    A checkpoint that fails to load (corrupt, unreadable) is skipped with a warning and the
    next older complete one is tried.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted(_complete_rounds(root), reverse=True)
    latest = _read_latest(root)
    if latest is not None:
        if latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        else:
            log.warning("checkpoint: LATEST names round %d, which has no complete checkpoint", latest)
    for round_ in candidates:
        try:
            return load_checkpoint(root / round_dir_name(round_))
        # A malformed manifest surfaces as KeyError/TypeError; all of these mean "unusable".
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("checkpoint: skipping round %d: %s", round_, exc)
    return None


def load_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """Load one round directory; raise :class:`CheckpointError` unless it is complete and intact."""
    directory = Path(directory)
    if not (directory / COMPLETE_FILE).is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {COMPLETE_FILE} marker)")
    manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint format {version!r}; this fedshop reads {FORMAT_VERSION}"
        )
    match = _ROUND_DIR.match(directory.name)
    if match and int(match.group(1)) != manifest["round"]:
        raise CheckpointError(f"{directory} holds round {manifest['round']}, not the round its name says")

    arrays: list[dict[str, np.ndarray]] = []
    for filename, names_key in (
        (PARAMETERS_FILE, "parameter_names"),
        (EXTRA_ARRAYS_FILE, "extra_array_names"),
    ):
        path = directory / filename
        digest = _sha256(path)
        if digest != manifest["sha256"][filename]:
            raise CheckpointError(f"{path} does not match its recorded sha256 (corrupt)")
        loaded = load_file(str(path))
        names = manifest[names_key]
        if set(names) != set(loaded):
            raise CheckpointError(f"{path} holds {sorted(loaded)}, manifest lists {sorted(names)}")
        arrays.append({name: loaded[name] for name in names})  # restore the saved key order

    return Checkpoint(
        round=manifest["round"],
        parameters=arrays[0],
        config=manifest["config"],
        extra=manifest["extra"],
        extra_arrays=arrays[1],
    )


def _complete_rounds(root: Path) -> list[int]:
    rounds = []
    for entry in root.iterdir():
        match = _ROUND_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / COMPLETE_FILE).is_file():
            rounds.append(int(match.group(1)))
    return sorted(rounds)


def _read_latest(root: Path) -> int | None:
    path = root / LATEST_FILE
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning(
            "checkpoint: unreadable %s (%s); falling back to the highest complete round", path, exc
        )
        return None


# ---------------------------------------------------------------------------- file helpers
def _write_text(path: Path, text: str) -> None:
    # Inside the temporary round dir: not atomic by itself, the dir's rename is.
    path.write_text(text, encoding="utf-8")
    atomic.fsync_file(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
