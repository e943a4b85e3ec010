"""Shorter first retries for Flower's object pulls, where fedshop runs Flower's own loops.

In Flower 1.42 a message travels as a tree of objects, and whoever receives it (a SuperNode
from the SuperLink, a ClientApp from its SuperNode, the ServerApp from the SuperLink) pulls each
object with ``flwr.supercore.inflatable.inflatable_utils.pull_objects``. An object the sender
has not finished pushing is retried after a backoff that starts at 1 s and doubles up to 10 s
(``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP``). On a deployed round every message is pulled
moments after it was announced, so nearly every hop paid a whole second for an object that
arrived milliseconds later (docs/benchmarks.md, "Deployment against simulation").

``bind_backoff`` rebinds the name a Flower module calls (``pull_objects`` or
``pull_and_inflate_object_from_tree``, looked up in that module at call time) to the same
function with ``initial_backoff`` = ``INITIAL_BACKOFF_S`` and ``backoff_cap`` =
``BACKOFF_CAP_S``: same calls, same give-up time (``PULL_MAX_TIME``), first retry after 50 ms,
none more than 0.2 s apart.
Only fedshop's own processes do it (its SuperNode launcher, its warm ClientApp launcher, its
ServerApp), and it refuses a Flower whose function no longer takes those arguments, so an
upgrade fails loudly instead of silently waiting a second per hop again.
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType

INITIAL_BACKOFF_S = 0.05
BACKOFF_CAP_S = 0.2
_ARGS = frozenset({"initial_backoff", "backoff_cap"})


class FlowerChangedError(RuntimeError):
    """The installed Flower no longer has what this module was written against (flwr 1.42.0)."""


def bind_backoff(module: ModuleType, name: str) -> None:
    """Make ``module.name`` (a Flower pull function) retry from ``INITIAL_BACKOFF_S``. Idempotent."""
    current = getattr(module, name, None)
    if current is None:
        raise FlowerChangedError(f"{module.__file__}: no {name} any more; shared/flower_pulls.py was written "
                                 "against flwr 1.42.0 (pyproject.toml)")
    original = current.func if isinstance(current, functools.partial) else current
    if not _ARGS <= set(inspect.signature(original).parameters):
        raise FlowerChangedError(f"{module.__file__}: {name} takes no {sorted(_ARGS)} any more; "
                                 "shared/flower_pulls.py was written against flwr 1.42.0 (pyproject.toml)")
    setattr(module, name, functools.partial(original, initial_backoff=INITIAL_BACKOFF_S, backoff_cap=BACKOFF_CAP_S))
