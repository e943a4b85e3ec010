"""A warm ClientApp launcher for a SuperNode started with ``--isolation process``: the libraries
are imported once, and one long-lived process serves the node's tasks one after another, keeping
the node's caches (the built model, the tokenizer, the validated split: client/node_cache.py)
from one message to the next.

In Flower 1.42 a SuperNode's default ``--isolation subprocess`` starts ``flower-superexec``,
which polls the node's Runtime API for a task (``AcquireTask``, every second) and only then
launches a fresh ``flwr-clientapp`` with the task's token
(``flwr/supercore/superexec/executor/subprocess_executor.py``): every message pays for an
interpreter and for importing torch, transformers, Opacus and Flower after it arrived (5-8 s
of CPU on two cores). With ``flower-supernode --isolation process`` the node launches nothing:
a separately started process claims the task with that same call. Flower's ``run_clientapp``
(``flwr/supernode/runtime/run_clientapp.py``) serves exactly one task and ends the process
(``flwr_exit``, with a 5 s force-exit timer). So the launcher serves a task with the same
Flower functions ``run_clientapp`` is made of (``pull_task_input``, the FAB install and app
loader, ``push_message``, ``push_task_output``, the task heartbeat), without the process exit:

1. import what the ClientApp's handlers need (``client.app`` and the libraries its handlers
   import lazily: Opacus, peft, dp-accounting, Flower's ClientApp runtime), then drop
   fedshop's own modules again (0.1 s to import), so that the ClientApp is loaded from the
   app the run submitted (its FAB), exactly as a fresh ``flwr-clientapp`` would; the
   libraries stay loaded;
2. fork one serving process, which polls the node's Runtime API (``AcquireTask``, as
   ``flower-superexec`` does), claims each pending task and serves it in itself, in the order
   they come. It loads the run's app from its FAB once and again only for a task with another
   FAB (another run's code: fedshop's modules are dropped and imported from the new app, with
   fresh caches);
3. the parent, untouched by any task, watches it: should it die (a crash, a signal, a task's
   heartbeat refused), a new one is forked from the same warm state within a second. A task
   it was serving is lost, as with a dead ``flwr-clientapp``: the round goes on without it.

Forking once per message instead (as this launcher did before) kept imports off the message's
path but rebuilt everything each message reads (the model from its weights, the accountant's
first composition, the first tensor operations): 0.6-0.9 s of CPU per message with MiniLM.

A fetch of a message the node is still pulling from the SuperLink (in Flower 1.42 it creates
the task first) is retried with a backoff that starts at 1 s and doubles, sized for a
ClientApp that took seconds to start. The launcher starts those retries at 50 ms instead
(``shared.flower_pulls``).

The serving process reseeds NumPy's global generator as a fresh process would (Python's
``random`` reseeds itself at fork; torch's default generator has the same fixed seed in every
fresh process, and fedshop's DP noise and sampling draw from generators seeded with
``secrets``). Nothing here reads the merchant's data or config: that arrives with the task.
Runtime dependency installation stays off.

    python -m client.warm --runtime-api-address 127.0.0.1:9094 [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from shared import flower_pulls

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

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
SERVING = "fedshop warm ClientApp: serving tasks"
# A serving process that ends sooner than this after its start is replaced only this long after
# it started: a crash at start-up does not become a busy loop of forks.
RESTART_AFTER_S = 1.0
# A task still running its message's ttl (which the server sets to the round's timeout) plus
# this long after it started is abandoned: its message has expired and the server stopped
# waiting for the reply, and a hung task would keep every later message of the node waiting
# behind it. Timed from the task's start on this machine's clock, not from the message's
# created_at (the ServerApp's clock: a skewed clock must not end tasks early). The serving
# process ends (OVERRUN_EXIT) and the launcher forks a fresh one; the task's spend, reserved
# before its noise was drawn, stays counted (shared.privacy.budget's reservations).
OVERRUN_GRACE_S = 30.0
OVERRUN_EXIT = 124


def _warm_library_caches() -> None:
    """Fill the libraries' own per-process caches that every model build reads, so each serving
    process forked from here inherits them instead of rebuilding them: transformers' table of
    checkpoint conversions (~0.45 s of regular expressions, the first time any process builds or
    adapts a model). Pure Python, no tensor operation: the parent never starts torch's thread
    pools before forking."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError as exc:  # another transformers: the serving process pays for it itself
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
    _drop_own_modules()
    return time.perf_counter() - start


