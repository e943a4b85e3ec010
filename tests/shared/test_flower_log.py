"""shared.flower_log: Flower's console lines without colour codes off a terminal, and without
the shutdown notice every simulation actor logs; its other warnings untouched."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from flwr.supercore import log as flower_log_call
from flwr.supercore.logger import ConsoleHandler

from shared import flower_log


@pytest.fixture
def flower_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Flower's own console handler, writing to a buffer (not a terminal)."""
    logger = logging.getLogger(flower_log.FLOWER_LOGGER)
    (handler,) = [h for h in logger.handlers if isinstance(h, ConsoleHandler)]
    buffer = io.StringIO()
    monkeypatch.setattr(handler, "stream", buffer)
    monkeypatch.setattr(handler, "colored", True)  # Flower's default
    filters = list(logger.filters)
    yield buffer
    logger.filters[:] = filters


def test_flower_lines_lose_their_colours_and_the_shutdown_notice(flower_console: io.StringIO) -> None:
    flower_log_call(logging.WARNING, "before: %s", "coloured")
    assert "\x1b[" in flower_console.getvalue()  # what a log file got before

    flower_log.quiet_flower()
    flower_log.quiet_flower()  # idempotent: one filter, however often the ClientApp is imported
    flower_console.seek(0)
    flower_console.truncate()
    flower_log_call(logging.WARNING, "Manually terminating %s", "ClientAppActor")
    flower_log_call(logging.WARNING, "a real warning: %s", "kept")

    assert flower_console.getvalue().splitlines() == ["WARNING :   a real warning: kept"]
    logger = logging.getLogger(flower_log.FLOWER_LOGGER)
    assert sum(isinstance(f, flower_log._NoShutdownNotice) for f in logger.filters) == 1
