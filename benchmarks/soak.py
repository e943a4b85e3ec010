"""A soak with faults: a TLS deployment with node authentication on loopback, one run, and the
faults a federation meets, then the checks that nothing was lost or counted twice.

    .venv/bin/python benchmarks/soak.py [--out benchmarks/results/soak.json] [--keep DIR]

The full soak (``FULL``): 20 rounds, six merchants (tiny encoder, LoRA, DP), every connected
merchant sampled each round. Five merchants start with the deployment; during the run

- a merchant's update is malformed (an array with the wrong shape) in one round, and another
  merchant's is over ``max-update-norm`` in another (``tests/helpers/soak_app.py``: the merchant
  really trains and spends, then damages its update; the run is submitted from a copy of the
  project whose pyproject names that ClientApp);
- a merchant's SuperNode is SIGKILLed as its training message arrives and its start script
  run again at once; the round ends without it once the SuperLink declares it gone (its
  heartbeat lapses), and it is back for a later round;
- at a round boundary the SuperLink is SIGKILLed and its start script run again (same
  ``--database``). Flower 1.42 does not carry a run across a SuperLink restart: the ServerApp
  exits with its SuperLink (Flower's parent-process monitors), ``flwr run --stream`` ends, and
  the restarted SuperLink lists the run as running, later as failed. So the soak does what the
  operator does (docs/deploy.md, "When the SuperLink restarts"): restart the SuperLink and
  submit the run again with ``resume = true`` and the same ``run-dir``. The run continues from
  its last checkpoint, under the ledger's run id;
- a sixth merchant's node joins late, after the restart.

The SuperLink dies between rounds, not mid-round: the soak stops (SIGSTOP) the ServerApp
process as a round's checkpoint appears, and kills the SuperLink once no node has received a
message of the next round within a node's poll interval (else it lets the round run and tries
the next boundary). A crash mid-round loses the replies the ServerApp had not yet written to
the ledger, and the merchants who sent them hold spend the ledger does not show (their own
state files have it, and ``fedshop audit --node-state`` reports it): that is a loss the
deployment cannot undo, so the soak checks the recovery that is possible.

Checks, each with its verdict in the results (and a non-zero exit if any fails): every accepted
update lies in exactly one checkpointed round; each merchant's spend in the ledger equals the
entries of its own state file for the run; ``fedshop audit RUN_DIR`` and ``fedshop audit
--node-state STATE RUN_DIR`` pass for every merchant; no round took longer than its
``round-timeout-s`` plus a small margin; the run finished all its rounds; and each fault did
what it should (the two damaged updates rejected with their reasons, the killed node failed in
its round and back afterwards, the late joiner accepted).

``tests/simulations/test_soak.py`` runs the same driver at a smaller scale (``SMALL``).
The machines this runs on have two cores and are often shared: round times are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server import deploy  # noqa: E402
from server.checkpoint import LATEST_FILE  # noqa: E402
from server.ledger import PrivacyLedger  # noqa: E402
from shared.privacy.events import RELEASE_UPDATE  # noqa: E402
from shared.run_files import CHECKPOINTS_DIR, LEDGER_FILE, METRICS_FILE, SUMMARY_FILE  # noqa: E402
from simulations import cli  # noqa: E402
from tests.helpers import deployment as dh  # noqa: E402
from tests.helpers import proc  # noqa: E402
from tests.helpers.merchants import write_merchants  # noqa: E402
from tests.helpers.soak_app import FAULT_ENV  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "soak.json"
SOAK_CLIENTAPP = "tests.helpers.soak_app:app"
# A round may overrun round-timeout-s by this much: the ServerApp's last pull, the ledger and
# the aggregation come after the deadline.
TIMEOUT_MARGIN_S = 15.0
# Idle nodes ask the SuperLink for work every 3 s (Flower 1.42): a message pushed this long ago
# has been taken.
POLL_S = 4.5
UP = r"Uvicorn running on https://127\.0\.0\.1"  # the SuperLink serves
# What flower-supernode logs (INFO) as a message arrives.
RECEIVED = re.compile(r"Receiving: \w+ message")
TRAIN_RECEIVED = re.compile(r"Receiving: train message")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the soak does and when (round numbers are the run's)."""

    merchants: tuple[str, ...]  # nodes started with the deployment
    late: str  # a merchant whose node first starts during the run ...
    late_round: int  # ... as round late_round begins (``Soak.start_late``): it trains from a later round
    rounds: int
    malformed: tuple[str, int]  # (merchant, round): an update of the wrong shape
    over_norm: tuple[str, int]  # (merchant, round): an update over max-update-norm
    killed: tuple[str, int] | None  # (merchant, round): its node SIGKILLed as that round's message arrives
    crash_after: int  # the SuperLink is killed once this round is checkpointed (or the next it can)
    # "process": SIGKILL flower-superlink alone, and Flower's parent-process monitors end its
    # SuperExec and ServerApp (8 s here); "host": SIGKILL all of them at once, as a machine crash
    crash: str
    round_timeout_s: float
    min_nodes: int  # min-available-nodes of the first submission
    resume_min_nodes: int  # ... and of the resumed one
    inspect_runs: bool = True  # `flwr ls` after the restart (what the SuperLink says of the dead run)

    @property
    def everyone(self) -> tuple[str, ...]:
        return (*self.merchants, self.late)