def _drop_own_modules() -> None:
    for name in [m for m in sys.modules if m.partition(".")[0] in OWN_PACKAGES and m != __name__]:
        del sys.modules[name]


# The Runtime API calls Flower's SuperExec authentication signs (flower-superexec's own set,
# flwr/supercore/superexec/run_superexec.py): claiming a task. The claimed task's own calls carry
# its token instead.
AUTHENTICATED_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})
# A node that refuses the launcher's claims (another secret) is said so at most this often.
REFUSED_WARNING_EVERY_S = 60.0


class TaskSource:
    """The node's Runtime API, asked for pending ClientApp tasks as ``flower-superexec`` asks:
    with ``secret`` (the node's ``--superexec-auth-secret-file`` contents) each claim is signed
    by Flower's SuperExec authentication, which the node then requires of every claim."""

    def __init__(self, runtime_api_address: str, secret: bytes | None = None) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
        from flwr.supercore.protobuf.client import ProtobufClientInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = runtime_api_address
        interceptors: list[ProtobufClientInterceptor] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                             protected_methods=AUTHENTICATED_METHODS))
        # No retry invoker: a failed request comes back to next() (Flower's own retry backs
        # off up to 20 s and logs every attempt, while a restarting node is routine here).
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=True, root_certificates=None, interceptors=interceptors)
        self.request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        self._refused_at = -math.inf

    def next(self) -> tuple[int, str] | None:
        """Claim the oldest pending task: (task id, token), or None when there is none (or no node)."""
        import httpx

        try:
            response = self.client.AcquireTask(self.request)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 401 and time.monotonic() - self._refused_at > REFUSED_WARNING_EVERY_S:
                # Not a node that is restarting: this launcher's claims will never be served.
                self._refused_at = time.monotonic()
                log.warning("the node at %s refuses this launcher's task claims (401): start both with the same "
                            "--superexec-auth-secret-file (the merchant's start script does)", self.address)
            else:
                log.debug("Runtime API at %s answered %s", self.address, exc)
            return None
        except httpx.HTTPError as exc:
            log.debug("Runtime API at %s not answering (%s)", self.address, exc)
            return None
        if response.HasField("task") and response.token:
            return int(response.task.task_id), str(response.token)
        return None


class LoadedApp:
    """The run's ClientApp as this process loaded it from the run's FAB, loaded again only for a
    task that comes with another FAB: fedshop's modules are dropped first, so the new app's code
    is imported (and with it fresh caches), not the old one found in ``sys.modules``."""

    def __init__(self) -> None:
        self.fab_hash: str | None = None
        self.app_dir: str | None = None
        self.app: ClientApp | None = None

    def get(self, run: Run, fab: Fab) -> ClientApp:
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if self.app is None or fab.hash_str != self.fab_hash:
            install_from_fab(fab.content, skip_prompt=True)
            if self.app_dir is not None:
                sys.path[:] = [p for p in sys.path if p != self.app_dir]
            _drop_own_modules()
            self.app = None
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.app = load(run.fab_id, run.fab_version, fab.hash_str)
            self.fab_hash = fab.hash_str
            self.app_dir = str(get_project_dir(run.fab_id, run.fab_version, fab.hash_str).absolute())
        return self.app


