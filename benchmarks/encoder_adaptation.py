"""Encoder adaptation under DP (issue #23, item 3): does training MiniLM's top layers pay at ε = 8?

    nice -n 10 .venv/bin/python benchmarks/encoder_adaptation.py [--fold 0/5] [--arms NAME ...]
        [--seeds 0] [--step-time] [--work DIR] [--out benchmarks/results/encoder_adaptation]

Two measurements, both on the bundled reviews (6 merchants), MiniLM-L6, this machine:

- ``--step-time``: one private step (book-keeping clipping, as ``trainable = top-k`` runs) at a
  batch of 1,024 reviews, through the whole model (the top k layers train, the rest is frozen
  but still runs) against the top k layers from cached states after layer L − k
  (``client.top_layers``), and what encoding those states once costs.
- the arms: real ``fedshop simulate`` runs of the default recipe (``reviews.toml``: heads on the
  frozen encoder, batches of 1,024, 8 rounds x 15 steps, σ planned for 8 calls at ε = 8 per
  merchant) against the same recipe with ``trainable = top-k`` and ``encoder-rounds`` R: heads
  only for 8 − R rounds, then the top k layers and heads. Each run's final model is scored
  exactly on every merchant's held-out records of the fold (as ``benchmarks/utility.py
  --fold``: up to 1,024 held-out examples a merchant), AUC, log-loss and RMSE macro over the
  merchants. None of the arms whitens the heads with public text (``precondition-corpus``, which
  the utility benchmark adds to its heads arms): it needs a frozen encoder in every round.

Writes ``OUT.json`` (every run's per-merchant figures, σ, wall time) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import utility  # this folder's benchmark: its data, held-out sets, simulation runner and metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("encoder_adaptation")

EPSILON = 8.0
METRICS = utility.HEADLINE["reviews"]  # ctr_auc, ctr_logloss, rating_rmse

# Each arm: run-config keys on top of the recipe's federated DP arm at ε = 8.
ARMS: dict[str, dict[str, Any]] = {
    "heads": {},
    "top1-r2-lr3e-4": {"trainable": "top-k", "top-k-layers": 1, "encoder-rounds": 2, "learning-rate": 3e-4},
    "top1-r2-lr1e-3": {"trainable": "top-k", "top-k-layers": 1, "encoder-rounds": 2, "learning-rate": 1e-3},
    "top1-r2-lr1e-4": {"trainable": "top-k", "top-k-layers": 1, "encoder-rounds": 2, "learning-rate": 1e-4},
    "top1-r1-lr1e-3": {"trainable": "top-k", "top-k-layers": 1, "encoder-rounds": 1, "learning-rate": 1e-3},
    "top1-r4-lr3e-4": {"trainable": "top-k", "top-k-layers": 1, "encoder-rounds": 4, "learning-rate": 3e-4},
    "top2-r2-lr3e-4": {"trainable": "top-k", "top-k-layers": 2, "encoder-rounds": 2, "learning-rate": 3e-4},
}


def setting() -> utility.Setting:
    """The recipe's heads setting without public-text whitening (a frozen encoder only)."""
    return dataclasses.replace(utility.SETTINGS["heads"], public_corpus={})


def evaluate(dataset: utility.Dataset, params: dict[str, Any], overrides: dict[str, Any]
             ) -> dict[str, dict[str, float]]:
    """Each merchant's exact metrics on its held-out records for the run's final parameters."""
    from client import evaluation
    from shared.config import RunConfig
    from shared.model import ModelSpec, build_model, choose_device, load_tokenizer, set_trainable

    config = RunConfig.from_mapping({**dataset.config.to_mapping(), **overrides})
    spec = ModelSpec.from_config(config)
    model = build_model(spec)
    set_trainable(model, params)
    tokenizer = load_tokenizer(spec)
    device = choose_device(config.device)
    return {m: evaluation.metrics_of(dataset.tests[m],
                                     evaluation.predict(model, dataset.tests[m], tokenizer, config, device=device)[1])
            for m in dataset.merchants}


