"""Time of planning a merchant's σ (``shared.privacy.accounting.noise_for_budget``), with and without the hint.

    .venv/bin/python benchmarks/noise_planning.py [--repeats R] [--out FILE]

A merchant with ``noise-plan-calls`` re-plans σ before every training call: the least σ at
which its remaining calls fit the budget after what it has spent. Without a hint that is a
bisection over [floor, 100] (about a dozen ε evaluations); with the previous call's σ as the
hint (``PrivacyState.planned_noise``) a run whose plan holds needs two. This times one
re-plan, after three of eight planned calls, for the sample rates of the utility benchmark's
merchants (q = 1: ESCI's 180-250 records in batches of 1,024; q = 0.17 and 0.06: reviews'
``bottoms`` and ``tops``), ε = 1 and 8, both ways in the same run, and checks that both
answers fit the budget. Median over ``--repeats``; the ratio is hintless ÷ hinted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.privacy.accounting import epsilon, noise_for_budget  # noqa: E402
from shared.privacy.events import MechanismEvent  # noqa: E402

DELTA, STEPS, CALLS, SPENT = 1e-4, 15, 8, 3


def plan(target: float, q: float, *, hint: float | None, history: list[MechanismEvent]) -> tuple[float, float]:
    """(σ, seconds) of one re-plan of the remaining calls."""
    start = time.perf_counter()
    sigma = noise_for_budget(target, DELTA, sample_rate=q, steps=STEPS, calls=CALLS - SPENT, history=history,
                             hint=hint)
    return sigma, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "noise_planning.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the PRV accountant warns on extreme σ during the search
    rows = []
    for q in (1.0, 0.17, 0.06):
        for target in (1.0, 8.0):
            first = noise_for_budget(target, DELTA, sample_rate=q, steps=STEPS, calls=CALLS)
            history = [MechanismEvent(noise_multiplier=first, sample_rate=q, steps=STEPS, max_grad_norm=1.0)] * SPENT
            times: dict[str, list[float]] = {"without": [], "with": []}
            sigmas = {}
            for _ in range(args.repeats):
                for label, hint in (("without", None), ("with", first)):
                    sigmas[label], seconds = plan(target, q, hint=hint, history=history)
                    times[label].append(seconds)
            for label, sigma in sigmas.items():
                event = MechanismEvent(noise_multiplier=sigma, sample_rate=q, steps=STEPS, max_grad_norm=1.0)
                spent = epsilon(history + [event] * (CALLS - SPENT), DELTA)
                if spent > target:
                    raise AssertionError(f"q={q}, ε={target}: σ {sigma} planned {label} the hint overspends ({spent})")
            row = {"sample_rate": q, "target_epsilon": target, "sigma_without_hint": sigmas["without"],
                   "sigma_with_hint": sigmas["with"], "seconds_without_hint": statistics.median(times["without"]),
                   "seconds_with_hint": statistics.median(times["with"])}
            row["ratio"] = row["seconds_without_hint"] / row["seconds_with_hint"]
            rows.append(row)
            print(f"q = {q:<5} ε = {target:<4} σ {sigmas['without']:.3f} / {sigmas['with']:.3f}   "
                  f"{row['seconds_without_hint']:.2f} s without the hint, {row['seconds_with_hint']:.2f} s with: "
                  f"{row['ratio']:.1f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "steps": STEPS, "calls": CALLS, "spent_calls": SPENT,
                                    "delta": DELTA, "rows": rows}, indent=1) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