@contextlib.contextmanager
def expiry_guard(expires_at: float, *, grace_s: float = OVERRUN_GRACE_S,
                 on_overrun: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block; should it still run ``grace_s`` after ``expires_at`` (a ``time.time()``),
    call ``on_overrun`` from a timer thread: by default, end this process at once."""

    def overrun() -> None:
        log.error("fedshop warm ClientApp: a task ran %.0f s past its message's time to live; ending this "
                  "serving process (the launcher starts another)", grace_s)
        sys.stderr.flush()
        os._exit(OVERRUN_EXIT)  # noqa: SLF001  # the main thread is the one that is stuck

    timer = threading.Timer(max(0.0, expires_at + grace_s - time.time()), on_overrun or overrun)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def serve_task(runtime_api_address: str, token: str, app: LoadedApp) -> None:
    """Serve one claimed task in this process, as Flower's ``run_clientapp`` does (its functions,
    its error replies, its final status), without ending the process."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime import run_clientapp as flower

    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = flower.pull_task_input(client)
        with expiry_guard(time.time() + message.metadata.ttl):  # see OVERRUN_GRACE_S
            reply = app.get(run, fab)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001  # the reply says so, as Flower's own would
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(exc)}:<'{exc}'>"
        if isinstance(exc, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            details = "An exception was raised when attempting to load `ClientApp`"
        log.error("ClientApp raised an exception", exc_info=exc)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                flower.push_message(client, reply, context)
        except Exception as exc:  # noqa: BLE001  # the task's status still goes back
            log.error("failed to push the reply", exc_info=exc)
            status = SubStatus.FAILED
        retry_invoker.max_tries = 1  # as Flower: the final status does not wait on retries
        flower.push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()


def work(runtime_api_address: str, *, poll_interval_s: float, launcher_pid: int, secret: bytes | None = None) -> None:
    """The serving process: claim the node's tasks and serve each in turn, until the launcher is gone."""
    import numpy as np
    from flwr.supercore.app_utils import start_parent_process_monitor

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's handler is not this process'
    np.random.seed()  # a fresh process seeds NumPy's global generator from the OS
    start_parent_process_monitor(launcher_pid)  # a launcher killed outright takes this along
    source, app = TaskSource(runtime_api_address, secret), LoadedApp()
    last = time.perf_counter()
    while True:
        claimed = source.next()
        if claimed is None:
            time.sleep(poll_interval_s)
            continue
        task_id, token = claimed
        log.info("%s %d (process %d; %.1f s since the last)", TOOK_TASK, task_id, os.getpid(),
                 time.perf_counter() - last)
        last = time.perf_counter()
        serve_task(runtime_api_address, token, app)


def _fork_worker(runtime_api_address: str, poll_interval_s: float, secret: bytes | None = None) -> int:
    launcher = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    # The imported libraries are ~500,000 objects. Unfrozen, each of the serving process's full
    # garbage collections walked them all (0.27 s alone; on a busy 2-core machine a message in
    # eight or so took 0.5-1 s longer) and wrote to their pages, copying them from the
    # launcher's. Frozen before the fork, they are left out of every collection (Python's
    # gc.freeze docs recommend it for fork-without-exec servers).
    gc.freeze()
    pid = os.fork()
    if pid == 0:  # the serving process; never runs the launcher's exit code
        code = 1
        try:
            work(runtime_api_address, poll_interval_s=poll_interval_s, launcher_pid=launcher, secret=secret)
        except KeyboardInterrupt:  # the launcher gone, or a task's heartbeat refused
            code = 130
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # noqa: SLF001
    log.info("%s in process %d", SERVING, pid)
    return pid


def serve(runtime_api_address: str, *, poll_interval_s: float, secret: bytes | None = None) -> None:
    """Keep one serving process alive, forked from this warm state, until signalled."""
    worker: int | None = None

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            started = time.monotonic()
            worker = _fork_worker(runtime_api_address, poll_interval_s, secret)
            _, status = os.waitpid(worker, 0)
            worker = None
            log.info("fedshop warm ClientApp: serving process ended with status %d; forking another",
                     os.waitstatus_to_exitcode(status))
            time.sleep(max(0.0, RESTART_AFTER_S - (time.monotonic() - started)))
    finally:  # the task being served ends with the launcher
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker, 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API (its --host:--port, plain HTTP on loopback)")
    parser.add_argument("--poll-interval-s", type=float, default=0.2,
                        help="how often to ask the node for a task (flower-superexec: 1 s)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the start script) is gone")
    parser.add_argument("--superexec-auth-secret-file", metavar="FILE",
                        help="the node's SuperExec secret (its --superexec-auth-secret-file): sign each task claim")
    args = parser.parse_args(argv)
    secret = None
    if args.superexec_auth_secret_file:
        from flwr.supercore.auth import load_superexec_auth_secret

        try:
            secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
        except ValueError as err:
            parser.error(str(err))
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
    serve(args.runtime_api_address, poll_interval_s=args.poll_interval_s, secret=secret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
