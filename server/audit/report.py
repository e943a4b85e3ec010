"""Human-facing output of an audit: the terminal table, the ε plot, the one-page report."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

from server.audit.ledger_audit import UNDER_REPORT_TOLERANCE, AuditReport


def _eps(value: float) -> str:
    return "no DP" if not math.isfinite(value) else f"{value:.3f}"


def audit_table(report: AuditReport) -> str:
    header = (f"{'merchant':<16} {'rounds':>6} {'steps':>6} {'σ':>10} {'q':>14} {'C':>5} {'δ':>7} "
              f"{'ε recorded':>10} {'ε PLD':>7} {'ε ±1':>7} {'budget':>7} {'left':>7}")
    lines = [header, "-" * len(header)]
    for m in report.merchants:
        sigma = ",".join(f"{s:g}" for s in m.noise_multipliers) or "-"
        rates = ",".join(f"{q:.4g}" for q in m.sample_rates) or "-"
        clip = ",".join(f"{c:g}" for c in m.max_grad_norms) or "-"
        lines.append(f"{m.merchant_id:<16} {m.rounds_joined:>6} {m.total_steps:>6} {sigma:>10} {rates:>14} {clip:>5} "
                     f"{m.delta:>7.0e} {_eps(m.epsilon_recorded):>10} {_eps(m.epsilon_pld):>7} "
                     f"{_eps(m.epsilon_add_remove):>7} {m.budget:>7.3f} {m.remaining:>7.3f}")
    lines.append("ε PLD: replace-one neighbours (N is public; the guarantee). ε ±1: add/remove, for reference only.")
    ml = report.merchant_level
    if ml is not None:
        lines.append(f"merchant-level (secagg+): {len(ml.rounds)} unmasked round(s), σ_m {ml.noise_multiplier:.4g}, "
                     f"C_m {ml.clip_norm:g}, ε recorded {_eps(ml.epsilon_recorded)}, re-derived "
                     f"{_eps(ml.epsilon_derived)} of {ml.target:g} at δ {ml.delta:g}")
    lines.append("")
    if report.passed:
        lines.append(f"audit PASSED: {report.rounds} round(s); {_passed(report)}")
    else:
        lines.append(f"audit FAILED ({len(report.findings)} finding(s)):")
        lines += [f"  - {f}" for f in report.findings]
    if report.warnings:
        lines.append(f"{len(report.warnings)} warning(s) (not failures):")
        lines += [f"  - {w}" for w in report.warnings]
    return "\n".join(lines)


def _passed(report: AuditReport) -> str:
    """What a passed audit showed, in one sentence."""
    if not report.claims_dp:
        return "a non-private run (no DP claimed, none recorded); ledger consistent"
    config = "δ within the run config's" if report.config else "no run config to compare δ with"
    evaluations = sum(m.evaluations for m in report.merchants)
    released = (f"every update and evaluation ({evaluations} noised metric release(s)) private with facts consistent "
                "(σ > 0; updates q = expected batch / N; evaluations q = 1, one step; " if evaluations else
                "every update private with facts consistent (σ > 0, q = expected batch / N, ")
    return (f"no recorded ε below the one re-derived with PLD for replace-one neighbours (by more than "
            f"{UNDER_REPORT_TOLERANCE}); "
            f"no merchant over budget; {released}δ ≤ 1/(10·N); {config}); ledger consistent")


def plot_epsilon(report: AuditReport, path: Path) -> Path:
    """ε per merchant over rounds (recorded, solid; re-derived PLD, dots) against each budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    budgets: set[float] = set()
    for i, m in enumerate(report.merchants):
        if not m.series:
            continue
        colour = colours[i % len(colours)]
        rounds = [p["round"] for p in m.series]
        ax.plot(rounds, [p["recorded"] for p in m.series], "-o", color=colour, ms=3, label=m.merchant_id)
        ax.plot(rounds, [p["pld"] for p in m.series], ":", color=colour, lw=1)
        budgets.add(m.budget)
    for b in sorted(budgets):
        ax.axhline(b, color="crimson", ls="--", lw=1)
        ax.annotate(f"budget ε={b:g}", xy=(0.01, b), xycoords=("axes fraction", "data"), color="crimson",
                    va="bottom", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε per merchant (its privacy unit)")
    ax.set_title("Privacy spent per merchant (solid: recorded, dotted: re-derived, PLD replace-one)")
    if len(report.merchants) <= 12:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_privacy_report(report: AuditReport, path: Path, *, empirical: dict[str, Any] | None = None) -> Path:
    """A one-page Markdown report (with the ε plot beside it) for a data-protection officer."""
    path = Path(path)
    plot = plot_epsilon(report, path.with_suffix(".png"))
    delta = sorted({m.delta for m in report.merchants})
    lines = [
        "# Privacy report",
        "",
        f"Run: `{report.run_dir}` — {report.rounds} round(s). Generated "
        f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} by `fedshop audit`.",
        "",
        "## Guarantee",
        "",
        "- **Type:** (ε, δ)-differential privacy *per merchant*, per privacy unit (the run's `privacy-unit`: "
        "a user's interactions or a query's judgments by default; one record with `privacy-unit = record`): "
        "each merchant's released updates and noised evaluation metrics, together, are (ε, δ)-DP with respect "
        "to replacing one unit's data by any other (the number of units N is public: every reply states it). "
        "It does not protect a merchant's aggregate statistics from the server.",
        "- **Mechanism:** DP-SGD (Opacus): Poisson sampling at rate q, per-example gradient clipping to C, "
        "Gaussian noise σ·C; evaluation metrics (when released): Gaussian noise on clipped per-unit sums "
        "(q = 1, one step); all composed over every local step and release of every round, across restarts.",
        f"- **δ:** {', '.join(f'{d:g}' for d in delta) or 'n/a'}",
        "- **Accountant of record:** Google's dp-accounting PLD for replace-one neighbours, re-derived here "
        "from the recorded mechanisms; ε ±1 is the same for add/remove neighbours (what keeping N secret would "
        "give), shown for reference only.",
        "",
        "## ε per merchant",
        "",
        "| merchant | rounds | steps | σ | ε recorded | ε PLD | ε ±1 | budget | left |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for m in report.merchants:
        lines.append(f"| {m.merchant_id} | {m.rounds_joined} | {m.total_steps} | "
                     f"{', '.join(f'{s:g}' for s in m.noise_multipliers) or '-'} | {_eps(m.epsilon_recorded)} | "
                     f"{_eps(m.epsilon_pld)} | {_eps(m.epsilon_add_remove)} | {m.budget:.3f} | {m.remaining:.3f} |")
    lines += ["", f"![ε per merchant over rounds]({plot.name})", "", "## Accountant agreement and ledger checks", ""]
    if report.passed:
        said = _passed(report)
        lines.append(f"**PASSED.** {said[0].upper()}{said[1:]}: no gaps, no duplicates, and a spend row for "
                     "every training call the run log shows.")
    else:
        lines.append(f"**FAILED** — {len(report.findings)} finding(s):")
        lines.append("")
        lines += [f"- {f}" for f in report.findings]
    if report.warnings:
        lines += ["", f"Warnings ({len(report.warnings)}; recorded ε above the re-derived one is safe, but more "
                  f"than {report.tolerance_abs} + {report.tolerance_rel:.0%} above it is unexplained spend):", ""]
        lines += [f"- {w}" for w in report.warnings]
    lines += ["", "## Empirical audit", ""]
    if empirical:
        verdict = ("consistent with the claim" if empirical["epsilon_lower_bound"] <= empirical["epsilon_claimed"]
                   else "**the claim is violated**")
        lines.append(
            f"One-run canary audit over {empirical.get('calls', 1)} consecutive call(s): {empirical['m']} canaries, "
            f"{empirical['r']} guesses, {empirical['v']} correct → ε ≥ {empirical['epsilon_lower_bound']:.3f} "
            f"at {empirical.get('confidence', 0.95):.0%} confidence, against a claimed ε of "
            f"{empirical['epsilon_claimed']:.3f}: {verdict}.")
        if "epsilon_lower_bound_fdp" in empirical:
            lines.append(
                f"Bounds: {empirical['epsilon_lower_bound_steinke']:.3f} (Steinke, Nasr & Jagielski 2023), "
                f"{empirical['epsilon_lower_bound_fdp']:.3f} (f-DP, Mahloujifar, Melis & Chaudhuri 2024); "
                f"the most these guesses could ever show: {empirical['power_steinke']:.3f} / "
                f"{empirical['power_fdp']:.3f}.")
        lines.append("A lower bound is evidence, not proof: it can catch a broken implementation, not certify a "
                     "correct one.")
    else:
        lines.append("Not run for this report (`fedshop audit --empirical ...`).")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
