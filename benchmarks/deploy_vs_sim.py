"""Round time of the same federated work in a real deployment and in the simulation engine.

    .venv/bin/python benchmarks/deploy_vs_sim.py [--rounds 5] [--encoder tiny|minilm] [--isolation process]
        [--log-stream] [--work lora|recipe] [--out benchmarks/results/deploy_vs_sim.json]

Same work both ways: three small CSV merchants (``tests/helpers/merchants.py``), the tiny test
encoder (or ``--encoder minilm``), LoRA, 3 local DP steps, every merchant trained and evaluated
each round. ``--work recipe`` is the default scenario's recipe instead (``reviews.toml``'s
training keys: heads on a frozen MiniLM-L6, batches of up to 1,024, 15 steps a call, an
evaluation every 4th round and after the last) on three departments of the bundled reviews
(``RECIPE_MERCHANTS``): the work a deployed merchant of the default actually does.
The merchants report their timings (``report-timings = true``: the run config in
simulation, and each kit's node config in the deployment, since a deployed node sends them only
by its own choice).

- simulation: ``fedshop simulate`` (one process; ClientApps in warm Ray actors);
- deployment: ``fedshop deploy init`` + ``add-merchant`` x3 on loopback, a TLS SuperLink with
  node authentication, three SuperNodes (their generated start scripts), ``flwr run``. The
  operator's ``flwr run`` submits the run and returns; the benchmark waits for the run's
  summary file. ``--log-stream`` adds the same deployment with ``flwr run --stream`` (the
  operator watching the logs), whose streaming costs the shared 2-core box's CPU (the CLI's
  and the SuperLink's), where an operator's CLI would run on another machine.

A round is measured from one checkpoint to the next (train + evaluate + checkpoint), so round 1
(which pays for Ray start-up in simulation) is left out of the steady-state figure. In the
deployment every line of a merchant's start script output is timestamped as it appears, which
splits each message's time at the node into: from the node logging the message (it polls the
SuperLink every 0.5 s when idle, client.supernode) to a ClientApp process taking it (``wait_for_process_s``), and
from there to the node sending the reply (``process_s``: pulling the task, loading the app
from its FAB, the work itself, pushing the reply). The kits run each SuperNode with
``--isolation process`` and warm ClientApp processes (``client/warm.py``: imports paid before
the task arrives); ``warm_up_s`` is what those imports took, off every message's path.
The import cost of a fresh ClientApp is also measured alone (``python -c "import client.app"``).

The machines this runs on have two cores and are often shared: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import warm  # noqa: E402
from server import deploy  # noqa: E402
from shared.run_files import CHECKPOINTS_DIR, METRICS_FILE, SUMMARY_FILE  # noqa: E402
from tests.helpers import deployment as dh  # noqa: E402
from tests.helpers import proc  # noqa: E402
from tests.helpers.merchants import write_merchants  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "deploy_vs_sim.json"
MERCHANTS = ["shop-a", "shop-b", "shop-c"]
# target-epsilon: the run allows every merchant its own budget (the kits' 50, the simulation's
# 1000): at the default 8 the first training call of these small merchants (ε ≈ 10) is refused
# and the run ends after one round in which nobody trained.
WORK = {"encoder": "tiny", "trainable": "lora", "merchants-per-round": 3, "max-local-steps": 3,
        "batch-size": 16, "max-seq-len": 32, "eval-max-examples": 32, "round-timeout-s": 300.0,
        "node-wait-timeout-s": 120.0, "report-timings": True, "target-epsilon": 1000.0}
# --work recipe: the default scenario's training keys (simulations/scenarios/reviews.toml) on
# three of its departments, the smallest (records ~120, ~700, ~1,500: encoded in seconds).
RECIPE_KEYS = ("encoder", "tasks", "max-seq-len", "trainable", "encode-precision", "pooling", "dropout", "batch-size",
               "max-local-steps", "local-epochs", "head-learning-rate", "keep-optimizer-state", "weight-decay",
               "eval-max-examples", "evaluate-every", "noise-multiplier", "max-grad-norm", "clipping")
RECIPE_MERCHANTS = ["trend", "jackets", "intimate"]
# How the nodes run their ClientApps: the kits' warm launcher beside a SuperNode started with
# --isolation process, or Flower's default (a fresh flwr-clientapp per message).
ISOLATIONS = ("process", "subprocess")


class LineClock(threading.Thread):
    """Timestamps each new line of a growing log file (Flower's SuperNode lines carry none)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        offset, partial = 0, ""
        while not self.stop.is_set():
            if self.path.exists():
                with self.path.open("r", errors="replace") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                    offset = fh.tell()
                now = time.monotonic()
                text = partial + chunk
                *done, partial = text.split("\n")
                self.lines += [(now, line) for line in done]
            time.sleep(0.05)


class CheckpointClock(threading.Thread):
    """When each round's checkpoint folder was written (its mtime), noted as it appears: the
    server keeps only the last three, so a run of more rounds cannot be timed afterwards."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.root = run_dir / CHECKPOINTS_DIR
        self.marks: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.look()
            time.sleep(0.05)

    def look(self) -> None:
        for folder in self.root.glob("round-*") if self.root.exists() else ():
            # only a round's folder under its final name, not a save's temporary one
            if folder.name not in self.marks and re.fullmatch(r"round-\d+", folder.name):
                with contextlib.suppress(OSError):  # pruned meanwhile
                    self.marks[folder.name] = folder.stat().st_mtime

    def finish(self) -> list[float]:
        """The marks in round order, the last round's included."""
        self.stop.set()
        self.join()
        self.look()
        return [self.marks[name] for name in sorted(self.marks)]


def round_times(run_dir: Path, marks: list[float]) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    steady = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"round_s_from_round_2": [round(x, 2) for x in steady],
            "train_phase_s": [round(r["wall_s"], 2) for r in rows],
            "client_work_s": [round(r.get("slowest_client_s", r.get("slowest_train_s", 0.0)), 2) for r in rows],
            "mean_round_s": round(statistics.mean(steady), 2) if steady else None,
            "median_round_s": round(statistics.median(steady), 2) if steady else None}


