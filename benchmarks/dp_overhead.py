"""DP-SGD overhead on MiniLM-L6: step time and peak memory, DP ÷ non-private, per trainable set.

    .venv/bin/python benchmarks/dp_overhead.py [--steps N] [--repeats R] [--modes auto|both] [--out FILE]

What is measured (all in one run, so the ratios compare like with like):

* one configuration = (trainable set, mode); mode is ``none`` (plain AdamW step) or a
  per-sample-gradient mode (Opacus' hooks, ghost, ew, or ``client.bookkeeping``'s bk).
  ``auto`` runs the mode ``client.dp.AUTO_GRAD_SAMPLE_MODE`` picks; ``both`` also runs the
  alternatives (hooks, ghost clipping, book-keeping, expanded weights where few parameters
  train), so the choice can be checked;
* every configuration runs in a fresh interpreter (``subprocess``), so allocator caches, Opacus
  hooks and memory high-water marks of one cannot leak into the next; with ``--repeats R`` each
  runs R times, the configurations interleaved, and the median over the R runs is reported
  (this VM's speed drifts by several per cent between minutes);
* inputs: batch 32 of real-ish (query, product) pairs tokenised to exactly 64 tokens, every
  token real (no padding for any trimming to remove), mixed ctr/rating/relevance targets;
* step time: median wall time of ``--steps`` timed steps after ``--warmup`` steps, and the
  median process CPU time (all threads) of the same steps: on a shared machine other jobs
  stretch wall time, so the CPU-time ratio is the steadier of the two;
* peak memory: growth of the resident set from just before the first step (model, data and
  optimizer built) to the peak over all steps (``VmHWM`` after resetting it via
  ``/proc/self/clear_refs``; ``ru_maxrss`` as a fallback, which may include loading);
* DP steps go through the real Opacus engine (``client.dp.make_private``: Poisson loader,
  DPOptimizer, ghost criterion) but feed the same fixed-size batch each step: the sampler
  does not change the cost of a step, and a fixed size keeps the timing comparable.

Threads: 2 (``torch.set_num_threads``), the merchant machines' core count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dp_overhead.json"
TRAINABLES = ("lora", "top-k", "full", "heads")
# Modes compared with ``--modes both``. Expanded weights materialise every per-sample gradient
# at once (batch × millions of parameters for top-k and full), so it is tried only where few
# parameters train.
ALTERNATIVES = {"lora": ("hooks", "ghost", "ew", "bk"), "heads": ("hooks", "ghost", "ew", "bk"),
                "top-k": ("hooks", "ghost", "bk"), "full": ("hooks", "ghost", "bk")}

BRANDS = ["Northwind", "Acme", "Lumen", "Harbor & Pine", "Vela", "Copperline", "Stonegate", "Brightwell"]
ITEMS = [
    ("leather messenger bag", "full-grain leather, brass buckles, padded 15-inch laptop sleeve, "
     "adjustable cotton strap, two front pockets with magnetic closures"),
    ("stainless steel water bottle", "double-wall vacuum insulation keeps drinks cold for 24 hours and hot "
     "for 12, leak-proof lid, powder-coated finish, BPA-free, fits most cup holders"),
    ("wireless noise cancelling headphones", "over-ear design, 30-hour battery, quick charge, "
     "bluetooth 5.3, memory foam cushions, foldable with hard travel case and aux cable"),
    ("cast iron skillet", "pre-seasoned 12-inch pan for stovetop, oven, grill or campfire, "
     "even heat retention, helper handle, works on induction, hand wash recommended"),
    ("running shoes", "lightweight breathable mesh upper, responsive foam midsole, rubber outsole "
     "with multi-directional traction, reflective details, available in wide sizes"),
    ("ergonomic office chair", "adjustable lumbar support, 4D armrests, breathable mesh back, "
     "tilt lock, height adjustable seat, heavy-duty nylon base, 300 lb capacity"),
    ("organic cotton bed sheets", "queen size 4-piece set, 300 thread count percale weave, deep pockets "
     "fit mattresses up to 16 inches, pre-washed for softness, machine washable"),
    ("led desk lamp", "dimmable with five color temperatures, USB charging port, flexible gooseneck, "
     "touch controls, auto-off timer, eye-caring flicker-free light"),
]
QUERIES = ["bag for work laptop", "insulated bottle", "headphones for travel", "skillet for induction",
           "shoes for running wide", "chair with lumbar support", "cotton sheets queen", "desk lamp dimmable"]


# ----------------------------------------------------------------------------- child side


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _batch(tokenizer: Any, batch_size: int, seq_len: int) -> list[Any]:
    import torch

    from shared.model import tokenize_pairs
    from shared.tasks import Example, pack_targets

    contexts, products, packed = [], [], []
    for i in range(batch_size):
        name, details = ITEMS[i % len(ITEMS)]
        brand = BRANDS[(i * 3) % len(BRANDS)]
        # Long enough that every one of the seq_len positions is a real token.
        products.append(f"{brand} {name} - {details}. {details}. Ships in 2 days, 30-day returns.")
        task = ("ctr", "rating", "relevance")[i % 3]
        contexts.append(QUERIES[i % len(QUERIES)] if task != "rating" else "")
        target = {"ctr": float(i % 2), "rating": float(1 + i % 5), "relevance": float(i % 4)}[task]
        packed.append(pack_targets([Example(task, contexts[-1], products[-1], target)]))
    enc = tokenize_pairs(tokenizer, contexts, products, seq_len)
    if enc["input_ids"].shape != (batch_size, seq_len) or not bool(enc["attention_mask"].all()):
        raise RuntimeError("benchmark inputs must fill all positions with real tokens")
    return [enc["input_ids"].contiguous(), enc["attention_mask"].contiguous(), enc["token_type_ids"].contiguous(),
            torch.tensor(packed, dtype=torch.float32)]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from client import dp
    from shared.model import ModelSpec, build_model, count_parameters, load_tokenizer
    from shared.tasks import PerExampleLoss

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    spec = ModelSpec(encoder=job["encoder"], trainable=job["trainable"], top_k_layers=job["top_k_layers"],
                     dropout=0.1, max_seq_len=job["seq_len"], seed=0)
    model = build_model(spec)
    tokenizer = load_tokenizer(spec)
    batch = _batch(tokenizer, job["batch_size"], job["seq_len"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: Any = torch.optim.AdamW(params, lr=1e-4)
    criterion: Any = PerExampleLoss()
    train_model: Any = model
    if job["mode"] != "none":
        loader = DataLoader(TensorDataset(*batch), batch_size=job["batch_size"])
        private = dp.make_private(model=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                  noise_multiplier=1.0, max_grad_norm=1.0, mode=job["mode"], seed=0)
        train_model, optimizer, criterion = private.model, private.optimizer, private.criterion
    train_model.train()

    gc.collect()
    load_before = os.getloadavg()[0]
    rss_before_kb = _status_kb("VmRSS")
    exact_peak = _reset_peak()
    times, cpu_times = [], []
    for step in range(job["warmup"] + job["steps"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        scores = train_model(batch[0], batch[1], batch[2])
        loss = criterion(scores, batch[3])
        loss.backward()
        optimizer.step()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if step >= job["warmup"]:
            times.append(elapsed)
            cpu_times.append(cpu)
    if exact_peak:
        peak_kb = _status_kb("VmHWM")
    else:  # whole-process peak, loading included: an upper bound on the growth
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = count_parameters(model)
    return {
        **{k: job[k] for k in ("trainable", "mode")},
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "cpu_s_median": statistics.median(cpu_times),  # all threads; less sensitive to other load
        "rss_before_mb": (rss_before_kb or 0) / 1024,
        "peak_mb": (peak_kb or 0) / 1024,
        "peak_growth_mb": max(0.0, ((peak_kb or 0) - (rss_before_kb or 0)) / 1024),
        "peak_exact": exact_peak,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "final_loss": float(loss.item()),
        # 1-minute load average around the timed steps: above --threads, other jobs shared the
        # cores and wall times (less so CPU times) are inflated.
        "loadavg_1m": [load_before, os.getloadavg()[0]],
    }


# ----------------------------------------------------------------------------- parent side


def _spawn(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{job['trainable']}/{job['mode']} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _combine(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per configuration: the median over its repeats (fresh processes, interleaved
    with the other configurations, so a slow spell of the machine hits every one alike)."""
    by_config: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        by_config.setdefault((run["trainable"], run["mode"]), []).append(run)
    combined = []
    for repeats in by_config.values():
        result = dict(repeats[0])
        for key in ("step_s_median", "cpu_s_median", "peak_growth_mb"):
            result[key] = statistics.median(r[key] for r in repeats)
        result["loadavg_1m"] = [x for r in repeats for x in r["loadavg_1m"]]
        result["repeats"] = [{k: r[k] for k in ("step_s_median", "cpu_s_median", "peak_growth_mb")}
                             for r in repeats]
        combined.append(result)
    return combined


