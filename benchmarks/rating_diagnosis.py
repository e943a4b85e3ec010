"""Why a run's rating head does or does not beat the constant mean: per merchant, the exported
model's rating predictions on every held-out rating, as correlation with the ratings, bias (mean
prediction minus mean rating) and spread (the predictions' standard deviation), beside the RMSE
and the held-out mean's.

    .venv/bin/python benchmarks/rating_diagnosis.py WORK_DIR [--out FILE]

WORK_DIR is a ``benchmarks/default_run.py --work`` folder (``run/`` and ``merchants/`` in it).
A model beats the constant only when its correlation pays for its spread and bias:
RMSE² = bias² + sd_pred² + sd_y² − 2·corr·sd_pred·sd_y. A benchmark-side measurement on the
merchants' raw held-out data: no merchant releases these figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from default_run import served_merchants  # this folder's benchmark: the run's merchants as served

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def diagnose(work: Path) -> dict[str, dict[str, float]]:
    from client import evaluation

    out: dict[str, dict[str, float]] = {}
    for m in served_merchants(work / "run", work / "merchants", work):
        rated = [e for e in m.split.test if e.task == "rating"]
        if len(rated) < 2:
            continue
        _, pred = evaluation.predict(m.model, rated, m.tokenizer, m.config, feature_cache=m.feature_cache,
                                     offsets=m.offsets)
        p = np.asarray(pred, dtype=float)
        y = np.array([e.target for e in rated])
        out[m.name] = {"held_out_ratings": float(len(y)), "correlation": float(np.corrcoef(p, y)[0, 1]),
                       "bias": float(p.mean() - y.mean()), "prediction_sd": float(p.std()),
                       "rating_sd": float(y.std()),  # also the held-out mean's RMSE
                       "rmse": float(np.sqrt(((p - y) ** 2).mean()))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = diagnose(args.work)
    for merchant, m in result.items():
        print(f"{merchant:<14} n={m['held_out_ratings']:5.0f} corr {m['correlation']:+.3f} bias {m['bias']:+.3f} "
              f"sd {m['prediction_sd']:.3f}  RMSE {m['rmse']:.3f} vs mean {m['rating_sd']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