def write_toml(path: Path, values: dict[str, Any]) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def import_cost(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.app"], cwd=ROOT, check=True,
                       env=dh.deploy_env())
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 2)


def run_simulation(work: Path, rounds: int, job: dict[str, Any]) -> dict[str, Any]:
    scenario = write_toml(work / "sim.toml", {**job, "num-server-rounds": rounds, "data-dir": str(work / "data")})
    start = time.monotonic()
    clock = CheckpointClock(work / "sim")
    clock.start()
    result = proc.run(proc.fedshop_command("simulate", "--scenario", str(scenario), "--out", str(work / "sim"),
                                           "--no-exact-scores"),
                      log_dir=work / "sim-log", timeout_s=900, env=dh.deploy_env())
    if result.returncode != 0:
        raise SystemExit(f"simulation failed\n{result.describe()}")
    return {"total_s": round(time.monotonic() - start, 1), **round_times(work / "sim", clock.finish())}


# A ClientApp process taking the task: a warm one (client/warm.py) or a cold flwr-clientapp.
TOOK_TASK = (warm.TOOK_TASK, "Start `flwr-clientapp` process")
WARM_READY = re.compile(re.escape(warm.READY) + r" \(imports ([\d.]+) s\)")


def per_message(clock: LineClock) -> list[dict[str, Any]]:
    """Receiving -> a ClientApp process takes it -> Sending, per message, from one node's timed log."""
    out: list[dict[str, Any]] = []
    recv: float | None = None
    started: float | None = None
    kind = ""
    for t, line in clock.lines:
        if "Receiving:" in line:
            recv, started, kind = t, None, line.split("Receiving:")[1].split()[0]
        elif any(marker in line for marker in TOOK_TASK) and recv is not None:
            started = t
        elif "Sending:" in line and recv is not None:
            out.append({"kind": kind, "receive_to_process_s": round((started or t) - recv, 2),
                        "process_s": round(t - (started or recv), 2)})
            recv = None
    return out