FULL = Plan(merchants=("shop-1", "shop-2", "shop-3", "shop-4", "shop-5"), late="shop-6", late_round=14,
            rounds=20, malformed=("shop-2", 4), over_norm=("shop-4", 16), killed=("shop-3", 6), crash_after=10,
            crash="process", round_timeout_s=90.0, min_nodes=5, resume_min_nodes=5)
# The test's: three rounds, the SuperLink crashing after round 1 (or, if round 2 had already gone
# out, after round 2); no node killed (test_deploy.py kills one; the SuperLink takes up to a
# minute to let go of it); the resumed run waits for the late joiner.
SMALL = Plan(merchants=("shop-a", "shop-b", "shop-c"), late="shop-d", late_round=1, rounds=3,
             malformed=("shop-b", 1), over_norm=("shop-c", 3), killed=None, crash_after=1, crash="host",
             round_timeout_s=60.0, min_nodes=3, resume_min_nodes=4, inspect_runs=False)

WORK = {"encoder": "tiny", "trainable": "lora", "max-local-steps": 2, "batch-size": 16, "max-seq-len": 32,
        "eval-max-examples": 16,
        # No evaluation: the merchants release none, and the server sends evaluation messages only
        # after the last round (a message round trip less per round).
        "evaluate": False, "evaluate-every": 1000, "target-epsilon": 1000.0, "max-update-norm": 1000.0}
BUDGET = 200.0  # each merchant's own ε budget: ample for 20 training calls of these small merchants


def run_config(plan: Plan, run_dir: Path, *, resume: bool) -> dict[str, Any]:
    return {**WORK, "num-server-rounds": plan.rounds, "merchants-per-round": len(plan.everyone),
            "min-available-nodes": plan.resume_min_nodes if resume else plan.min_nodes,
            "node-wait-timeout-s": 300.0, "round-timeout-s": plan.round_timeout_s, "run-dir": str(run_dir),
            "resume": resume}