def _rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = {r["trainable"]: r for r in results if r["mode"] == "none"}
    rows = []
    for r in results:
        if r["mode"] == "none":
            continue
        b = base[r["trainable"]]
        rows.append({
            "trainable": r["trainable"],
            "mode": r["mode"],
            "auto": r["auto"],
            "trainable_params": r["trainable_params"],
            "total_params": r["total_params"],
            "nonprivate_step_s": b["step_s_median"],
            "dp_step_s": r["step_s_median"],
            "time_ratio": r["step_s_median"] / b["step_s_median"],
            "nonprivate_cpu_s": b["cpu_s_median"],
            "dp_cpu_s": r["cpu_s_median"],
            "cpu_time_ratio": r["cpu_s_median"] / b["cpu_s_median"],
            "nonprivate_peak_growth_mb": b["peak_growth_mb"],
            "dp_peak_growth_mb": r["peak_growth_mb"],
            "memory_ratio": (r["peak_growth_mb"] / b["peak_growth_mb"]) if b["peak_growth_mb"] > 0 else None,
            "max_loadavg_1m": max(*r["loadavg_1m"], *b["loadavg_1m"]),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| trainable | DP mode | trainable params | non-private s/step | DP s/step | time DP÷NP "
        "| CPU time DP÷NP | NP peak +MB | DP peak +MB | memory DP÷NP |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = f"{r['memory_ratio']:.2f}×" if r["memory_ratio"] is not None else "n/a"
        mode = f"{r['mode']} (auto)" if r["auto"] else r["mode"]
        lines.append(
            f"| {r['trainable']} | {mode} | {r['trainable_params']:,} | {r['nonprivate_step_s']:.3f} "
            f"| {r['dp_step_s']:.3f} | {r['time_ratio']:.2f}× | {r['cpu_time_ratio']:.2f}× "
            f"| {r['nonprivate_peak_growth_mb']:.0f} "
            f"| {r['dp_peak_growth_mb']:.0f} | {mem} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocations, caches)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per configuration, interleaved; medians over them are reported")
    parser.add_argument("--modes", choices=("auto", "both"), default="both",
                        help="auto: only client.dp's choice; both: every mode in ALTERNATIVES too")
    parser.add_argument("--extra-modes", nargs="*", default=[], choices=("hooks", "ghost", "ew", "bk"),
                        help="further modes to run for every trainable set (ew: expanded weights, "
                             "bk: book-keeping clipping)")
    parser.add_argument("--trainable", nargs="+", choices=TRAINABLES, default=list(TRAINABLES))
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k-layers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_one(json.loads(args.child))), flush=True)
        return 0
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1 and --warmup >= 0")

    sys.path.insert(0, str(ROOT))
    from client.dp import AUTO_GRAD_SAMPLE_MODE

    common = {"encoder": args.encoder, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "threads": args.threads, "top_k_layers": args.top_k_layers, "steps": args.steps,
              "warmup": args.warmup}
    runs = []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for trainable in args.trainable:
            auto = AUTO_GRAD_SAMPLE_MODE[trainable]
            modes = ["none", auto]
            if args.modes == "both":
                modes += [m for m in ALTERNATIVES[trainable] if m not in modes]
            modes += [m for m in args.extra_modes if m not in modes]
            for mode in modes:
                elapsed = time.perf_counter() - started
                print(f"[{elapsed:6.0f}s] repeat {repeat + 1}/{args.repeats} {trainable:6s} {mode} ...",
                      file=sys.stderr, flush=True)
                result = _spawn({**common, "trainable": trainable, "mode": mode}, args.timeout_s)
                result["auto"] = mode == auto
                runs.append(result)
    results = _combine(runs)

    rows = _rows(results)
    table = markdown(rows)
    print(table)
    busiest = max(r["max_loadavg_1m"] for r in rows) if rows else 0.0
    if busiest > args.threads:
        print(f"\nnote: 1-minute load average reached {busiest:.1f} (> {args.threads} threads) during "
              "timing; wall-time ratios are unreliable, prefer the CPU-time and memory columns")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "what": "DP-SGD step time and peak RSS growth, DP ÷ non-private, one fresh process per configuration",
        "settings": {**common, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "optimizer": "adamw",
                     "modes": args.modes, "torch_threads": args.threads, "repeats": args.repeats},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count()},
        "versions": _versions(),
        "rows": rows,
        "raw": runs,
        "markdown": table,
        "wall_s": time.perf_counter() - started,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "opacus", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


if __name__ == "__main__":
    sys.exit(main())
