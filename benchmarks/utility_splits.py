"""Pool utility-benchmark runs made on different held-out splits (not a test).

    .venv/bin/python benchmarks/utility.py --trainable heads --datasets esci --split-seed 1 ...
    .venv/bin/python benchmarks/utility_splits.py RESULTS.json [RESULTS.json ...] [--out STEM]

One held-out split is one draw of the test set: ESCI's is a few dozen queries, and which
queries it holds moves every arm's figures by more than the gaps being judged, the same way
for every arm of that run. Each input is one ``benchmarks/utility.py`` run (any ``--repeats``)
on its own ``--split-seed`` or ``--fold`` (the K folds of a seed cover every record once);
this takes, for every dataset the runs share, each arm's macro figure per split (the mean
over that run's repeats) and their mean over the splits, and judges the federated ε = 8 arm
against the issue's targets on those means: within 5 % (relative) of centralised and better
than the merchants alone, also split by split. Every arm of a split is scored on the same
queries, so the comparison stays paired within a split. When every run has its held-out
predictions beside it (``STEM.heldout.json.gz``, written since ``--fold``), each pooled gap also
gets a 95 % paired-bootstrap interval over the held-out examples of all the splits at once
(``utility.pooled_bootstrap_gaps``); splits should then hold out disjoint records (the K folds
of one seed), or the interval counts the records held out twice as independent.

Writes ``STEM.json``, ``STEM.md`` and ``STEM.png`` (default ``benchmarks/results/utility-splits``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import utility  # this folder's benchmark: its metrics, target and gap are the ones judged here

from shared import atomic
from shared.config import RunConfig
from shared.jsonable import finite

REFERENCES = utility.REFERENCES


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Each file's results, checked to be poolable: one split each, no split twice, one setting."""
    runs = []
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read utility results ({exc})") from exc
        if not isinstance(results, dict) or not isinstance(results.get("datasets"), dict):
            raise ValueError(f"{path}: not a benchmarks/utility.py results file (no 'datasets')")
        results["_path"] = str(path)
        runs.append(results)
    if len(runs) < 2:
        raise ValueError(f"pooling splits needs at least two results files, got {len(runs)}")
    # "set": utility.py's --set keys, "private": the keys its DP arms add (runs older than either
    # had none, i.e. flat clipping alone).
    for key in ("trainable", "encoder", "set", "private"):
        values = {json.dumps(r.get(key) or None, sort_keys=True) for r in runs}
        if len(values) > 1:
            each = ", ".join(f"{r['_path']}: {r.get(key)}" for r in runs)
            raise ValueError(f"the runs differ in {key!r} ({each}); pool runs of one setting")
    seen: dict[tuple[str, str], str] = {}
    for r in runs:
        for name, result in r["datasets"].items():
            split = split_name(result)
            if (name, split) in seen:
                raise ValueError(f"{r['_path']}: {name} split {split} is already in {seen[name, split]}; "
                                 "each split may count once")
            seen[name, split] = r["_path"]
    return runs


