"""A warm ClientApp launcher for a SuperNode started with ``--isolation process``: the libraries
are imported once, and each task is served by a fork of that process running Flower's own
``run_clientapp``.

In Flower 1.42 a SuperNode's default ``--isolation subprocess`` starts ``flower-superexec``,
which polls the node's Runtime API for a task (``AcquireTask``, every second) and only then
launches a fresh ``flwr-clientapp`` with the task's token
(``flwr/supercore/superexec/executor/subprocess_executor.py``): every message pays for an
interpreter and for importing torch, transformers, Opacus and Flower after it arrived (5-8 s
of CPU on two cores). With ``flower-supernode --isolation process`` the node launches nothing:
a separately started process claims the task with that same call. ``run_clientapp``
(``flwr/supernode/runtime/run_clientapp.py``) serves exactly one task and ends the process
(``flwr_exit``, with a 5 s force-exit timer), so a process cannot serve a second task. Hence:

1. import what the ClientApp's handlers need (``client.app`` and the libraries its handlers
   import lazily: Opacus, peft, dp-accounting, Flower's ClientApp runtime), then drop
   fedshop's own modules again (0.1 s to import), so that Flower loads the ClientApp from the
   app the run submitted (its FAB), exactly as a fresh ``flwr-clientapp`` would; the
   libraries stay loaded;
2. poll the node's Runtime API (``AcquireTask``, as ``flower-superexec`` does) until a
   ClientApp task is pending and claim it;
3. fork: the child hands the token to ``run_clientapp``, which serves that one task and exits;
   the parent, untouched by any task, goes back to 2. A fork costs milliseconds and shares the
   imported libraries copy-on-write, so neither the message nor the machine pays for imports
   again. (Restarting a warm process after each task instead kept the imports off the
   message's path but not off the CPU: on a shared 2-core machine the next process's imports
   slowed the other nodes' work.)

A child asks the node for the message at once, and the node is often still pulling it from the
SuperLink (in Flower 1.42 it creates the task first): Flower's ``run_clientapp`` then retries
with a backoff that starts at 1 s and doubles, sized for a ClientApp that took seconds to start.
The launcher starts its children's retries at 50 ms instead (``shared.flower_pulls``).

A child starts from the parent's state, which holds no task data: it reseeds NumPy's global
generator as a fresh process would (Python's ``random`` reseeds itself at fork; torch's default
generator has the same fixed seed in every fresh process, and fedshop's DP noise and sampling
draw from generators seeded with ``secrets``). Nothing here reads the merchant's data or
config: that arrives with the task. Runtime dependency installation stays off.

    python -m client.warm --runtime-api-address 127.0.0.1:9094 [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

from shared import flower_pulls

log = logging.getLogger("client.warm")  # also when run as __main__

APP_MODULE = "client.app"
# Imported by the handlers at call time, not by client.app itself.
LAZY_LIBRARIES = ("opacus", "opacus.data_loader", "opacus.optimizers", "peft", "dp_accounting",
                  "dp_accounting.pld.privacy_loss_distribution", "safetensors.torch")
# fedshop's packages: loaded again from the run's FAB, as Flower would (tool.setuptools packages).
OWN_PACKAGES = frozenset({"client", "server", "shared", "simulations"})
# What the launcher logs when it hands a claimed task to a child (tests and benchmarks read it).
TOOK_TASK = "fedshop warm ClientApp: took task"
READY = "fedshop warm ClientApp: ready"


def _warm_library_caches() -> None:
    """Fill the libraries' own per-process caches that every model build reads, so each fork
    inherits them instead of rebuilding them: transformers' table of checkpoint conversions
    (~0.45 s of regular expressions, the first time any process builds or adapts a model). Pure
    Python, no tensor operation: the parent never starts torch's thread pools before forking."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError as exc:  # another transformers: the children just pay for it themselves
        log.warning("warm-up: transformers has no conversion mapping to prepare (%s)", exc)
        return
    get_checkpoint_conversion_mapping("bert")