def edit_script(merchant: deploy.MerchantKit, old: str, new: str) -> None:
    script = merchant.dir / deploy.SUPERNODE_SCRIPT
    text = script.read_text()
    if old not in text:
        raise SystemExit(f"{script}: no {old!r} to replace")
    script.write_text(text.replace(old, new, 1))


def report_timings(merchant: deploy.MerchantKit) -> None:
    """Add ``report-timings=true`` to the kit's node config (its start script), as the merchant
    would: a deployed node sends its wall times only when its own node config says so."""
    edit_script(merchant, "dp='true'", "dp='true' report-timings=true")


def recipe_job(rounds: int) -> dict[str, Any]:
    """``WORK``'s deployment settings with the default scenario's training keys, its σ planned
    for this run's rounds."""
    from simulations.engine import load_scenario

    recipe = load_scenario("reviews")
    return {**WORK, **{k: recipe[k] for k in RECIPE_KEYS}, "noise-plan-calls": rounds}


def write_data(work: str, target: Path) -> list[str]:
    """The merchants' folders for ``work``; their names."""
    if work == "lora":
        write_merchants(target, MERCHANTS)
        return MERCHANTS
    from client.sources import adapters

    adapters.prepare_reviews(target.with_name("reviews"))
    for name in RECIPE_MERCHANTS:
        shutil.copytree(target.with_name("reviews") / name, target / name)
    return RECIPE_MERCHANTS


