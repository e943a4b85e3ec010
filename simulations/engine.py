"""Run a scenario on Flower's simulation engine (Ray backend) in this process.

A scenario is a flat TOML file of run-config overrides in ``simulations/scenarios/``; the
same file works with ``flwr run . --run-config simulations/scenarios/NAME.toml``. This
module adds what a one-command local run needs around it: preparing bundled data the
scenario names, counting the virtual merchants, creating the privacy state of merchants that
have none yet, choosing client resources, and stopping Ray (and everything it started) when
the run ends, fails or is interrupted.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import tomllib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
PROJECT_DIR = Path(__file__).resolve().parents[1]

# Flower defaults that must not apply here: runtime dependency installation would pull a
# CUDA torch; telemetry and update checks need a network these machines do not have.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


class ScenarioError(ValueError):
    """Unknown scenario or unusable scenario file; the message names it."""


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ScenarioError(f"scenario {name_or_path!r} not found; known: {', '.join(scenario_names())}")
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc})") from exc
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ScenarioError(f"{path}: run-config overrides must be flat key = value pairs; found tables {nested}")
    return raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to scalars (TOML syntax for the value, bare words as strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def build_config(scenario: Mapping[str, Any], overrides: Mapping[str, Any], *, out: Path | None) -> RunConfig:
    merged = {**scenario, **overrides}
    if out is not None:
        merged["run-dir"] = str(out)
    return RunConfig.from_mapping(merged)


def fit_tasks_to_data(config: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """The run's tasks as the data allows, unless ``--set tasks=...`` chose them: the scenario's
    tasks the merchants' data holds; when it holds none of them (a scenario's file run on
    other data: the default on ESCI's judgments), every task it holds. A task the data also
    holds but the scenario leaves out is named in the log, with how to add it."""
    from client.data import DataValidationError, load_merchant, supported_tasks
    from client.merchant import SYNTHETIC_PREFIX, merchant_dirs
    from shared.tasks import TASKS

    if "tasks" in overrides or config.data_dir.startswith(SYNTHETIC_PREFIX) or not Path(config.data_dir).is_dir():
        return config
    held: set[str] = set()
    for folder in merchant_dirs(Path(config.data_dir)):
        try:
            held.update(supported_tasks(load_merchant(folder)))
        except DataValidationError:
            # Its own node refuses it and names the problem in the merchant's log; the
            # operator's side learns only which tasks the valid folders hold (docs/privacy.md).
            continue
    asked = config.task_names
    kept = [t for t in asked if t in held] or [t for t in TASKS if t in held]
    if not kept:
        return config  # no data to train on: the merchants' own checks name the problem
    extra = [t for t in TASKS if t in held and t not in kept]
    if extra:
        log.info("the data in %s also holds %s examples; add --set tasks=%s to train those heads too",
                 config.data_dir, ", ".join(extra), ",".join(t for t in TASKS if t in held))
    if tuple(kept) == asked:
        return config
    log.info("tasks %s -> %s: what the data in %s holds (--set tasks=... chooses them yourself)",
             ",".join(asked), ",".join(kept), config.data_dir)
    return config.replace(tasks=",".join(kept))


def count_merchants(config: RunConfig) -> int:
    from client.merchant import SYNTHETIC_PREFIX, merchant_dirs, synthetic_count

    if config.data_dir.startswith(SYNTHETIC_PREFIX):
        return synthetic_count(config.data_dir)
    return len(merchant_dirs(Path(config.data_dir)))


def ensure_data(config: RunConfig, scenario_name: str) -> None:
    """Prepare the bundled real data the first time a scenario that uses it runs (and check the
    run's public corpus is there)."""
    ensure_public_corpus(config)
    data_dir = Path(config.data_dir)
    if config.data_dir.startswith("synthetic:") or (data_dir.is_dir() and any(data_dir.iterdir())):
        return
    from client.sources import adapters

    if scenario_name in ("reviews", "reviews-lora", "reviews-top"):
        log.info("preparing the bundled reviews data into %s", data_dir)
        adapters.prepare_reviews(data_dir)
    elif scenario_name == "esci":
        log.info("preparing the bundled ESCI data into %s", data_dir)
        adapters.prepare_esci(data_dir)


def ensure_public_corpus(config: RunConfig) -> None:
    """A ``precondition-corpus`` file that does not exist is an error before anything starts,
    not a failed call in every merchant's first round (``bundled:NAME`` needs no file)."""
    from client import precondition
    from client.sources import adapters

    corpus = config.precondition_corpus
    try:
        bundled = precondition.bundled_source(corpus)
    except ValueError:
        raise ScenarioError(f"run-config key 'precondition-corpus' = {corpus!r}: fedshop ships "
                            f"{', '.join(precondition.BUNDLED + s for s in adapters.PUBLIC_CORPUS_SOURCES)}") from None
    if corpus and bundled is None and not Path(corpus).is_file():
        raise ScenarioError(f"run-config key 'precondition-corpus' = {corpus!r}: no such file (public text, one "
                            f"line per text; '{precondition.BUNDLED}esci' for the ESCI texts fedshop ships; '' for "
                            "none)")


# A merchant whose ε is within this share of its budget cannot afford another release (the
# cheapest, one evaluation at σ_eval 10, costs far more than 1 % of any budget it composes with).
SPENT_SHARE = 0.99


def refuse_if_every_budget_is_spent(config: RunConfig, *, num_merchants: int) -> None:
    """A ``ScenarioError`` before anything starts when every merchant of the run has spent its
    budget: the run could only be refused by each of them, round after round. Their states
    count every earlier run on these folders (the default spends ~all of ε = 8 in one run)."""
    from client.merchant import SYNTHETIC_PREFIX, resolve_node
    from shared.privacy.budget import PrivacyState

    if not config.dp or config.data_dir.startswith(SYNTHETIC_PREFIX) or config.resume:
        return
    spent: list[str] = []
    for pid in range(num_merchants):
        node = resolve_node({"partition-id": pid}, config)
        if not node.state_path.is_file():
            return  # a merchant that never trained here: the run has someone to train
        state = PrivacyState.open(node.state_path, merchant_id=node.merchant_id, target_epsilon=node.target_epsilon,
                                  target_delta=node.target_delta)
        epsilon = state.epsilon()
        if epsilon < SPENT_SHARE * state.target_epsilon:
            return
        spent.append(f"{node.merchant_id} ε {epsilon:.2f} / {state.target_epsilon:g}")
    if spent:
        raise ScenarioError(
            f"every merchant in {config.data_dir} has spent its privacy budget ({'; '.join(spent)}): each would "
            "refuse this run. Privacy spend is never reset; train other merchants' data, e.g. fresh copies of the "
            "bundled data: fedshop data prepare reviews --out merchants/reviews-2, then fedshop simulate --set "
            "data-dir=merchants/reviews-2")


def prepare_privacy_states(config: RunConfig, *, num_merchants: int) -> list[Path]:
    """Create the privacy state of each of the run's merchant folders that has none; the paths created.

    The state lives with the merchant's data (``<merchant folder>/.fedshop/privacy-state.json``,
    ``client.merchant.resolve_node``), so a later run on the same folders continues its ε;
    only a first run on a folder creates it (with the run's budget), and says so. A run folder
    started by an earlier fedshop kept the state in ``<run-dir>/nodes/<merchant>/``: resuming
    it moves that state to the merchant's folder instead of starting from zero. Synthetic
    merchants have no folder (and no lasting state): their nodes keep it in the run folder.
    """
    from client.merchant import PRIVACY_STATE_FILE, SYNTHETIC_PREFIX, resolve_node
    from shared.privacy.budget import PrivacyState

    if not config.dp or config.data_dir.startswith(SYNTHETIC_PREFIX):
        return []
    created: list[Path] = []
    for pid in range(num_merchants):
        node = resolve_node({"partition-id": pid}, config)
        path = node.state_path
        legacy = Path(config.run_dir) / "nodes" / node.merchant_id / PRIVACY_STATE_FILE
        if not path.exists() and legacy.is_file():
            state = PrivacyState.open(legacy, merchant_id=node.merchant_id, target_epsilon=node.target_epsilon,
                                      target_delta=node.target_delta)
            state.path = path
            state.save()
            log.warning("merchant %s: its privacy state was in the run folder (%s, as an earlier fedshop kept it); "
                        "moved to %s, where every run on this data spends it (ε so far %.4f)",
                        node.merchant_id, legacy, path, state.epsilon())
            continue
        if PrivacyState.create(path, merchant_id=node.merchant_id, target_epsilon=node.target_epsilon,
                               target_delta=node.target_delta):
            created.append(path)
    if created:
        log.info("created the privacy state of %d merchant(s) training for the first time on this data "
                 "(budget ε = %g at δ = %g): %s", len(created), config.target_epsilon, config.target_delta,
                 ", ".join(str(p) for p in created))
    return created


def client_resources(client_cpus: float | None = None) -> dict[str, float]:
    import torch

    # Default: one client at a time per 2 cores: torch already uses both threads, and
    # parallel clients would only contend for them. A GPU is shared by all clients.
    cpus = float(client_cpus if client_cpus else min(2, os.cpu_count() or 1))
    return {"num_cpus": cpus, "num_gpus": 0.5 if torch.cuda.is_available() else 0.0}


def run_simulation(config: RunConfig, *, num_merchants: int, client_app: Any = None,
                   client_cpus: float | None = None) -> None:
    """Run ``config`` on ``num_merchants`` virtual SuperNodes; raises if the ServerApp failed.

    ``client_app`` replaces fedshop's ClientApp (tests use it to inject faulty merchants).
    ``client_cpus`` is the CPU share per client: below the core count, clients run in parallel.
    """
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    prepare_privacy_states(config, num_merchants=num_merchants)
    import ray
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.run import Run

    from client.app import app as default_client_app
    from server.app import app as server_app

    client_app = client_app or default_client_app

    run_config: dict[str, Any] = dict(config.to_mapping())
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.task_identity import TaskIdentity

    # What Flower's own run_simulation does when it makes a Run, plus our run config.
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = run_config
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    backend_config: dict[str, Any] = {
        "client_resources": client_resources(client_cpus),
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    _size_worker_pool_to_actors()
    _join_clients_before_ray_shutdown()
    try:
        # The Flower simulation runtime: the ServerApp runs in a thread here, ClientApps
        # in Ray actors, one virtual SuperNode per merchant. (Private entry point: the
        # public ``run_simulation`` cannot pass a run config.)
        _run_simulation(
            num_supernodes=num_merchants,
            exit_event=_exit_event(),
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config,  # type: ignore[arg-type]
            server_app_context=context,
            # Clients fuse the app's pyproject defaults with the run's overrides from
            # app_dir; Flower only does so for an "app" run, hence is_app.
            app_dir=str(PROJECT_DIR),
            is_app=True,
            run=run,
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()


class _ActorSizedPool(ThreadPoolExecutor):
    """A thread pool whose default size is ample rather than ``cpu_count + 4``; its threads are
    named ``CLIENT_THREAD_PREFIX``."""

    def __init__(self, max_workers: int | None = None, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("thread_name_prefix", CLIENT_THREAD_PREFIX)
        super().__init__(max_workers or MAX_PARALLEL_CLIENTS, *args, **kwargs)


# Ray's core worker ends the whole process, with exit status 1, when a thread calls into Ray
# after ray.shutdown(). On Ctrl-C Flower's simulation runtime sets its stop event and shuts Ray
# down at once (RayBackend.terminate) while its client threads may still be waiting on an actor
# (Ray's workers got the same SIGINT, so the wait ends within moments): the process died before
# it could say "interrupted; resume with" and exit 130 (a CI run of
# tests/simulations/test_simulate.py). So the threads get up to CLIENT_THREADS_JOIN_S to finish
# first.
CLIENT_THREAD_PREFIX = "fedshop-client"
CLIENT_THREADS_JOIN_S = 10.0


def _join_client_threads(timeout_s: float) -> None:
    """Let the client threads finish their work (at most ``timeout_s`` in all). Their pool is
    shut down by then (Flower's ``with ThreadPoolExecutor()`` block has exited, on Ctrl-C too), so
    idle threads leave and running ones leave after their call."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name.startswith(CLIENT_THREAD_PREFIX) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t.name.startswith(CLIENT_THREAD_PREFIX) and t.is_alive()]
    if left:
        log.warning("%d client thread(s) still running after %.0f s; shutting Ray down anyway", len(left), timeout_s)


# Upper bound on clients in flight at once; each costs one mostly idle thread in this process.
MAX_PARALLEL_CLIENTS = 256


def _size_worker_pool_to_actors() -> None:
    """Let every Ray actor the client resources allow actually run a client.

    Flower's simulation runtime starts one worker thread per Ray actor, but inside a
    ``ThreadPoolExecutor()`` left at its default size, ``cpu_count + 4``: on a 2-core machine
    at most 6 clients run at once however many actors there are, and the rest queue behind
    them (measured: 10 clients at 0.2 CPU each started over 3 s instead of together, which
    added ~1.7 s to every round). The threads only wait on Ray futures, so a larger pool costs
    nothing. Applied to Flower's module, not globally; skipped if a Flower release moves it.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    if getattr(vce_api, "ThreadPoolExecutor", None) is ThreadPoolExecutor:
        vce_api.ThreadPoolExecutor = _ActorSizedPool  # type: ignore[attr-defined, misc]
    elif getattr(vce_api, "ThreadPoolExecutor", None) is not _ActorSizedPool:
        log.debug("flwr's simulation runtime has no ThreadPoolExecutor to size; leaving it as it is")


def _join_clients_before_ray_shutdown() -> None:
    """Make Flower's Ray backend let the client threads finish (``_join_client_threads``) before
    it shuts Ray down. Idempotent; skipped if a Flower release moves the backend."""
    try:
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    except ImportError:
        log.debug("flwr's simulation runtime has no RayBackend to adjust; leaving it as it is")
        return
    terminate = RayBackend.terminate
    if getattr(terminate, "joins_client_threads", False):
        return

    @functools.wraps(terminate)
    def joined_then_terminated(self: RayBackend) -> None:
        _join_client_threads(CLIENT_THREADS_JOIN_S)
        terminate(self)

    joined_then_terminated.joins_client_threads = True  # type: ignore[attr-defined]
    RayBackend.terminate = joined_then_terminated  # type: ignore[method-assign]


def _exit_event() -> Any:
    from flwr.supercore.telemetry import EventType

    return EventType.PYTHON_API_RUN_SIMULATION_LEAVE