def split_name(result: dict[str, Any]) -> str:
    """The split a dataset's run held out: its seed (its own record, else, for a run from before
    ``--split-seed``, its scenario's ``split-seed``, else the run config's default), and its
    fold when it held out one (``"1 fold 2/3"``)."""
    if result.get("split_seed") is not None:
        seed = int(result["split_seed"])
    else:
        seed = int(result.get("config", {}).get("split-seed", RunConfig.split_seed))
    return f"{seed} fold {result['fold']}" if result.get("fold") else str(seed)


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset every run holds: each arm's per-split macros and their mean; the verdict."""
    names = [n for n in runs[0]["datasets"] if all(n in r["datasets"] for r in runs)]
    if not names:
        raise ValueError("no dataset is in every results file: " + "; ".join(
            f"{r['_path']}: {', '.join(r['datasets'])}" for r in runs))
    pooled: dict[str, Any] = {}
    read: dict[Path, dict[str, utility.HeldOut]] = {}
    for name in names:
        results = [r["datasets"][name] for r in runs]
        metrics = utility.HEADLINE[name]
        arm_names = [a for a in results[0]["arms"] if all(a in res["arms"] for res in results)]
        missing = [a for a in (*REFERENCES, utility.JUDGED_ARM) if a not in arm_names]
        if missing:
            raise ValueError(f"{name}: arm(s) {', '.join(missing)} missing from " + ", ".join(
                r["_path"] for r in runs if any(a not in r["datasets"][name]["arms"] for a in missing)))
        arms = {a: {m: [res["arms"][a]["macro"][m] for res in results] for m in metrics} for a in arm_names}
        mean = {a: {m: statistics.fmean(v) for m, v in by_metric.items()} for a, by_metric in arms.items()}
        merchants = per_merchant(results, arm_names, metrics)
        held_out = held_out_of(runs, name, read)
        intervals = {} if held_out is None else {
            ref: utility.pooled_bootstrap_gaps(held_out, utility.JUDGED_ARM, ref, metrics) for ref in REFERENCES}
        verdict: dict[str, dict[str, Any]] = {}
        for m in metrics:
            dp = arms[utility.JUDGED_ARM][m]
            v: dict[str, Any] = {}
            for ref in REFERENCES:
                v[f"gap_vs_{ref}"] = utility.relative_gap(m, mean[utility.JUDGED_ARM][m], mean[ref][m])
                v[f"gap_vs_{ref}_ci95"] = intervals[ref][m] if intervals else None
                v[f"gap_vs_{ref}_per_split"] = [utility.relative_gap(m, d, r) for d, r in zip(dp, arms[ref][m],
                                                                                               strict=True)]
            v["within_5pct_of_centralised"] = utility.within_target(v["gap_vs_centralised"])
            v["better_than_local"] = v["gap_vs_local"] < 0
            v["splits_within_5pct"] = sum(map(utility.within_target, v["gap_vs_centralised_per_split"]))
            v["splits_better_than_local"] = sum(g < 0 for g in v["gap_vs_local_per_split"])
            v.update(utility.merchant_gaps(m, merchants[utility.JUDGED_ARM], merchants["centralised"]))
            verdict[m] = v
        baseline = {} if utility.POPULARITY_ARM not in arm_names else {
            m: vs_baseline(m, arms, mean, held_out) for m in metrics}
        pooled[name] = {"splits": [split_name(res) for res in results],
                        "repeats": [res.get("repeats", 1) for res in results],
                        "test_queries": [sum(res.get("test_queries", {}).values()) for res in results],
                        "files": [r["_path"] for r in runs],
                        "per_split": arms, "mean": mean,
                        # Every arm's, not only the judged one's: the centralised DP arm's gap is
                        # what privacy costs without federation.
                        "gap_vs_centralised": {a: {m: utility.relative_gap(m, v, mean["centralised"][m])
                                                   for m, v in by_metric.items()} for a, by_metric in mean.items()},
                        "per_merchant": merchants, "verdict": verdict,
                        f"vs_{utility.POPULARITY_ARM}": baseline}
    return pooled


def vs_baseline(metric: str, arms: dict[str, dict[str, list[float]]], mean: dict[str, dict[str, float]],
                held_out: list[utility.HeldOut] | None) -> dict[str, Any]:
    """The judged arm's gap to the popularity baseline in ``metric``: on the means over splits,
    split by split, and its pooled interval when every held-out file has the baseline's
    predictions (``utility.py --arms popularity`` adds them)."""
    judged, baseline = utility.JUDGED_ARM, utility.POPULARITY_ARM
    with_preds = held_out is not None and all(baseline in h.preds for h in held_out)
    return {"gap": utility.relative_gap(metric, mean[judged][metric], mean[baseline][metric]),
            "gap_ci95": (utility.pooled_bootstrap_gaps(held_out, judged, baseline, (metric,))[metric]
                         if with_preds and held_out is not None else None),
            "gap_per_split": [utility.relative_gap(metric, d, b)
                              for d, b in zip(arms[judged][metric], arms[baseline][metric], strict=True)]}