def run_deployment(work: Path, rounds: int, job: dict[str, Any], *, isolation: str = "process",
                   log_stream: bool = False, merchants: list[str] = MERCHANTS) -> dict[str, Any]:
    """``isolation = "subprocess"``: the kits' scripts with ``FEDSHOP_WARM_CLIENTAPP=no``, i.e.
    Flower's default (the node's SuperExec starts a fresh flwr-clientapp per message).
    ``log_stream``: the operator's ``flwr run`` streams the run's logs until it ends."""
    data, work = work / "data", work / f"deploy-{isolation}{'-streamed' if log_stream else ''}"
    env = dh.deploy_env({"FLWR_HOME": str(work / "nobody-home"),
                         **({"FEDSHOP_WARM_CLIENTAPP": "no"} if isolation == "subprocess" else {})})
    port, *node_ports = dh.free_ports(4)
    root = work / "fed"
    init = proc.run(proc.fedshop_command("deploy", "init", str(root), "--address", "127.0.0.1", "--port", str(port)),
                    log_dir=work / "log-init", timeout_s=120, env=env)
    if init.returncode != 0:
        raise SystemExit(init.describe())
    dep = deploy.Deployment.load(root)
    clocks: dict[str, LineClock] = {}
    with dh.services(work / "logs", env) as group:
        superlink = group.start("superlink", ["sh", str(dep.superlink_dir / deploy.SUPERLINK_SCRIPT)])
        superlink.wait_for(r"Uvicorn running on https://", timeout_s=60)
        for name, node_port in zip(merchants, node_ports, strict=True):
            add = proc.run(proc.fedshop_command("deploy", "add-merchant", name, "--dir", str(root), "--data-dir",
                                                str(data / name), "--budget", "50", "--delta", "1e-5",
                                                "--device", "cpu", "--port", str(node_port)),
                           log_dir=work / f"log-add-{name}", timeout_s=120, env=env)
            if add.returncode != 0:
                raise SystemExit(add.describe())
        for m in dep.merchants():
            report_timings(m)
            clocks[m.name] = LineClock(work / "logs" / f"{m.name}.log")
            clocks[m.name].start()
            group.start(m.name, ["sh", str(m.dir / deploy.SUPERNODE_SCRIPT)])
        if isolation == "process":  # the launchers' imports, once per node, before the run
            for node in group.started[1:]:
                node.wait_for(re.escape(warm.READY), timeout_s=300)
        # min-available-nodes = 3: the run's first round waits for the three nodes to connect.
        config = write_toml(work / "deploy.toml", {**job, "num-server-rounds": rounds, "min-available-nodes": 3,
                                                   "run-dir": str(work / "deploy")})
        start = time.monotonic()
        checkpoints = CheckpointClock(work / "deploy")
        checkpoints.start()
        run = group.start("flwr-run", [str(dh.VENV_BIN / "flwr"), "run", str(ROOT), deploy.CONNECTION,
                                       *(["--stream"] if log_stream else []), "--run-config", str(config)],
                          env={**env, "FLWR_HOME": str(dep.flwr_home)})
        if run.wait_exit(1800) != 0:
            raise SystemExit(f"deployment run failed\n{group.logs()}")
        summary = work / "deploy" / SUMMARY_FILE  # written when the run ends
        while not summary.exists():
            if time.monotonic() - start > 1800:
                raise SystemExit(f"deployment run did not finish\n{group.logs()}")
            time.sleep(0.1)
        total = time.monotonic() - start
        time.sleep(0.3)
        for clock in clocks.values():
            clock.stop.set()
    messages = [msg for clock in clocks.values() for msg in per_message(clock)]
    warm_ups = [float(ready.group(1)) for clock in clocks.values() for _, line in clock.lines
                if (ready := WARM_READY.search(line))]

    def mean(kind: str, key: str) -> float | None:
        values = [m[key] for m in messages if m["kind"] == kind]
        return round(statistics.mean(values), 2) if values else None

    return {"total_s": round(total, 1), **round_times(work / "deploy", checkpoints.finish()),
            "per_message_at_node": {k: {"wait_for_process_s": mean(k, "receive_to_process_s"),
                                        "process_s": mean(k, "process_s")} for k in ("train", "evaluate")},
            "messages": len(messages),
            "warm_launchers": {"started": len(warm_ups),
                                "warm_up_s": round(statistics.median(warm_ups), 2) if warm_ups else None,
                                "took_tasks": sum(warm.TOOK_TASK in line for c in clocks.values()
                                                  for _, line in c.lines)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny",
                        help="the same work on the test encoder or on MiniLM-L6 (the default scenario's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--isolation", nargs="+", choices=ISOLATIONS, default=list(ISOLATIONS),
                        help="deploy with the kits' warm ClientApp processes (process), with Flower's "
                        "default (subprocess), or both in turn (default)")
    parser.add_argument("--log-stream", action="store_true",
                        help="also deploy with process isolation and the operator's flwr run --stream")
    parser.add_argument("--work", choices=("lora", "recipe"), default="lora",
                        help="LoRA, 3 steps on small CSV merchants (default), or the default scenario's recipe on "
                             "three bundled reviews departments (MiniLM; --encoder is ignored)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedshop-deploy-vs-sim-") as tmp:
        work = Path(tmp)
        merchants = write_data(args.work, work / "data")
        job = {**WORK, "encoder": args.encoder} if args.work == "lora" else recipe_job(args.rounds)
        result: dict[str, Any] = {"work": {**job, "merchants": merchants, "num-server-rounds": args.rounds},
                                  "cpu_count": os.cpu_count(), "load_before": os.getloadavg()}
        result["clientapp_import_s"] = import_cost()
        result["simulation"] = run_simulation(work, args.rounds, job)
        arms = [("deployment" if isolation == "process" else f"deployment_{isolation}", isolation, False)
                for isolation in args.isolation]
        arms += [("deployment_log_stream", "process", True)] if args.log_stream else []
        for key, isolation, stream in arms:
            result[key] = {"isolation": isolation, "log_stream": stream,
                           **run_deployment(work, args.rounds, job, isolation=isolation, log_stream=stream,
                                            merchants=merchants)}
        result["load_after"] = os.getloadavg()
    sim = result["simulation"]["mean_round_s"]
    for key, _, _ in arms:
        dep = result[key]["mean_round_s"]
        result[f"{key}_over_simulation"] = round(dep / sim, 2) if sim and dep else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
