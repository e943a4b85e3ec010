"""The end-of-run summary: utility per task, ε per merchant, and where the outputs are."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from server.ledger import PrivacyLedger
from server.round_report import shown_metrics
from server.run_log import RunLog
from shared import atomic
from shared.jsonable import finite
from shared.metrics import is_noise_scale
from shared.privacy.events import RELEASE_EVALUATION, RELEASE_UPDATE
from shared.run_files import CHECKPOINTS_DIR, LEDGER_FILE, METRICS_FILE, MODEL_DIR, SUMMARY_FILE
from shared.wire import EVAL_LOSS


def run_summary(run_dir: Path, *, stopped_because: str) -> dict[str, Any]:
    run_dir = Path(run_dir)
    rows = RunLog(run_dir).rows()
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        latest = {r.merchant_id: r for r in ledger.rows()}  # rows are ordered: last one wins
        privacy = {
            m: {"epsilon": r.epsilon_reported, "budget": r.epsilon_budget, "delta": r.event.delta,
                "rounds": sum(1 for x in ledger.rows(m) if x.status != "refused" and x.event.release == RELEASE_UPDATE),
                "evaluations": sum(1 for x in ledger.rows(m) if x.event.release == RELEASE_EVALUATION)}
            for m, r in sorted(latest.items())
        }
        rounds = ledger.last_round()
        merchant_rounds = ledger.merchant_level_rows()
    final_eval: dict[str, Any] = next((r["eval_metrics"] for r in reversed(rows) if r.get("eval_metrics")), {})
    return {
        "run_dir": str(run_dir),
        "rounds_completed": rounds,
        "stopped_because": stopped_because,
        "final_eval": final_eval,
        "privacy": privacy,
        **({"merchant_level": {"epsilon": merchant_rounds[-1].epsilon, "delta": merchant_rounds[-1].delta,
                               "noise_multiplier": merchant_rounds[-1].noise_multiplier,
                               "clip_norm": merchant_rounds[-1].clip_norm, "rounds": len(merchant_rounds)}}
           if merchant_rounds else {}),
        "outputs": {
            "metrics": str(run_dir / METRICS_FILE),
            "ledger": str(run_dir / LEDGER_FILE),
            "checkpoints": str(run_dir / CHECKPOINTS_DIR),
            "model": str(run_dir / MODEL_DIR),
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"fedshop run finished: {summary['rounds_completed']} round(s); {summary['stopped_because']}"]
    if summary["final_eval"]:
        spread = any(is_noise_scale(k) for k in summary["final_eval"])
        lines.append("utility on merchants' held-out data (last round; DP: from the merchants' pooled noised sums, "
                     "shared.eval_sums; baselines in brackets"
                     + ("; ± one standard deviation of the noise alone, ± ? where the noise could leave "
                        "the figure undefined, so no spread is estimated" if spread else "") + "):")
        for key, text, note in shown_metrics(summary["final_eval"]):
            if key != EVAL_LOSS:
                lines.append(f"  {key:<22} {text}" + (f"  {note}" if note else ""))
    lines.append("privacy spent per merchant (ε at δ, cumulative / budget):")
    for merchant, p in summary["privacy"].items():
        eps = "no DP" if not math.isfinite(p["epsilon"]) else f"{p['epsilon']:.3f}"
        lines.append(f"  {merchant:<22} ε {eps} / {p['budget']:.3f} at δ {p['delta']:.0e}, {p['rounds']} round(s), "
                     f"{p.get('evaluations', 0)} evaluation(s)")
    if "merchant_level" in summary:
        m = summary["merchant_level"]
        lines.append(f"merchant-level DP (secagg+): ε {m['epsilon']:.3f} at δ {m['delta']:.0e} over {m['rounds']} "
                     f"round(s), σ_m {m['noise_multiplier']:.3f}, C_m {m['clip_norm']:g}")
    lines.append("outputs:")
    for name, path in summary["outputs"].items():
        lines.append(f"  {name:<12} {path}")
    return "\n".join(lines)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    atomic.write_json(path, finite(summary))
    return path