def per_merchant(results: list[dict[str, Any]], arm_names: list[str],
                 metrics: tuple[str, ...]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> merchant -> metric: the mean over the splits that score it (a merchant whose
    held-out share of a split has no informative query has no ranking figure there; NaN if
    none has). Merchants of every split only: the same merchants are compared in every arm."""
    names = [m for m in results[0]["merchants"] if all(m in res["merchants"] for res in results)]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm in arm_names:
        out[arm] = {}
        for merchant in names:
            scored = [res["arms"][arm]["per_merchant"].get(merchant, {}) for res in results]
            figures = {}
            for metric in metrics:
                values = [v for figures_of in scored if math.isfinite(v := figures_of.get(metric, math.nan))]
                figures[metric] = statistics.fmean(values) if values else math.nan
            out[arm][merchant] = figures
    return out


def held_out_of(runs: list[dict[str, Any]], name: str,
                read: dict[Path, dict[str, utility.HeldOut]]) -> list[utility.HeldOut] | None:
    """Each run's held-out predictions for dataset ``name``, or None unless every run has them;
    ``read`` keeps the files already read (a file holds every dataset of its run: read once)."""
    paths = [utility.held_out_path(Path(r["_path"]).with_suffix("")) for r in runs]
    if not all(p.is_file() for p in paths):
        return None
    held_out = []
    for path in paths:
        try:
            if path not in read:
                read[path] = utility.read_held_out(path)
            held_out.append(read[path][name])
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: cannot read {name}'s held-out predictions ({exc!r})") from exc
    return held_out


def markdown(pooled: dict[str, Any]) -> str:
    lines = ["# Utility over held-out splits", "",
             "Each column is one `benchmarks/utility.py` run on its own held-out split (its arms' figures "
             "the mean over that run's repeats); the last column is the mean over splits, on which the "
             "targets are judged. Gaps are relative (positive = worse).", ""]
    for name, p in pooled.items():
        seeds = p["splits"]
        heads = [f"split {s} (×{k}{f', {q} queries' if q else ''})"
                 for s, k, q in zip(seeds, p["repeats"], p["test_queries"], strict=True)]
        lines += [f"## {name}", "", "| arm | metric | " + " | ".join(heads) + " | mean | mean vs centralised |",
                  "|---|---|" + "---:|" * (len(seeds) + 2)]
        for arm, by_metric in p["per_split"].items():
            for metric, values in by_metric.items():
                gap = utility._pct(p["gap_vs_centralised"][arm][metric])
                lines.append(f"| {arm} | {metric} | " + " | ".join(f"{v:.4f}" for v in values)
                             + f" | **{p['mean'][arm][metric]:.4f}** | {gap} |")
        lines += ["", f"{utility.JUDGED_ARM} against the targets:", "",
                  "| metric | gap vs centralised (mean) | within 5 % | splits within 5 % | gap vs local (mean) | "
                  "better than local | splits better than local | worst merchant (gap vs centralised) | "
                  "per split vs centralised / vs local |",
                  "|---|---:|:---:|:---:|---:|:---:|:---:|---|---|"]
        for metric, v in p["verdict"].items():
            per_split = ", ".join(f"{100 * c:+.1f} / {100 * lo:+.1f}" for c, lo in
                                  zip(v["gap_vs_centralised_per_split"], v["gap_vs_local_per_split"], strict=True))
            ci = {ref: " " + utility._interval(v[f"gap_vs_{ref}_ci95"]) if v[f"gap_vs_{ref}_ci95"] else ""
                  for ref in REFERENCES}
            lines.append(f"| {metric} | {100 * v['gap_vs_centralised']:+.1f} %{ci['centralised']} | "
                         f"{utility._yes(v['within_5pct_of_centralised'])} | {v['splits_within_5pct']} / {len(seeds)}"
                         f" | {100 * v['gap_vs_local']:+.1f} %{ci['local']} | {utility._yes(v['better_than_local'])} | "
                         f"{v['splits_better_than_local']} / {len(seeds)} | {v['worst_merchant']} "
                         f"({utility._pct(v['worst_merchant_gap'])}) | {per_split} |")
        if baseline := p.get(f"vs_{utility.POPULARITY_ARM}"):
            lines += ["", f"{utility.JUDGED_ARM} against the `{utility.POPULARITY_ARM}` baseline (per-product "
                      "smoothed means of the pooled training records: non-private, reads no text; positive = "
                      "worse), mean over splits [pooled interval] and per split: " + "; ".join(
                          f"{metric} {utility._pct(v['gap'])}"
                          + (f" {utility._interval(v['gap_ci95'])}" if v["gap_ci95"] else "")
                          + " (" + ", ".join(f"{100 * g:+.1f}" for g in v["gap_per_split"]) + ")"
                          for metric, v in baseline.items()) + "."]
        lines += per_merchant_table(p)
        pooled_ci = any(v["gap_vs_centralised_ci95"] for v in p["verdict"].values())
        lines += ["", ("In brackets: 95 % paired-bootstrap interval of the pooled gap over the held-out examples "
                       "(queries for relevance) of all the splits at once." if pooled_ci else
                       "No pooled interval: not every run has its held-out predictions (`.heldout.json.gz`)."),
                  "", "Runs: " + ", ".join(f"`{f}`" for f in p["files"]), ""]
    return "\n".join(lines)


def per_merchant_table(p: dict[str, Any]) -> list[str]:
    """Each merchant's mean over the splits: the judged arm against its two references."""
    shown = (utility.JUDGED_ARM, *REFERENCES)
    metrics = list(p["verdict"])
    lines = ["", "Per merchant, mean over the splits (" + ", ".join(metrics) + "; gap of "
             f"{utility.JUDGED_ARM} vs centralised, positive = worse):", "",
             "| merchant | " + " | ".join(shown) + " | gap vs centralised |", "|---|" + "---|" * (len(shown) + 1)]
    for merchant in p["per_merchant"]["centralised"]:
        cells = [" / ".join(utility._fmt(p["per_merchant"][arm][merchant][m]) for m in metrics) for arm in shown]
        gaps = " / ".join(utility._pct(p["verdict"][m]["per_merchant_gap_vs_centralised"][merchant]) for m in metrics)
        lines.append(f"| {merchant} | " + " | ".join(cells) + f" | {gaps} |")
    return lines


def plot(pooled: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, metric) for name, p in pooled.items() for metric in utility.HEADLINE[name]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    styles = {"centralised": ("s", "tab:green"), "local": ("^", "tab:orange"), "federated": ("D", "tab:grey"),
              "centralised-dp-eps-8": ("v", "tab:purple"), utility.JUDGED_ARM: ("o", "tab:blue")}
    # Not the popularity baseline: far below the trained arms on most metrics, it would flatten
    # the differences the plot is for (its figures are in the tables).
    for ax, (name, metric) in zip(axes[0], panels, strict=True):
        p = pooled[name]
        xs = list(range(len(p["splits"])))
        for arm, (marker, color) in styles.items():
            if arm not in p["per_split"]:
                continue
            ax.plot(xs, p["per_split"][arm][metric], marker=marker, linestyle="", color=color, label=arm)
            ax.axhline(p["mean"][arm][metric], color=color, linewidth=1, alpha=0.7)
        ax.set_xticks(xs, p["splits"], fontsize=7)
        ax.set_xlabel("held-out split (line: mean over splits)")
        better = "higher" if utility.HIGHER_IS_BETTER[metric] else "lower"
        ax.set_title(f"{name}: {metric} ({better} is better)", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="benchmarks/utility.py JSON files, one split each")
    parser.add_argument("--out", type=Path, default=utility.ROOT / "benchmarks" / "results" / "utility-splits",
                        help="output stem: STEM.json, STEM.md, STEM.png")
    args = parser.parse_args()
    try:
        pooled = pool(load_runs(args.results))
    except ValueError as exc:
        parser.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(utility.with_extension(args.out, ".json"), json.dumps(finite(pooled), indent=1))
    atomic.write_text(utility.with_extension(args.out, ".md"), markdown(pooled))
    plot(pooled, utility.with_extension(args.out, ".png"))
    print(markdown(pooled))
    print(f"written: {args.out}.json, .md, .png")
    return 0 if all(not math.isnan(v["gap_vs_centralised"]) for p in pooled.values()
                    for v in p["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
