"""The one progress display: for the slow steps of a merchant's work (encoding its records,
training steps, evaluation), which can take minutes with MiniLM on a CPU.

Shown only when the person who started the command can see it: the ``fedshop`` CLI turns it
on (``enable``) when its stderr is a terminal and ``--quiet`` is off, through an environment
variable, because the work mostly runs in Ray worker processes, which inherit the driver's
environment but whose own output is never a terminal. A step that ends within ``AFTER_S``
shows nothing.

Two forms. In the process that owns the terminal (``fedshop train-local``), a tqdm bar that
redraws in place. Anywhere else (a ClientApp in a Ray worker, whose output Ray forwards to
the terminal line by line, prefixed by the actor's pid): whole lines, at most one per
``AFTER_S`` seconds; a redrawn bar would reach the terminal as fragments interleaved with
the other workers' output.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

ENV_VAR = "FEDSHOP_PROGRESS"
AFTER_S = 5.0

T = TypeVar("T")


def enable(on: bool) -> None:
    """Turn the display on or off for this process and every process it starts afterwards
    (call before the simulation starts Ray, whose workers copy the environment)."""
    os.environ[ENV_VAR] = "1" if on else "0"


def enabled() -> bool:
    return os.environ.get(ENV_VAR) == "1"


class Progress:
    """``done`` of ``total`` units of one named step; ``update`` after each piece of work."""

    def __init__(self, desc: str, total: int, *, unit: str) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self._started = self._last_line = time.monotonic()
        self._bar = None
        if enabled() and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, delay=AFTER_S, leave=False, file=sys.stderr,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif enabled():
            now = time.monotonic()
            if now - self._last_line >= AFTER_S:
                self._last_line = now
                print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({now - self._started:.0f} s)",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Iterable[T], *, desc: str, total: int, unit: str) -> Iterator[T]:
    """``items``, counting one unit per item on the display."""
    with Progress(desc, total, unit=unit) as shown:
        for item in items:
            yield item
            shown.update()
