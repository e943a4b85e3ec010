"""Federation benchmarks (not a test): framework overhead, memory at scale, upload size.

    .venv/bin/python benchmarks/federation.py [--rounds 5] [--out benchmarks/results/federation.json]

(a) Framework overhead per round, 10 of 1,000 synthetic merchants, tiny encoder, clients in
    parallel (0.2 CPU each): round wall time minus the slowest sampled merchant's time (the
    merchants report it: ``report-timings = true``, off by default), median over rounds.
    Reported against the merchant's DP training loop and against its whole handler (which
    also loads data and builds the model).
(b) ``synthetic-10k`` for 3 rounds: peak total RSS summed over every process of the run
    (driver, Ray daemons, workers), sampled every 0.5 s.
(c) Bytes uploaded per merchant per round, LoRA + heads versus full fine-tuning, MiniLM-L6:
    the float32 payload of exactly the trainable parameters a client sends.
(d) Secure aggregation: the same 10-of-1,000 federation as (a), clients in parallel, once with
    plain aggregation and once with ``aggregation = "secagg+"`` (Flower's SecAgg+: four
    exchanges per round instead of one), then with merchant-level DP on top; median round wall
    time of each and their ratio, and the bytes each merchant uploaded per round (the update's
    float32 arrays, or the masked vector of int64 coordinates; the key exchange's few kB are
    not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from shared.run_files import METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]


def _fedshop(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", *args]


def _ten_of_thousand(rounds: int, run_dir: Path, *, client_cpus: float,
                     extra: dict[str, object] | None = None) -> list[dict]:
    """One run of 10 of 1,000 synthetic merchants (tiny encoder, LoRA); its metrics.jsonl rows."""
    keys = {"data-dir": "synthetic:1000", "run-dir": str(run_dir), "encoder": "tiny", "trainable": "lora",
            "num-server-rounds": rounds, "merchants-per-round": 10, "max-local-steps": 5, "eval-max-examples": 32,
            "target-delta": 1e-4, "report-timings": True, **(extra or {})}
    script = (
        "from simulations.engine import run_simulation; from shared.config import RunConfig;"
        f"c = RunConfig.from_mapping({keys!r});"
        f"run_simulation(c, num_merchants=1000, client_cpus={client_cpus})"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def overhead(rounds: int, workdir: Path, *, client_cpus: float) -> dict[str, float]:
    rows = _ten_of_thousand(rounds, workdir / f"overhead-{client_cpus}", client_cpus=client_cpus)
    # Round 1 includes Ray actor start-up; later rounds are the steady state.
    steady = rows[1:] if len(rows) > 1 else rows
    over_train = [r["wall_s"] - r["slowest_train_s"] for r in steady]
    over_client = [r["wall_s"] - r["slowest_client_s"] for r in steady]
    over_sequential = [r["wall_s"] - r["total_client_s"] for r in steady]
    return {
        "client_cpus": client_cpus,
        "rounds_measured": len(steady),
        "median_round_wall_s": statistics.median(r["wall_s"] for r in steady),
        "median_slowest_train_s": statistics.median(r["slowest_train_s"] for r in steady),
        "median_overhead_vs_training_s": statistics.median(over_train),
        "median_overhead_vs_client_handler_s": statistics.median(over_client),
        # Meaningful when clients run one at a time: wall time no client was working.
        "median_wall_minus_all_handlers_s": statistics.median(over_sequential),
        "first_round_wall_s": rows[0]["wall_s"],
    }


def _senders(row: dict, extra: dict[str, object]) -> int:
    """How many merchants uploaded a vector in a round (``bytes_received`` is their sum)."""
    sent = len(row["accepted"]) + len(row["rejected"])
    return sent + len(row["refused"]) if extra.get("aggregation") == "secagg+" else sent


def secure_aggregation(rounds: int, workdir: Path) -> dict[str, object]:
    """(d): plain against secagg+ against secagg+ with merchant-level DP, same federation."""
    arms: dict[str, dict[str, object]] = {"plain": {}, "secagg+": {"aggregation": "secagg+"},
            "secagg+ merchant-level DP": {"aggregation": "secagg+", "merchant-epsilon": 8.0}}
    out: dict[str, object] = {}
    for name, extra in arms.items():
        rows = _ten_of_thousand(rounds, workdir / f"secagg-{len(out)}", client_cpus=0.2, extra=extra)
        steady = rows[1:] if len(rows) > 1 else rows  # round 1 includes Ray's start-up
        out[name] = {
            "rounds_measured": len(steady),
            "median_round_wall_s": statistics.median(r["wall_s"] for r in steady),
            "median_slowest_client_s": statistics.median(r["slowest_client_s"] for r in steady),
            # Plain: merchants that trained send an update (a refusal sends none); secagg+: every
            # merchant of the round sends a masked vector, a refusing one its zeros at weight 0.
            "upload_bytes_per_merchant": statistics.median(r["bytes_received"] / max(1, _senders(r, extra))
                                                           for r in steady),
            "accepted_per_round": [len(r["accepted"]) for r in rows],
        }
    plain = out["plain"]["median_round_wall_s"]  # type: ignore[index]
    for name in ("secagg+", "secagg+ merchant-level DP"):
        out[f"{name} / plain round time"] = out[name]["median_round_wall_s"] / plain  # type: ignore[index]
    return out


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def scale_memory(workdir: Path) -> dict[str, float]:
    run_dir = workdir / "synthetic-10k"
    proc = subprocess.Popen(_fedshop("simulate", "--scenario", "synthetic-10k", "--out", str(run_dir)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.monotonic()
    sampler.start()
    try:
        code = proc.wait(timeout=1800)
    finally:
        stop.set()
        sampler.join()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return {"exit_code": code, "rounds": len(rows), "peak_total_rss_gb": peak / 1e9,
            "wall_s": time.monotonic() - start,
            "median_round_wall_s": statistics.median(r["wall_s"] for r in rows) if rows else float("nan")}


def upload_bytes() -> dict[str, float]:
    from shared.model import ModelSpec, build_model, get_trainable
    from shared.wire import array_bytes, params_to_record

    out: dict[str, float] = {}
    for trainable in ("lora", "full", "top-k", "heads"):
        params = get_trainable(build_model(ModelSpec(encoder="minilm", trainable=trainable)))
        out[f"{trainable}_bytes"] = array_bytes(params)
        out[f"{trainable}_record_bytes"] = sum(len(a.data) for a in params_to_record(params).values())
    out["lora_over_full"] = out["lora_bytes"] / out["full_bytes"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federation.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=["overhead", "memory", "bytes", "secagg"])
    args = parser.parse_args()
    # A partial run (--skip) updates its own sections of an earlier results file and keeps the rest.
    results: dict[str, object] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = f"{os.cpu_count()} CPU cores, {sys.platform}"
    with tempfile.TemporaryDirectory(prefix="fedshop-bench-") as tmp:
        work = Path(tmp)
        if "overhead" not in args.skip:
            results["overhead_10_of_1000_parallel"] = overhead(args.rounds, work, client_cpus=0.2)
            print(json.dumps(results["overhead_10_of_1000_parallel"], indent=1), flush=True)
            results["overhead_10_of_1000_sequential"] = overhead(args.rounds, work, client_cpus=2.0)
            print(json.dumps(results["overhead_10_of_1000_sequential"], indent=1), flush=True)
        if "secagg" not in args.skip:
            results["secure_aggregation_10_of_1000"] = secure_aggregation(args.rounds, work)
            print(json.dumps(results["secure_aggregation_10_of_1000"], indent=1), flush=True)
        if "memory" not in args.skip:
            results["synthetic_10k"] = scale_memory(work)
            print(json.dumps(results["synthetic_10k"], indent=1), flush=True)
    if "bytes" not in args.skip:
        results["upload"] = upload_bytes()
        print(json.dumps(results["upload"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
