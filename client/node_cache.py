"""What a node keeps in memory from one call to the next, in the process that serves it.

A simulated node's ClientApp runs in a long-lived worker (one Ray actor serves every merchant in
turn), a deployed node's in its long-lived serving process (client.warm), and each round's
calls would otherwise re-read and re-validate the merchant's folder and re-load the encoder: at
the default scenario's sizes that is most of a round's time once the records are encoded.
Three things are kept:

- a merchant's validated split (``split``), keyed by its folder's files (path, size and a
  digest of the bytes of every file outside the node's state folder) and the run config, so a
  changed, added or removed file is read afresh at the next call;
- the encoder's tokenizer (``tokenizer``), keyed by the encoder folder's files;
- with a frozen encoder (``trainable = heads``), the encoder itself (``model``), shared by every
  model built around it: nothing trains it, nothing sends it, and its digest
  (``client.features.freeze``) is then computed once instead of at every cache lookup. Its key
  holds the encoder folder's files too. Every other trainable set builds a fresh model per call.

All are bounded, and all hold only what the node's own calls read: nothing here leaves the node
or outlives its process. Callers treat what they get as read-only.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import features
from shared.model import TINY, FedShopModel, ModelSpec, build_model, load_encoder, load_tokenizer, resolve_encoder

T = TypeVar("T")


MAX_SPLITS = 16  # merchants a worker keeps the split of (a simulation's workers serve them all)
MAX_ENCODERS = 2


class Bounded:
    """A small least-recently-used map, safe to share between a worker's threads (also
    ``client.precondition``'s fitted corpora)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[no-any-return]
        value = make()  # outside the lock: loading may take seconds; a race only loads twice
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_SPLITS = Bounded(MAX_SPLITS)
_ENCODERS = Bounded(MAX_ENCODERS)
_TOKENIZERS = Bounded(MAX_ENCODERS)


def files_key(folder: Path, *, contents: bool = False) -> tuple[tuple[str, int, int | str], ...]:
    """Every file under ``folder`` (relative path, size, and its modification time in ns or,
    with ``contents``, a digest of its bytes), hidden folders (a node's ``.fedshop`` state, which
    changes at every call) left out. Contents for a merchant's data: a file rewritten within the
    file system's timestamp granularity keeps its time; reading it costs far less than
    validating it."""
    entries: list[tuple[str, int, int | str]] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            try:
                stat = path.stat()
                mark: int | str = hashlib.sha256(path.read_bytes()).hexdigest() if contents else stat.st_mtime_ns
            except FileNotFoundError:  # removed while walking: the next call sees the new set
                continue
            entries.append((str(path.relative_to(folder)), stat.st_size, mark))
    return tuple(entries)


def split(source: Hashable, data_dir: Path | None, config: Hashable, make: Callable[[], T]) -> T:
    """``make()``'s result (a merchant's validated split), reused while ``data_dir``'s files and
    ``config`` stay the same. ``source`` names the merchant (a folder, or a generated merchant's
    index and seed); ``data_dir`` None: nothing on disk to watch (generated merchants)."""
    watched = files_key(data_dir, contents=True) if data_dir is not None else ()
    return _SPLITS.get((source, watched, config), make)


def _encoder_key(spec: ModelSpec) -> Hashable:
    if spec.encoder == TINY:  # generated from the seed: nothing on disk
        return (TINY, spec.seed)
    folder = resolve_encoder(spec.encoder)
    return (str(folder), files_key(folder))


def tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The encoder's tokenizer, loaded once per worker while its folder's files stay the same."""
    return _TOKENIZERS.get(_encoder_key(spec), lambda: load_tokenizer(spec))


def model(spec: ModelSpec) -> FedShopModel:
    """A model for one call: ``build_model(spec)``; with a frozen encoder, built around this
    worker's shared copy of it (same weights, fresh heads from the spec's seed)."""
    if spec.trainable != "heads":
        return build_model(spec)
    key = (_encoder_key(spec), spec.dropout)

    def load() -> PreTrainedModel:
        encoder = load_encoder(spec)
        features.freeze(encoder)
        return encoder

    return build_model(spec, encoder=_ENCODERS.get(key, load))


def clear() -> None:
    """Forget everything (tests; a worker that wants its memory back)."""
    _SPLITS.clear()
    _ENCODERS.clear()
    _TOKENIZERS.clear()