def warm_up() -> float:
    """Import the ClientApp's libraries; fedshop's own modules are left for Flower to load. Seconds."""
    start = time.perf_counter()
    root_handlers = list(logging.root.handlers)
    importlib.import_module(APP_MODULE)
    for name in LAZY_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # the ClientApp will say so itself if it needs it
            log.warning("warm-up: %s not importable (%s)", name, exc)
    importlib.import_module("flwr.supernode.runtime.run_clientapp")
    from flwr.supernode.runtime import run_clientapp

    flower_pulls.bind_backoff(run_clientapp, "pull_and_inflate_object_from_tree")
    _warm_library_caches()
    # opacus.utils.module_utils calls logging.basicConfig when imported: a root handler through
    # which every Flower line (its logger has its own handler) would appear twice, DEBUG too.
    logging.root.handlers = root_handlers
    for name in [m for m in sys.modules if m.partition(".")[0] in OWN_PACKAGES and m != __name__]:
        del sys.modules[name]
    return time.perf_counter() - start


class TaskSource:
    """The node's Runtime API, asked for pending ClientApp tasks as ``flower-superexec`` asks."""

    def __init__(self, runtime_api_address: str) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = runtime_api_address
        # No retry invoker: a failed request comes back to next() (Flower's own retry backs
        # off up to 20 s and logs every attempt, while a restarting node is routine here).
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
        self.request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])

    def next(self) -> tuple[int, str] | None:
        """Claim the oldest pending task: (task id, token), or None when there is none (or no node)."""
        import httpx

        try:
            response = self.client.AcquireTask(self.request)
        except httpx.HTTPError as exc:
            log.debug("Runtime API at %s not answering (%s)", self.address, exc)
            return None
        if response.HasField("task") and response.token:
            return int(response.task.task_id), str(response.token)
        return None

    def close(self) -> None:
        self.client.close()


def serve_task(runtime_api_address: str, token: str, parent_pid: int | None) -> int:
    """In a forked child: Flower's ClientApp runtime for the claimed task. Its exit status."""
    import numpy as np
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's handler is not the child's
    np.random.seed()  # a fresh process seeds NumPy's global generator from the OS
    try:
        run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True,
                      parent_pid=parent_pid, runtime_dependency_install=False)
    except SystemExit as exc:  # how run_clientapp ends (flwr_exit), on success too
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


def _reap(children: set[int]) -> None:
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                log.info("fedshop warm ClientApp: process %d ended with status %d", pid, code)
        children.discard(pid)


def serve(runtime_api_address: str, *, poll_interval_s: float, parent_pid: int | None) -> None:
    """Claim tasks and fork a child for each, until signalled."""
    children: set[int] = set()

    def stop(signum: int, _frame: FrameType | None) -> None:
        for pid in children:  # the tasks being served end with the launcher
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    source = TaskSource(runtime_api_address)
    last = time.perf_counter()
    while True:
        _reap(children)
        claimed = source.next()
        if claimed is None:
            time.sleep(poll_interval_s)
            continue
        task_id, token = claimed
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: serve the one task, then leave without running the parent's exit code
            code = 1
            try:
                code = serve_task(runtime_api_address, token, parent_pid)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.add(pid)
        log.info("%s %d (process %d; %.1f s since the last)", TOOK_TASK, task_id, pid,
                 time.perf_counter() - last)
        last = time.perf_counter()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API (its --host:--port, plain HTTP on loopback)")
    parser.add_argument("--poll-interval-s", type=float, default=0.2,
                        help="how often to ask the node for a task (flower-superexec: 1 s)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the start script) is gone")
    args = parser.parse_args(argv)
    # Only this module's lines: Flower's logger has its own handler (and would print twice via root).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    warm_s = warm_up()
    log.info("%s (imports %.1f s), taking tasks at %s", READY, warm_s, args.runtime_api_address)
    serve(args.runtime_api_address, poll_interval_s=args.poll_interval_s, parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
