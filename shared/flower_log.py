"""Flower's console logging, as fedshop's processes want it.

Flower's logger (``flwr``) has its own console handler, which colours each level name for a
terminal whether or not there is one: a log file or a pipe (CI, ``fedshop simulate > log``)
then reads ``\\x1b[92mINFO \\x1b[0m``. And at the end of every simulation each Ray actor that
ran ClientApps logs ``Manually terminating ClientAppActor`` at WARNING: Flower's normal
shutdown, not a warning for anyone, which reaches the console whenever Ray forwards the
actor's last lines before the driver exits.

``quiet_flower()`` is called where fedshop's code first runs in a process: the CLI (the driver,
where the ServerApp runs in simulation) and the ClientApp's module (a Ray worker, a deployed
node's ClientApp process). It changes only Flower's logger, never the levels of fedshop's own.
"""

from __future__ import annotations

import logging
import sys

FLOWER_LOGGER = "flwr"
# Flower's format string for an actor's shutdown (flwr.simulation.ray_transport.ray_actor).
_SHUTDOWN_NOTICE = "Manually terminating %s"


class _NoShutdownNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _SHUTDOWN_NOTICE


def quiet_flower() -> None:
    """Flower's console lines without colour codes unless stderr is a terminal, and without
    the actors' shutdown notice. Idempotent: a process may import the ClientApp per run."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(colored=sys.stderr.isatty())
    logger = logging.getLogger(FLOWER_LOGGER)
    if not any(isinstance(f, _NoShutdownNotice) for f in logger.filters):
        logger.addFilter(_NoShutdownNotice())