def write_toml(path: Path, values: dict[str, Any]) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def soak_project(dest: Path) -> Path:
    """A copy of the project whose ClientApp is the soak's (what ``flwr run`` builds the FAB from)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "test_*.py")
    for package in ("client", "server", "shared", "simulations"):
        shutil.copytree(ROOT / package, dest / package, ignore=ignore)
    shutil.copytree(ROOT / "tests" / "helpers", dest / "tests" / "helpers", ignore=ignore)
    for name in ("README.md", ".gitignore"):
        shutil.copy2(ROOT / name, dest / name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    patched = pyproject.replace('clientapp = "client.app:app"', f'clientapp = "{SOAK_CLIENTAPP}"')
    if patched == pyproject:
        raise RuntimeError("pyproject.toml: no `clientapp = \"client.app:app\"` to replace")
    (dest / "pyproject.toml").write_text(patched)
    return dest


# --------------------------------------------------------------------------- watching
def count(service: dh.Service, pattern: re.Pattern[str]) -> int:
    return len(pattern.findall(service.text()))


def latest_round(run_dir: Path) -> int:
    try:
        return int((run_dir / CHECKPOINTS_DIR / LATEST_FILE).read_text())
    except (OSError, ValueError):
        return 0


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Watch(threading.Thread):
    """Records every checkpoint round as ``LATEST`` names it (the checkpoints folder keeps only the
    last three) and prints a progress line per round as the run log gains it."""

    def __init__(self, run_dir: Path, rounds: int, t0: float) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.rounds, self.t0 = run_dir, rounds, t0
        self.checkpointed: list[int] = []
        self.printed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            time.sleep(0.1)
        self.poll()

    def poll(self) -> None:
        latest = latest_round(self.run_dir)
        if latest and (not self.checkpointed or self.checkpointed[-1] != latest):
            self.checkpointed.append(latest)
        rows = metrics_rows(self.run_dir)
        for row in rows[self.printed:]:
            print(f"[{time.monotonic() - self.t0:6.0f} s] round {row['round']}/{self.rounds}: "
                  f"accepted {sorted(row['accepted'])}, refused {sorted(row['refused'])}, "
                  f"rejected {sorted(row['rejected'])}, failed {sorted(row['failed'])}, "
                  f"wall {row['wall_s']:.1f} s", flush=True)
        self.printed = len(rows)


# --------------------------------------------------------------------------- the soak
@dataclasses.dataclass
class Soak:
    plan: Plan
    work: Path
    t0: float = dataclasses.field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    submissions: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = self.work / "data"
        self.logs = self.work / "logs"
        self.run_dir = self.work / "run"
        ports = dh.free_ports(2 + len(self.plan.everyone))
        self.public_port, self.control_port, *node_ports = ports
        self.node_ports = dict(zip(self.plan.everyone, node_ports, strict=True))
        # FEDSHOP_RESTART_DELAY_S: a node that cannot (re)join retries every 5 s.
        self.env = dh.deploy_env({"FLWR_HOME": str(self.work / "nobody-home"), "FEDSHOP_RESTART_DELAY_S": "5"})
        self.nodes: dict[str, dh.Service] = {}
        self.watch = Watch(self.run_dir, self.plan.rounds, self.t0)

    def note(self, what: str, **details: Any) -> None:
        event = {"t_s": round(time.monotonic() - self.t0, 1), "round_checkpointed": latest_round(self.run_dir),
                 "event": what, **details}
        self.events.append(event)
        print(f"[{event['t_s']:6.0f} s] {what} {json.dumps(details) if details else ''}", flush=True)

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self, group: dh.Services) -> None:
        self.group = group
        self.dep = deploy.init_deployment(self.work / "fed", names=["localhost"], addresses=["127.0.0.1"],
                                          port=self.public_port, control_port=self.control_port)
        self.superlink = self.start_superlink("superlink", wait=False)
        # while it starts: the merchants' data and kits, the project copy the runs are built from
        write_merchants(self.data, list(self.plan.everyone))
        self.project = soak_project(self.work / "project")
        kits = [deploy.add_merchant(self.dep, m, data_dir=self.data / m, budget=BUDGET, delta=1e-5, device="cpu",
                                    port=self.node_ports[m]) for m in self.plan.everyone]
        self.superlink.wait_for(UP, timeout_s=90)
        threads = [threading.Thread(target=deploy.register_merchant, args=(self.dep, kit)) for kit in kits]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.kits = {kit.name: kit for kit in self.dep.merchants()}
        missing = [m for m in self.plan.everyone if not self.kits[m].node_id]
        if missing:
            raise RuntimeError(f"not registered: {missing}\n{group.logs()}")
        for m in self.plan.merchants:
            self.start_node(m)
        self.note("deployment up", merchants=list(self.plan.merchants))

    def start_superlink(self, name: str, *, wait: bool = True) -> dh.Service:
        service = self.group.start(name, ["sh", str(self.dep.superlink_dir / deploy.SUPERLINK_SCRIPT)])
        if wait:
            service.wait_for(UP, timeout_s=90)
        return service

    def start_node(self, merchant: str, *, name: str | None = None) -> None:
        env = dict(self.env)
        for kind, (who, rnd) in (("shape", self.plan.malformed), ("norm", self.plan.over_norm)):
            if who == merchant:
                env[FAULT_ENV] = f"{kind}@{rnd}"
        self.nodes[merchant] = self.group.start(name or merchant, [
            "sh", str(self.kits[merchant].dir / deploy.SUPERNODE_SCRIPT)], env=env)

    def submit(self, name: str, *, resume: bool) -> dh.Service:
        config = write_toml(self.work / f"{name}.toml", run_config(self.plan, self.run_dir, resume=resume))
        cmd = [str(dh.VENV_BIN / "flwr"), "run", str(self.project), deploy.CONNECTION, "--stream",
               "--run-config", str(config)]
        service = self.group.start(name, cmd, env={**self.env, "FLWR_HOME": str(self.dep.flwr_home)})
        self.note("run submitted", name=name, resume=resume)
        return service

    def operator(self, name: str, *args: str) -> proc.Run:
        return dh.run_cli([str(dh.VENV_BIN / "flwr"), *args], log_dir=self.logs / name,
                          env={**self.env, "FLWR_HOME": str(self.dep.flwr_home)}, timeout_s=60)

    # ---- during the run --------------------------------------------------------------------
    def received(self) -> dict[str, int]:
        return {m: count(s, RECEIVED) for m, s in self.nodes.items()}

    def kill_node(self, merchant: str, rnd: int) -> None:
        """SIGKILL the merchant's whole SuperNode (script, node, ClientApp processes) as its training
        message of round ``rnd`` arrives, before it could train or spend; its script is run again at
        once (same key, same state), as a service manager would. The round ends without it once the
        SuperLink declares it gone (its heartbeat lapses: up to 20 s), and it gets back in then."""
        node = self.nodes[merchant]  # sampled in every round so far: its rnd-th message is round rnd's
        node.wait_for(TRAIN_RECEIVED.pattern, count=rnd, timeout_s=rnd * (self.plan.round_timeout_s + 120))
        node.kill()
        self.note("node killed (SIGKILL, as its training message arrived)", merchant=merchant, round=rnd)
        self.start_node(merchant, name=f"{merchant}-restarted")
        self.note("node restarted (its start script)", merchant=merchant)

    def start_late(self, run: dh.Service) -> None:
        """Start the late joiner's node as round ``late_round`` begins: once round ``late_round - 1``
        is checkpointed, or for round 1 once one of the first merchants received its message."""
        rnd = self.plan.late_round
        while run.alive():
            if rnd > 1 and latest_round(self.run_dir) >= rnd - 1:
                break
            if rnd <= 1 and any(count(self.nodes[m], TRAIN_RECEIVED) for m in self.plan.merchants):
                break
            time.sleep(0.2)
        self.start_node(self.plan.late)
        self.note("late joiner started", merchant=self.plan.late)

    def serverapp(self, timeout_s: float = 120) -> int:
        """The run's ServerApp process (below the SuperLink: its SuperExec starts it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = [p for p in dh.descendants([self.superlink.popen.pid]) if "flwr-serverapp" in _cmdline(p)]
            if len(pids) == 1:
                return pids[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"expected one flwr-serverapp process under the SuperLink, found {pids}")
            time.sleep(0.5)

    def pause_between_rounds(self, first: dh.Service) -> tuple[int, int]:
        """The moment the SuperLink dies: at a round boundary, with nothing of the next round out.

        As ``LATEST`` names round ``crash_after`` (or a later one), the ServerApp process is
        stopped (SIGSTOP) and the soak watches the nodes for one poll interval: if none received a
        message, the next round's messages never went out, and the SuperLink can die with nothing
        in flight. If one did, the ServerApp is let go (SIGCONT) and that round runs its course
        as usual; the next boundary is tried. Returns (the round, the stopped ServerApp's pid)."""
        plan = self.plan
        latest = self.run_dir / CHECKPOINTS_DIR / LATEST_FILE
        while first.alive():
            before = latest_round(self.run_dir)
            if before >= plan.rounds - 1:
                break
            pid = self.serverapp()  # looked up before the boundary: it scans /proc
            # from the round before the boundary: poll tightly, to stop the ServerApp within
            # milliseconds of its checkpoint (it pushes the next round's messages right after)
            while latest_round(self.run_dir) == before and first.alive():
                time.sleep(0.002 if before >= plan.crash_after - 1 else 0.2)
            rnd = latest_round(self.run_dir)
            if rnd < plan.crash_after:
                continue
            os.kill(pid, signal.SIGSTOP)
            after_ms = round((time.time() - latest.stat().st_mtime) * 1000)
            seen = self.received()
            time.sleep(POLL_S)
            if self.received() == seen:
                self.note("ServerApp stopped at a round boundary (nothing of the next round out)", round=rnd,
                          stopped_after_checkpoint_ms=after_ms)
                return rnd, pid
            os.kill(pid, signal.SIGCONT)
            self.note("the next round had gone out; trying the next boundary", round=rnd,
                      stopped_after_checkpoint_ms=after_ms)
        raise RuntimeError("no round boundary with nothing in flight before the run's last round")

    def kill_superlink(self, serverapp: int) -> None:
        """Kill the SuperLink ("process": SIGKILL flower-superlink, a crash; its script then stops
        nginx and exits, and the stopped ServerApp is let go: it exits through Flower's parent-process
        monitors, its SuperExec's parent being the SuperLink and its own the SuperExec. "host":
        SIGKILL the script, nginx, the SuperLink, its SuperExec and the ServerApp at once)."""
        t_kill = time.monotonic()
        if self.plan.crash == "host":
            self.superlink.kill()
            self.note("SuperLink host crash (SIGKILL: script, nginx, SuperLink, SuperExec, ServerApp)",
                      took_s=round(time.monotonic() - t_kill, 1))
            return
        tree = dh.descendants([self.superlink.popen.pid])
        link = [p for p in tree if "flower-superlink" in _cmdline(p)]
        below = [p for p in tree if p not in link and "nginx" not in _cmdline(p) and p != self.superlink.popen.pid]
        if len(link) != 1:
            raise RuntimeError(f"expected one flower-superlink process under the script, found {link}")
        os.kill(link[0], signal.SIGKILL)
        os.kill(serverapp, signal.SIGCONT)
        script_exit = self.superlink.wait_exit(30)
        t_script = time.monotonic() - t_kill
        # The old ServerApp must be gone before a SuperLink is back on its address: let go, it
        # would go on with the next round there.
        deadline = time.monotonic() + 30
        while any(proc.is_alive(p) for p in below) and time.monotonic() < deadline:
            time.sleep(0.1)
        outlived = [p for p in below if proc.is_alive(p)]
        self.note("SuperLink killed (SIGKILL)", script_exit=script_exit, script_exited_after_s=round(t_script, 1),
                  serverapp_and_superexec_exited=not outlived,
                  they_exited_after_s=round(time.monotonic() - t_kill, 1))
        self.superlink.kill()  # anything of its tree still left (nothing, when Flower's monitors worked)
        for p in outlived:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)

    # ---- the whole soak ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        plan = self.plan
        if plan.killed and not (plan.killed[0] in plan.merchants and plan.killed[1] <= plan.crash_after):
            raise ValueError("the killed node is one of the first merchants, killed before the SuperLink is")
        self.watch.start()
        self.t_submit = time.monotonic()
        # Submitted as the nodes start: the ServerApp's start overlaps theirs, and its first round
        # waits (bounded) for min-available-nodes of them.
        first = self.submit("flwr-run-1", resume=False)
        for m in plan.merchants:
            self.nodes[m].wait_for(rf"SuperNode ID: {self.kits[m].node_id}\b", timeout_s=180)
        late_started = False
        if plan.late_round <= plan.crash_after:
            self.start_late(first)
            late_started = True
        if plan.killed:
            self.kill_node(*plan.killed)
        crashed, serverapp = self.pause_between_rounds(first)
        self.kill_superlink(serverapp)
        first_exit = first.wait_exit(60)
        if first_exit is None:  # still retrying: the operator stops it
            first.kill()
        self.submissions.append({"name": "flwr-run-1", "exit": first_exit, "tail": _tail(first)})
        self.superlink = self.start_superlink("superlink-restarted")
        self.note("SuperLink restarted (same --database)")
        if plan.inspect_runs:
            listed = self.operator("ls-after-restart", "ls", deploy.CONNECTION, "--format", "json")
            self.note("flwr ls after the restart", runs=_runs(listed))
        second = self.submit("flwr-run-2", resume=True)
        if not late_started:
            self.start_late(second)
        second_exit = second.wait_exit(plan.rounds * (plan.round_timeout_s + 300))
        self.submissions.append({"name": "flwr-run-2", "exit": second_exit, "tail": _tail(second)})
        self.note("run ended", exit=second_exit)
        if plan.inspect_runs:
            listed = self.operator("ls-at-end", "ls", deploy.CONNECTION, "--format", "json")
            self.note("flwr ls at the end", runs=_runs(listed))
        self.watch.stop.set()
        self.watch.join()
        return self.results(finished=second_exit == 0, crashed_after=crashed)

    # ---- the verdicts --------------------------------------------------------------------------
    def results(self, *, finished: bool, crashed_after: int) -> dict[str, Any]:
        plan = self.plan
        rows = metrics_rows(self.run_dir)
        with PrivacyLedger(self.run_dir / LEDGER_FILE) as ledger:
            ledger_rows = ledger.rows()
            run_id = ledger.meta()["run_id"]
        checkpointed = sorted(set(self.watch.checkpointed))
        checks: dict[str, dict[str, Any]] = {}

        def check(name: str, passed: bool, detail: Any) -> None:
            checks[name] = {"passed": bool(passed), "detail": detail}

        # The run finished: every round once in the run log, the summary written, the last
        # submission's `flwr run` exited 0.
        rounds_logged = [r["round"] for r in rows]
        summary_path = self.run_dir / SUMMARY_FILE
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        check("run_finished", finished and rounds_logged == list(range(1, plan.rounds + 1))
              and summary.get("rounds_completed") == plan.rounds,
              {"flwr_run_exit": self.submissions[-1]["exit"], "rounds_logged": rounds_logged,
               "summary_rounds_completed": summary.get("rounds_completed")})

        # Every accepted update in exactly one checkpointed round: one ledger row per (round,
        # merchant, release), the ledger's accepted updates of each round are the run log's, and
        # that round was checkpointed (LATEST named it).
        dupes = [k for k, n in Counter((r.round, r.merchant_id, r.event.release) for r in ledger_rows).items() if n > 1]
        accepted_ledger: dict[int, set[str]] = defaultdict(set)
        for r in ledger_rows:
            if r.status == "accepted" and r.event.release == RELEASE_UPDATE:
                accepted_ledger[r.round].add(r.merchant_id)
        accepted_log = {r["round"]: set(r["accepted"]) for r in rows}
        mismatched = sorted(n for n in set(accepted_ledger) | set(accepted_log)
                            if accepted_ledger.get(n, set()) != accepted_log.get(n, set()))
        not_checkpointed = sorted(n for n in accepted_ledger if n not in checkpointed)
        check("accepted_updates_each_in_one_checkpointed_round",
              not dupes and not mismatched and not not_checkpointed and checkpointed == list(range(1, plan.rounds + 1)),
              {"accepted_updates": sum(len(v) for v in accepted_ledger.values()), "duplicate_ledger_rows": dupes,
               "rounds_where_ledger_and_run_log_differ": mismatched, "accepted_in_rounds_never_checkpointed":
               not_checkpointed, "checkpointed_rounds": checkpointed})

        # Each merchant's spend: the ledger's rows that spent == its state file's entries of this run.
        spend: dict[str, Any] = {}
        for m in plan.everyone:
            state = json.loads(self.kits[m].privacy_state.read_text()) if self.kits[m].privacy_state.exists() else {}
            entries = sorted((e["round"], e["event"].get("release", RELEASE_UPDATE))
                             for e in state.get("entries", []) if e.get("run_id") == run_id)
            ledger_spent = sorted((r.round, r.event.release) for r in ledger_rows
                                  if r.merchant_id == m and r.event.mechanism.steps > 0)
            spend[m] = {"ledger_rows": len(ledger_spent), "state_entries": len(entries),
                        "equal": entries == ledger_spent, "reservations_left": len(state.get("reservations", []))}
        check("ledger_rows_equal_each_merchants_state_entries", all(v["equal"] for v in spend.values()), spend)

        audits = {"run": self.audit(str(self.run_dir))}
        for m in plan.everyone:
            audits[m] = self.audit("--node-state", str(self.kits[m].privacy_state), str(self.run_dir))
        check("fedshop_audit_passes", all(a["exit"] == 0 for a in audits.values()), audits)

        limit = plan.round_timeout_s + TIMEOUT_MARGIN_S
        slow = {r["round"]: round(r["wall_s"], 1) for r in rows if r["wall_s"] > limit}
        check("no_round_past_its_timeout", not slow, {"limit_s": limit, "over": slow})

        by_round = {r["round"]: r for r in rows}
        faults: dict[str, Any] = {}
        for name, (who, rnd), reason in (("malformed", plan.malformed, "has shape"),
                                         ("over_norm", plan.over_norm, "exceeds max-update-norm")):
            got = by_round.get(rnd, {}).get("rejected", {}).get(who, "")
            rejected_once = [r["round"] for r in rows if who in r["rejected"]]
            faults[name] = {"merchant": who, "round": rnd, "reason": got,
                            "passed": reason in got and rejected_once == [rnd]}
        if plan.killed:
            who, rnd = plan.killed
            back = [r["round"] for r in rows if who in r["accepted"] and r["round"] > rnd]
            faults["killed_node"] = {"merchant": who, "round": rnd, "failed": by_round.get(rnd, {}).get("failed", {}),
                                     "accepted_again_in_rounds": back,
                                     "passed": who in by_round.get(rnd, {}).get("failed", {}) and bool(back)}
        late = [r["round"] for r in rows if plan.late in r["accepted"]]
        faults["late_joiner"] = {"merchant": plan.late, "accepted_in_rounds": late, "passed": bool(late)}
        first_run_rounds = [r["round"] for r in rows if r["round"] <= crashed_after]
        faults["superlink_restart"] = {"after_round": crashed_after,
                                       "first_submission_exit": self.submissions[0]["exit"],
                                       "passed": first_run_rounds == list(range(1, crashed_after + 1))
                                       and crashed_after < plan.rounds}
        check("faults_did_what_they_should", all(f["passed"] for f in faults.values()), faults)

        return {
            "plan": dataclasses.asdict(plan),
            "rounds_completed": len(rows),
            "round_timeout_s": plan.round_timeout_s,
            "wall_s": round(time.monotonic() - self.t0, 1),
            "run_wall_s": round(time.monotonic() - self.t_submit, 1),  # first submission to here (audits done)
            "refusals": sum(len(r["refused"]) for r in rows),
            "rejections": sum(len(r["rejected"]) for r in rows),
            "failures": sum(len(r["failed"]) for r in rows),
            "rounds": [{"round": r["round"], "accepted": sorted(r["accepted"]), "refused": sorted(r["refused"]),
                        "rejected": r["rejected"], "failed": r["failed"], "wall_s": round(r["wall_s"], 2)}
                       for r in rows],
            "checks": checks,
            "passed": all(c["passed"] for c in checks.values()),
            "events": self.events,
            "submissions": self.submissions,
        }

    def audit(self, *args: str) -> dict[str, Any]:
        """``fedshop audit ARGS`` (its exit code and last line), in this process: no interpreter
        start-up per merchant."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["audit", *args])
        return {"exit": code, "tail": out.getvalue().strip().splitlines()[-1:]}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tail(service: dh.Service) -> list[str]:
    """The last lines of a command's output, without terminal colours and rich's boxes."""
    lines = (" ".join(re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", line).split()) for line in service.text().splitlines())
    return [line for line in lines if line][-5:]


def _runs(listed: proc.Run) -> list[dict[str, Any]] | str:
    try:
        return [{"run-id": r["run-id"], "status": r["status"]} for r in json.loads(listed.stdout)["runs"]]
    except (ValueError, KeyError, TypeError):
        return listed.output[-500:]


def soak(plan: Plan, work: Path) -> dict[str, Any]:
    """Set up the deployment in ``work``, run the plan, stop every process; the results."""
    driver = Soak(plan, work)
    with dh.services(driver.logs, driver.env) as group:
        try:
            driver.setup(group)
            return driver.run()
        except BaseException:
            print(group.logs(), file=sys.stderr)
            raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedshop-soak-")))
        work.mkdir(parents=True, exist_ok=True)
        result = soak(FULL, work)
    result["machine"] = "2-core CPU box"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, verdict in result["checks"].items():
        print(f"{'PASS' if verdict['passed'] else 'FAIL'}  {name}")
    print(f"rounds completed {result['rounds_completed']}, refusals {result['refusals']}, rejections "
          f"{result['rejections']}, failures {result['failures']}, wall {result['wall_s']:.0f} s -> {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
