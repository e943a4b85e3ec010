"""Flower's SuperNode, polling the SuperLink at the merchant's chosen interval.

    python -m client.supernode [--poll-interval-s S] FLOWER-SUPERNODE-ARGS...

In Flower 1.42 a SuperNode (``flwr/supernode/start_client_internal.py``) asks the SuperLink for
a message and, when none is waiting, sleeps a fixed 3 s before asking again; once a message is
being served it checks for the ClientApp's reply every 0.5 s. Neither is an option of
``flower-supernode``. A deployed round is at least two exchanges (train, evaluate; secagg+ four),
and each message arrives while the node sleeps: on loopback a round spent more time in these
sleeps than in training (docs/benchmarks.md, "Deployment against simulation").

This module runs Flower's own ``flower_supernode`` entry point unchanged except for those two
sleeps: the module's ``time`` is swapped for a proxy whose ``sleep`` caps the idle poll at
``--poll-interval-s`` and the reply check at a tenth of it, and its pulls of a message's objects
retry from 50 ms instead of 1 s (``shared.flower_pulls``), and a failed request to the SuperLink
or heartbeat is retried after at most ``RETRY_CAP_S`` instead of 20 s (``cap_retries``). Nothing
else in Flower is touched: connection, authentication, which failures are retried, heartbeats
and the node's state are Flower's. The swap is tied to the pinned Flower version:
``check_flower`` refuses to start if the loop no longer holds the sleeps it replaces, so an
upgrade fails loudly instead of silently polling every 3 s again (tests/client/test_supernode.py).

A shorter poll costs the SuperLink one more small request per node per interval while the node is
idle (at 0.5 s, two a second a node); the merchant's start script sets it
(``FEDSHOP_POLL_INTERVAL_S``, default ``DEFAULT_POLL_INTERVAL_S``), and Flower's 3 s is
``--poll-interval-s 3``. For ``ACTIVE_WINDOW_S`` after serving a message the node asks every
0.1 s (``FEDSHOP_ACTIVE_POLL_INTERVAL_S``): ten requests a second from each node that took part
in the last seconds of a run, none more from an idle federation.

It also declares a heartbeat interval of ``DEFAULT_HEARTBEAT_INTERVAL_S`` (10 s, the least the
SuperLink accepts; ``FEDSHOP_HEARTBEAT_INTERVAL_S``) instead of Flower's fixed 30 s: the
SuperLink lets a crashed node go after two intervals, so a round stops waiting for it, and its
restarted node gets back in, after at most 20 s instead of 60 s, for a heartbeat every ~4 s.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from shared import flower_pulls
from shared.flower_pulls import FlowerChangedError

DEFAULT_POLL_INTERVAL_S = 0.5
POLL_ENV = "FEDSHOP_POLL_INTERVAL_S"  # the start script's way to set it
# Within ACTIVE_WINDOW_S of serving a message the node asks every ACTIVE_POLL_INTERVAL_S instead:
# a round's next message (its evaluation, the next round, secagg+'s next stage) usually comes
# within seconds, and every phase waits for the slowest node's poll. An idle federation's
# nodes still ask at the idle interval.
DEFAULT_ACTIVE_POLL_INTERVAL_S = 0.1
ACTIVE_POLL_ENV = "FEDSHOP_ACTIVE_POLL_INTERVAL_S"
ACTIVE_WINDOW_S = 10.0
# The heartbeat interval the node declares to the SuperLink (Flower 1.42: a fixed 30 s; the
# SuperLink accepts 10-1800 s and declares a node gone after two intervals without one).
DEFAULT_HEARTBEAT_INTERVAL_S = 10.0
HEARTBEAT_ENV = "FEDSHOP_HEARTBEAT_INTERVAL_S"
# Where Flower reads the interval: the declaration at activation and in each heartbeat, and the
# sender's loop (it sends every (interval - 5 s) x 0.7-0.9).
_HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
# Flower retries a failed request to the SuperLink, and a failed heartbeat, after a jittered wait
# that doubles up to 20 s (http_retry.MAX_RETRY_DELAY; the heartbeat sender's own literal 20).
# After a SuperLink restart (the soak: down a few seconds) a node's next try came 13.6 s later,
# 21.9 s after the first failure, and the restarted SuperLink declared it gone (two heartbeat
# intervals without one) in the first round it sent it a message. At RETRY_CAP_S a node is back
# within seconds of its SuperLink, for one request per RETRY_CAP_S while the SuperLink is down.
RETRY_CAP_S = 2.0
# The sleeps of flwr.supernode.start_client_internal this replaces (Flower 1.42.0).
IDLE_SLEEP_S = 3.0
REPLY_SLEEP_S = 0.5
_EXPECTED = ("time.sleep(3)", "time.sleep(0.5)")


class PollSchedule:
    """How long a poller waits before asking again: ``active_s`` within ``window_s`` of its last
    work (``worked``), ``idle_s`` otherwise (also before any work)."""

    def __init__(self, idle_s: float, active_s: float, window_s: float = ACTIVE_WINDOW_S,
                 now: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 < active_s <= idle_s:
            raise ValueError(f"the active poll interval must be in (0, {idle_s:g}] seconds (the idle one), "
                             f"got {active_s!r}")
        self.idle_s, self.active_s, self.window_s, self._now = idle_s, active_s, window_s, now
        self._last_work = -math.inf

    def worked(self) -> None:
        self._last_work = self._now()

    def wait_s(self) -> float:
        return self.active_s if self._now() - self._last_work < self.window_s else self.idle_s


class _PollClock:
    """``time`` for one module, with its fixed sleeps shortened; every other name is ``time``'s.
    A reply check means the node is serving a message: the idle polls after it are brisk."""

    def __init__(self, poll_interval_s: float, active_poll_interval_s: float | None = None) -> None:
        self.poll_interval_s = poll_interval_s
        active = min(DEFAULT_ACTIVE_POLL_INTERVAL_S, poll_interval_s) if active_poll_interval_s is None \
            else active_poll_interval_s
        self.schedule = PollSchedule(poll_interval_s, active)

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP_S:
            seconds = self.schedule.wait_s()
        elif seconds == REPLY_SLEEP_S:
            self.schedule.worked()
            seconds = min(REPLY_SLEEP_S, self.poll_interval_s / 10)
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _loop_module() -> ModuleType:
    from flwr.supernode import start_client_internal

    return start_client_internal


def check_flower(module: ModuleType | None = None) -> None:
    """Refuse a Flower whose SuperNode loop no longer sleeps where this module expects."""
    module = module or _loop_module()
    source = inspect.getsource(module)
    missing = [s for s in _EXPECTED if s not in source]
    if missing or getattr(module, "time", None) is not time:
        raise FlowerChangedError(
            f"{module.__file__}: the SuperNode loop no longer has {missing or 'a module-level time'}; "
            "client.supernode was written against flwr 1.42.0 (pyproject.toml). Run flower-supernode "
            "directly, or update client/supernode.py for this Flower.")


def set_heartbeat_interval(seconds: float) -> None:
    """Declare and keep ``seconds`` as this node's heartbeat interval instead of Flower's 30 s."""
    import importlib

    from flwr.common import constant

    if not constant.HEARTBEAT_MIN_INTERVAL <= seconds <= constant.HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval must be in [{constant.HEARTBEAT_MIN_INTERVAL:g}, "
                         f"{constant.HEARTBEAT_MAX_INTERVAL:g}] seconds (the SuperLink's range), got {seconds!r}")
    for name in _HEARTBEAT_MODULES:
        module = importlib.import_module(name)
        if "HEARTBEAT_DEFAULT_INTERVAL" not in inspect.getsource(module) or \
                not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise FlowerChangedError(f"{module.__file__}: no HEARTBEAT_DEFAULT_INTERVAL any more; client.supernode "
                                     "was written against flwr 1.42.0 (pyproject.toml)")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


def cap_retries(seconds: float = RETRY_CAP_S) -> None:
    """Cap the waits between Flower's retries of SuperLink requests and of heartbeats in this
    process at ``seconds`` (Flower 1.42: 20 s)."""
    from flwr.supercore import heartbeat
    from flwr.supercore.retry import http_retry

    if not hasattr(http_retry, "MAX_RETRY_DELAY") or \
            "exponential(max_delay=" not in inspect.getsource(heartbeat.HeartbeatSender):
        raise FlowerChangedError(f"{http_retry.__file__}, {heartbeat.__file__}: Flower's retry waits are not where "
                                 "client.supernode caps them; it was written against flwr 1.42.0 (pyproject.toml)")
    http_retry.MAX_RETRY_DELAY = seconds  # type: ignore[assignment]  # read by its wait generator at each invoke
    heartbeat.exponential = functools.partial(_capped_exponential, seconds)  # type: ignore[assignment]


def _capped_exponential(cap: float, base_delay: float = 1, multiplier: float = 2,
                        max_delay: float | None = None) -> Iterator[float]:
    from flwr.supercore.retry.retry_invoker import exponential

    return exponential(base_delay, multiplier, cap if max_delay is None else min(cap, max_delay))  # type: ignore[arg-type]


def install(poll_interval_s: float, heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
            active_poll_interval_s: float | None = None) -> ModuleType:
    """Shorten the SuperNode loop's sleeps and its heartbeat interval in this process; returns
    the patched loop module. ``active_poll_interval_s``: the poll within ``ACTIVE_WINDOW_S`` of
    serving a message (default the lesser of ``DEFAULT_ACTIVE_POLL_INTERVAL_S`` and the idle one)."""
    if not 0.0 < poll_interval_s <= IDLE_SLEEP_S:
        raise ValueError(f"--poll-interval-s must be in (0, {IDLE_SLEEP_S:g}] seconds, got {poll_interval_s!r}")
    clock = _PollClock(poll_interval_s, active_poll_interval_s)  # validates the active interval too
    module = _loop_module()
    check_flower(module)
    set_heartbeat_interval(heartbeat_interval_s)
    cap_retries()
    module.time = clock  # type: ignore[attr-defined]
    flower_pulls.bind_backoff(module, "pull_objects")  # a message's objects, from the SuperLink
    return module


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.supernode",
        description="flower-supernode with a shorter idle poll; every other argument goes to flower-supernode.")
    parser.add_argument("--poll-interval-s", type=_seconds, default=None,
                        help=f"seconds between asks while idle (default ${POLL_ENV}, else "
                             f"{DEFAULT_POLL_INTERVAL_S:g}; Flower's own: {IDLE_SLEEP_S:g})")
    parser.add_argument("--active-poll-interval-s", type=_seconds, default=None,
                        help=f"seconds between asks within {ACTIVE_WINDOW_S:g} s of serving a message (default "
                             f"${ACTIVE_POLL_ENV}, else the lesser of {DEFAULT_ACTIVE_POLL_INTERVAL_S:g} and the idle "
                             "interval)")
    parser.add_argument("--heartbeat-interval-s", type=_seconds, default=None,
                        help=f"the heartbeat interval the node declares (default ${HEARTBEAT_ENV}, else "
                             f"{DEFAULT_HEARTBEAT_INTERVAL_S:g}; Flower's own: 30); a crashed node is let go, "
                             "and may rejoin, after two of them")
    args, rest = parser.parse_known_args(argv)

    def chosen(value: float | None, env_name: str, default: float | None) -> float | None:
        if value is not None:
            return value
        env = os.environ.get(env_name, "").strip()
        try:
            return _seconds(env) if env else default
        except argparse.ArgumentTypeError as err:
            parser.error(f"{env_name}: {err}")

    poll = chosen(args.poll_interval_s, POLL_ENV, DEFAULT_POLL_INTERVAL_S)
    active = chosen(args.active_poll_interval_s, ACTIVE_POLL_ENV, None)  # None: _PollClock's default
    heartbeat = chosen(args.heartbeat_interval_s, HEARTBEAT_ENV, DEFAULT_HEARTBEAT_INTERVAL_S)
    assert poll is not None and heartbeat is not None
    try:
        install(poll, heartbeat, active)
    except (ValueError, FlowerChangedError) as err:
        parser.error(str(err))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