def run_arm(dataset: utility.Dataset, work: Path, name: str, seed: int) -> dict[str, Any]:
    overrides = {**dataset.federated_private_keys(EPSILON), **ARMS[name], "seed": seed}
    run_dir = work / "runs" / f"{name}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun of the arm starts a new run, not a resumed one
    started = time.perf_counter()
    params, summary = utility.simulate(dataset, run_dir, overrides)
    trained_s = time.perf_counter() - started
    per_merchant = evaluate(dataset, params, ARMS[name])
    record = {"arm": name, "seed": seed, "overrides": ARMS[name], "train_s": round(trained_s, 1),
              "rounds": summary["rounds_completed"],
              "epsilon": {m: p["epsilon"] for m, p in summary["privacy"].items()},
              "noise_multiplier": utility.noise_used(run_dir), "per_merchant": per_merchant,
              "macro": {metric: utility.macro_of(per_merchant, metric) for metric in METRICS}}
    log.info("%s seed %d: %s (%.0f s)", name, seed, {k: round(v, 4) for k, v in record["macro"].items()}, trained_s)
    return record


def step_time(dataset: utility.Dataset, *, batch: int = 1024, steps: int = 3) -> dict[str, Any]:
    """Seconds per private step (book-keeping clipping, C = 1, no noise: noise is the same cost
    both ways) at ``batch`` reviews: whole model vs. top k layers from cached states."""
    import torch

    from client import top_layers
    from client.bookkeeping import BookKeepingLoss, BookKeepingModule
    from client.encoding import PairDataset, trim
    from shared.model import ModelSpec, build_model, load_tokenizer
    from shared.tasks import PerExampleLoss

    cpu = torch.device("cpu")
    examples = [e for m in dataset.merchants for e in dataset.splits[m].train]
    out: dict[str, Any] = {"batch": batch, "steps": steps, "threads": torch.get_num_threads()}
    for k in (1, 2):
        config = dataset.config.replace(trainable="top-k", top_k_layers=k)
        spec = ModelSpec.from_config(config)
        model, tokenizer = build_model(spec), load_tokenizer(spec)
        records = PairDataset(examples, tokenizer, max_seq_len=config.max_seq_len)
        rows = [records[i] for i in range(batch)]
        whole_batch = trim([torch.stack([r[j] for r in rows]) for j in range(4)], cpu)
        started = time.perf_counter()
        states, mask = top_layers.encode_lower(model, tokenizer, records.pairs[:batch],
                                               depth=top_layers.depth_of(model, k), max_seq_len=config.max_seq_len,
                                               device=cpu)
        encode_s = time.perf_counter() - started
        cached = top_layers.TopLayersView.batch((states, mask, whole_batch[3]), cpu)

        def timed(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor
                  ) -> tuple[float, float]:
            """(wall, CPU) seconds of the fastest of ``steps`` steps after a warm-up. CPU time is
            the process's: on a shared machine the wall time measures the neighbours too."""
            private = BookKeepingModule(module, max_grad_norm=1.0)
            times = []
            for _ in range(steps + 1):  # the first step warms up
                wall, cpu_s = time.perf_counter(), time.process_time()
                BookKeepingLoss(private, PerExampleLoss())(private(*inputs), targets).backward()
                times.append((time.perf_counter() - wall, time.process_time() - cpu_s))
                module.zero_grad(set_to_none=True)
            private.remove_hooks()
            return min(times[1:])

        whole_wall, whole_cpu = timed(model, tuple(whole_batch[:3]), whole_batch[3])
        top_wall, top_cpu = timed(top_layers.TopLayers(model, top_layers.depth_of(model, k)), tuple(cached[:2]),
                                  cached[2])
        with torch.no_grad():
            wall, cpu_s = time.perf_counter(), time.process_time()
            model(*whole_batch[:3])
            forward = (time.perf_counter() - wall, time.process_time() - cpu_s)
        out[f"top-{k}"] = {"whole_model_step_s": round(whole_wall, 3), "cached_step_s": round(top_wall, 3),
                           "whole_model_step_cpu_s": round(whole_cpu, 3), "cached_step_cpu_s": round(top_cpu, 3),
                           "ratio_cpu": round(whole_cpu / top_cpu, 2),
                           "whole_forward_no_grad_s": round(forward[0], 3),
                           "whole_forward_no_grad_cpu_s": round(forward[1], 3),
                           "encode_lower_s_per_1k_records": round(encode_s * 1000 / batch, 2),
                           "tokens": int(whole_batch[0].shape[1])}
        log.info("top-%d: %s", k, out[f"top-{k}"])
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: the mean macro figures over its runs, and the lowest-highest run."""
    arms: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == name]
        arms[name] = {"runs": len(mine), "overrides": mine[0]["overrides"],
                      "train_s": round(statistics.fmean(r["train_s"] for r in mine), 1)}
        for metric in METRICS:
            values = [r["macro"][metric] for r in mine if math.isfinite(r["macro"][metric])]
            arms[name][metric] = statistics.fmean(values) if values else math.nan
            arms[name][f"{metric}_range"] = [min(values), max(values)] if values else []
    return arms


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Encoder adaptation under DP", "",
             f"Reviews, 6 merchants, MiniLM-L6, ε = {EPSILON:g} per merchant, fold {results['fold']}; "
             "the default recipe (heads on the frozen encoder) against top-k layers trained in the last "
             "`encoder-rounds` rounds. Macro over merchants of exact metrics on the held-out records "
             "(`benchmarks/encoder_adaptation.py`; figures in the JSON beside this file).", ""]
    if results.get("step_time"):
        st = results["step_time"]
        lines += [f"## Private step at a batch of {st['batch']} ({st['threads']} threads)", "",
                  "CPU seconds of the process (wall seconds on this shared machine measure its neighbours too).",
                  "",
                  "| trained | whole model, s/step | cached lower states, s/step | ratio | whole forward, no grad, s |",
                  "|---|---:|---:|---:|---:|"]
        for k in (1, 2):
            if "ratio_cpu" in st.get(f"top-{k}", {}):
                t = st[f"top-{k}"]
                lines.append(f"| top-{k} + heads | {t['whole_model_step_cpu_s']:.2f} | {t['cached_step_cpu_s']:.2f} | "
                             f"{t['ratio_cpu']:.1f}x | {t['whole_forward_no_grad_cpu_s']:.2f} |")
        lines.append("")
    if results.get("arms"):
        lines += ["## Arms", "", "| arm | keys | runs | AUC | log-loss | RMSE | train s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, a in results["arms"].items():
            keys = ", ".join(f"{k}={v}" for k, v in a["overrides"].items()) or "(recipe)"
            lines.append(f"| {name} | {keys} | {a['runs']} | {a['ctr_auc']:.4f} | {a['ctr_logloss']:.4f} | "
                         f"{a['rating_rmse']:.4f} | {a['train_s']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", default="0/5", help="k/K held-out window (default 0/5: the scenario's split)")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=sorted(ARMS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--step-time", action="store_true", help="also time a private step at batch 1,024")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "encoder_adaptation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encoder_adaptation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    fold = utility.Fold.parse(args.fold)
    work = args.work / f"fold{fold.index}of{fold.count}"
    dataset = utility.Dataset("reviews", work, encoder="minilm", quick=False, setting=setting(), fold=fold)
    out_json = args.out.with_suffix(".json")
    # Earlier runs of this fold are kept: arms run one at a time within the time at hand.
    results: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if results.get("fold") != str(fold):
        results = {"fold": str(fold), "runs": []}
    results["machine"] = "2-core CPU, no GPU (nice -n 10)"
    if args.step_time:
        results["step_time"] = step_time(dataset)
    for seed in args.seeds:
        for name in args.arms:
            results["runs"] = [r for r in results["runs"] if (r["arm"], r["seed"]) != (name, seed)]
            results["runs"].append(run_arm(dataset, work, name, seed))
            results["arms"] = summarise(results["runs"])
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=1, default=float))
            args.out.with_suffix(".md").write_text(markdown(results))
    out_json.write_text(json.dumps(results, indent=1, default=float))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
