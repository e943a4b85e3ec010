"""``RUN_DIR/report.html``: one self-contained page on a run, for a person to look at.

It re-presents what the run already wrote where the operator reads it — the run log
(``server.run_log``), the privacy ledger (``server.ledger``), the end-of-run summary
(``server.report``) and the run config — plus the privacy audit's verdict
(``server.audit.audit_run``), and adds no field of its own: anything on the page can be found
in those files. Figures are PNGs embedded as ``data:`` URIs and the style sheet is inline, so
the one file can be mailed or archived; the page runs no script.

Everything that came from a merchant (its id, a refusal's reason) or from the run folder is
HTML-escaped, and escaped again for matplotlib's own mark-up in figure labels: merchant ids
are user data.

Written at the end of every run (``write_report_or_warn``, from ``server.app``) and on demand
(``python -m server.report_html RUN_DIR``). A page is a view: failing to write one logs a
warning and never fails the run it describes. Its cost is the audit's (which re-derives ε once
per ledger row): about a minute for 4 rounds of 6 merchants on 2 busy cores; drawing is ~2 s.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.ledger import PrivacyLedger, SpendRecord
from server.report import run_summary
from server.round_report import NO_SCALE
from server.run_log import RunLog
from shared import atomic
from shared.metrics import (
    BASELINE_SUFFIX,
    BASELINES,
    HIGHER_IS_BETTER,
    NOISE_SCALE_SUFFIX,
    baseline_key,
    is_noise_scale,
    is_released_sum,
)
from shared.privacy.events import RELEASE_EVALUATION, RELEASE_UPDATE
from shared.run_files import CONFIG_FILE, LEDGER_FILE, REPORT_FILE, SUMMARY_FILE
from shared.wire import EVAL_LOSS, NUM_EXAMPLES

if TYPE_CHECKING:
    from server.audit import AuditReport

__all__ = ["REPORT_FILE", "main", "render_report", "write_report", "write_report_or_warn"]

log = logging.getLogger(__name__)

# A run of thousands of merchants would make tables no one reads and a page browsers choke on;
# past this many rows a table says how many it left out and where they are.
MAX_TABLE_ROWS = 300
MAX_LIST_ITEMS = 40
# Past this many merchants a legend hides the plot it explains.
MAX_LEGEND = 12
# The per-merchant figure has a row per merchant: past this many, none is readable.
MAX_FIGURE_MERCHANTS = 48
BASELINES_KEY = "baselines"  # summary.json's optional baselines (see _baselines)
PER_MERCHANT_KEY = "eval_per_merchant"  # a metrics.jsonl row's optional per-merchant metrics


# ----------------------------------------------------------------------------- the run's facts


@dataclasses.dataclass
class _Run:
    """What the page shows, read from the run folder (nothing computed that the files lack,
    except the audit, which re-derives ε from the ledger)."""

    run_dir: Path
    summary: dict[str, Any]
    summary_written: bool
    rounds: list[dict[str, Any]]  # metrics.jsonl rows
    spend: list[SpendRecord]  # ledger rows, in recording order within a round
    meta: dict[str, str]
    config: dict[str, Any]
    audit: AuditReport | None
    audit_error: str | None


def _read(run_dir: Path) -> _Run:
    ledger_path = run_dir / LEDGER_FILE
    if not ledger_path.is_file():
        # PrivacyLedger would create an empty one: a report must not invent a run.
        raise FileNotFoundError(f"{run_dir}: no run there (no {LEDGER_FILE})")
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    else:
        summary = run_summary(run_dir, stopped_because="not recorded (no summary.json: the run has not finished, "
                                                       "or it stopped on an error)")
    with PrivacyLedger(ledger_path) as ledger:
        spend, meta = ledger.rows(), ledger.meta()
    config_path = run_dir / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    # Imported here: the audit pulls in the accountants, and a page that cannot load them must
    # still fail only itself (write_report_or_warn), never the server that imports this module.
    from server.audit import AuditInputError, audit_run

    audit, audit_error = None, None
    try:
        audit = audit_run(run_dir)
    except AuditInputError as exc:
        audit_error = str(exc)
    return _Run(run_dir=run_dir, summary=summary, summary_written=summary_path.is_file(),
                rounds=RunLog(run_dir).rows(), spend=spend, meta=meta, config=config, audit=audit,
                audit_error=audit_error)


def _utility_series(rounds: Sequence[Mapping[str, Any]], *, baselines: bool = False
                    ) -> dict[str, list[tuple[int, float]]]:
    """metric -> (round, value) for every round that released it; the loss is left out, as the
    summary leaves it out (it duplicates a head's own loss metric), and so are undefined values.
    The released baselines (``<metric>_baseline``, ``shared.metrics.BASELINES``) are drawn on
    their metric's plot, not plots of their own: ``baselines=True`` gives them instead, keyed by
    their metric. Noise scales (``<key>_sd``) are never series (``_noise_scales``), nor are
    released sums (``sum:``, ``sum-noise-sd``: the evaluation's raw release)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rounds:
        for key, value in (row.get("eval_metrics") or {}).items():
            if (key == EVAL_LOSS or is_noise_scale(key) or is_released_sum(key)
                    or not (isinstance(value, int | float) and math.isfinite(value))):
                continue
            if key.endswith(BASELINE_SUFFIX) == baselines:
                series[key.removesuffix(BASELINE_SUFFIX)].append((int(row["round"]), float(value)))
    return dict(sorted(series.items()))


def _noise_scales(rounds: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    """figure (a metric or a released baseline) -> round -> its released noise scale
    (``<figure>_sd``, ``client.release.noise_scales``): drawn as a band around the figure and
    shown as ± in the table, never a plot of its own."""
    found: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rounds:
        for key, value in (row.get("eval_metrics") or {}).items():
            if is_noise_scale(key) and isinstance(value, int | float) and math.isfinite(value) and value >= 0:
                found[key.removesuffix(NOISE_SCALE_SUFFIX)][int(row["round"])] = float(value)
    return dict(found)


def _baselines(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """baseline name -> metric -> value, from the summary's optional ``baselines``.

    The hook for the summary's baselines (issue 23 item 2): ``{"metric": value}`` (one unnamed
    baseline) or ``{"name": {"metric": value}}`` (e.g. the constant predictor, the merchants
    alone). Absent today; the page says so and draws whatever is there."""
    raw = summary.get(BASELINES_KEY) or {}
    named: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in raw.items():
        if isinstance(value, Mapping):
            for metric, v in value.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    named[str(key)][str(metric)] = float(v)
        elif isinstance(value, int | float) and math.isfinite(value):
            named["baseline"][str(key)] = float(value)
    return dict(named)


def _per_merchant_utility(rounds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric -> merchant -> (round, value), where the run log carries per-merchant metrics (the
    held-out count is public and no utility: left out)."""
    found: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rounds:
        for merchant, metrics in (row.get(PER_MERCHANT_KEY) or {}).items():
            for key, value in (metrics or {}).items():
                if (key not in (EVAL_LOSS, NUM_EXAMPLES) and not key.endswith(BASELINE_SUFFIX)
                        and not is_noise_scale(key) and not is_released_sum(key)
                        and isinstance(value, int | float) and math.isfinite(value)):
                    found[key][str(merchant)].append((int(row["round"]), float(value)))
    return {k: dict(v) for k, v in sorted(found.items())}


@dataclasses.dataclass(frozen=True)
class _Last:
    """One merchant's last released figure for a metric, with what was released beside it."""

    round: int
    value: float
    sd: float | None  # the figure's noise scale, where released
    baseline: float | None  # the constant's (or random order's) figure from the same sums
    baseline_sd: float | None


def _per_merchant_last(rounds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, _Last]]:
    """metric -> merchant -> its last released figure (``_per_merchant_utility``'s last point),
    with the noise scale and released baseline of that same round."""
    rows: dict[tuple[str, int], Mapping[str, Any]] = {}
    for row in rounds:
        for merchant, metrics in (row.get(PER_MERCHANT_KEY) or {}).items():
            rows[(str(merchant), int(row["round"]))] = metrics or {}

    def number(metrics: Mapping[str, Any], key: str) -> float | None:
        value = metrics.get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    out: dict[str, dict[str, _Last]] = {}
    for metric, by_merchant in _per_merchant_utility(rounds).items():
        out[metric] = {}
        for merchant, points in by_merchant.items():
            rnd, value = points[-1]
            metrics = rows[(merchant, rnd)]
            out[metric][merchant] = _Last(rnd, value, number(metrics, metric + NOISE_SCALE_SUFFIX),
                                          number(metrics, baseline_key(metric)),
                                          number(metrics, baseline_key(metric) + NOISE_SCALE_SUFFIX))
    return out


def _epsilon_series(spend: Sequence[SpendRecord]) -> dict[str, list[tuple[int, float]]]:
    """merchant -> (round, cumulative ε after that round): each private merchant's last row of
    each round it appears in (a round's evaluation row follows its update row and carries the ε
    after both; a refusal's row repeats the ε it stopped at)."""
    last: dict[str, dict[int, float]] = defaultdict(dict)
    for row in spend:
        if row.dp:
            last[row.merchant_id][row.round] = row.epsilon_reported
    return {m: sorted(by_round.items()) for m, by_round in sorted(last.items())}


@dataclasses.dataclass
class _Merchant:
    merchant_id: str
    accepted: int = 0
    rejected: int = 0
    refused: int = 0
    failed: int = 0
    evaluations: int = 0
    epsilon: float = 0.0
    budget: float = math.inf
    delta: float = 0.0
    dp: bool = True
    in_ledger: bool = False  # a merchant whose every call failed has no row (nothing spent)


def _merchants(run: _Run) -> list[_Merchant]:
    by_id: dict[str, _Merchant] = {}
    for row in run.spend:
        m = by_id.setdefault(row.merchant_id, _Merchant(row.merchant_id))
        if row.event.release == RELEASE_EVALUATION:
            m.evaluations += 1
        elif row.event.release == RELEASE_UPDATE:
            setattr(m, row.status, getattr(m, row.status) + 1)
        m.epsilon, m.budget, m.delta, m.dp = row.epsilon_reported, row.epsilon_budget, row.event.delta, row.dp
        m.in_ledger = True
    for entry in run.rounds:  # a failed call leaves no ledger row: the run log is where it is
        for merchant in entry.get("failed") or {}:
            by_id.setdefault(merchant, _Merchant(merchant)).failed += 1
    return [by_id[m] for m in sorted(by_id)]


def _outcomes(run: _Run) -> list[tuple[int, str, str, str]]:
    """(round, merchant, outcome, reason) for every refusal, rejection and failure."""
    found = [(r.round, r.merchant_id, r.status, r.reason) for r in run.spend if r.status in ("refused", "rejected")]
    for entry in run.rounds:
        for merchant, reason in (entry.get("failed") or {}).items():
            found.append((int(entry["round"]), str(merchant), "failed", str(reason)))
    return sorted(found, key=lambda o: (o[0], o[1], o[2]))


# ----------------------------------------------------------------------------- figures


def _mpl(text: str, limit: int = 40) -> str:
    """A label matplotlib draws as written: ``$`` would start its math mark-up, and a label
    starting with ``_`` is left out of legends."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _figure(width: float, height: float) -> Any:
    # A bare Figure, not pyplot: no global backend to switch (this runs inside the server
    # process) and nothing to close; savefig renders with Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> tuple[str, int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    width, height = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), width, height


def _colours() -> list[str]:
    import matplotlib

    return list(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])


def _integer_rounds(ax: Any, last_round: int) -> None:
    """Rounds 1 .. ``last_round`` on every plot alike, whole numbers only: a metric released in
    one round is a point at that round, not at the middle of an axis of fractional rounds."""
    from matplotlib.ticker import MaxNLocator

    last_round = max(last_round, 1)
    ax.set_xlim(0.5, last_round + 0.5)
    if last_round <= 12:
        ax.set_xticks(range(1, last_round + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def _last_round(run: _Run) -> int:
    """The plots' last round: the planned rounds, or the last one anything was recorded for."""
    planned = run.config.get("num-server-rounds")
    recorded = [int(r["round"]) for r in run.rounds] + [r.round for r in run.spend]
    return max([planned if isinstance(planned, int) else 0, *recorded, 1])


def _band(ax: Any, points: Sequence[tuple[int, float]], scales: Mapping[int, float], colour: str) -> None:
    """± one noise scale around ``points``, on the rounds that released one."""
    band = [(r, v, scales[r]) for r, v in points if r in scales]
    if len(band) > 1:
        ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                        color=colour, alpha=0.18, lw=0)
    elif band:  # a band needs two rounds: one round's ± is an error bar
        ax.errorbar([band[0][0]], [band[0][1]], yerr=[band[0][2]], color=colour, alpha=0.5, capsize=3, lw=1)


def _utility_figure(series: Mapping[str, list[tuple[int, float]]],
                    baselines: Mapping[str, Mapping[str, float]],
                    released: Mapping[str, list[tuple[int, float]]],
                    scales: Mapping[str, Mapping[int, float]] | None = None, *, last_round: int = 1) -> Any:
    columns = min(3, len(series))
    rows = math.ceil(len(series) / columns)
    fig = _figure(3.4 * columns, 2.7 * rows)
    styles = ["--", ":", "-."]
    scales = scales or {}
    colours = _colours()
    for i, (metric, points) in enumerate(series.items()):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", ms=3, color=colours[0],
                label="federated (noised)")
        _band(ax, points, scales.get(metric, {}), colours[0])
        if metric in released:  # the baseline released beside it, from the same noised sums
            # Hollow markers: a baseline released in one round only is still seen.
            ax.plot([p[0] for p in released[metric]], [p[1] for p in released[metric]], "--s", lw=1.2, ms=3,
                    mfc="white", color=colours[1], label=_mpl(BASELINES.get(metric, "baseline")))
            _band(ax, released[metric], scales.get(baseline_key(metric), {}), colours[1])
            ax.legend(fontsize=7)
        for j, (name, values) in enumerate(baselines.items()):
            if metric in values:
                ax.axhline(values[metric], color="grey", ls=styles[j % len(styles)], lw=1, label=_mpl(name))
        ax.set_title(_title(metric), fontsize=9)
        _integer_rounds(ax, last_round)
        if i == 0 and baselines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _title(metric: str) -> str:
    better = HIGHER_IS_BETTER.get(metric)
    return _mpl(metric) + ("" if better is None else " (↑ better)" if better else " (↓ better)")


def _per_merchant_figure(last: Mapping[str, Mapping[str, _Last]]) -> Any:
    """Per metric, each merchant's last released figure ± its noise scale, one row a merchant,
    with the constant's figure from the same sums beside it: a merchant's own release is noised
    alone (the pooled figures share the noise over every merchant's sums), so its ± is wide,
    and a line through two or eight such points would draw the noise as a trend."""
    columns = min(3, len(last))
    rows = math.ceil(len(last) / columns)
    merchants = sorted({m for by_merchant in last.values() for m in by_merchant})
    fig = _figure(3.4 * columns, (0.9 + 0.22 * len(merchants)) * rows)
    colours = _colours()
    for i, (metric, by_merchant) in enumerate(last.items()):
        ax = fig.add_subplot(rows, columns, i + 1)
        names = sorted(by_merchant)
        y = range(len(names))
        figures = [by_merchant[m] for m in names]
        ax.errorbar([f.value for f in figures], [v + 0.12 for v in y], xerr=[f.sd or 0.0 for f in figures],
                    fmt="o", ms=3, capsize=2, lw=1, color=colours[0], label="model (noised)")
        for v, f in zip(y, figures, strict=True):
            if f.sd is None:  # noised, but its spread could not be estimated: no bar is not "exact"
                ax.annotate(NO_SCALE, (f.value, v + 0.12), xytext=(4, -3), textcoords="offset points",
                            fontsize=6, color=colours[0])
        with_baseline = [(v, f) for v, f in zip(y, figures, strict=True) if f.baseline is not None]
        if with_baseline:
            ax.errorbar([f.baseline for _, f in with_baseline], [v - 0.12 for v, _ in with_baseline],
                        xerr=[f.baseline_sd or 0.0 for _, f in with_baseline], fmt="s", ms=3, capsize=2,
                        lw=1, color=colours[1], mfc="white", label=_mpl(BASELINES.get(metric, "baseline")))
            ax.legend(fontsize=6)
        ax.set_yticks(list(y), [_mpl(m, 18) for m in names], fontsize=7 if len(names) <= MAX_LEGEND else 5)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.invert_yaxis()
        ax.set_title(_title(metric) + f", round {max(f.round for f in figures)}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def _epsilon_figure(series: Mapping[str, list[tuple[int, float]]], budgets: Mapping[str, float],
                    last_round: int = 1) -> Any:
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    colours = _colours()
    for i, (merchant, points) in enumerate(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", ms=3, lw=1.2,
                color=colours[i % len(colours)], label=_mpl(merchant))
    for budget in sorted({b for b in budgets.values() if math.isfinite(b)}):
        ax.axhline(budget, color="crimson", ls="--", lw=1)
        ax.annotate(f"budget ε = {budget:g}", xy=(0.01, budget), xycoords=("axes fraction", "data"),
                    color="crimson", va="bottom", fontsize=8)
    _integer_rounds(ax, last_round)
    ax.set_ylabel("cumulative ε per merchant")
    ax.set_ylim(bottom=0)
    if len(series) <= MAX_LEGEND:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _eps(value: float) -> str:
    return "no DP" if not math.isfinite(value) else f"{value:.3f}"


def _img(fig: Any, alt: str) -> str:
    src, width, height = _png(fig)
    return f'<img src="{src}" alt="{_e(alt)}" width="{width}" height="{height}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, classes: Sequence[str] = (),
           more: str = "") -> str:
    """Cells are HTML already (the callers escape); past MAX_TABLE_ROWS, ``more`` says where the rest is."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)

    def cell(i: int, text: str) -> str:
        cls = classes[i] if i < len(classes) and classes[i] else ""
        return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"

    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows[:MAX_TABLE_ROWS])
    left = len(rows) - MAX_TABLE_ROWS
    tail = f'<p class="note">… and {left} more row(s){_e(more)}.</p>' if left > 0 else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{tail}"


def _items(texts: Sequence[str], cls: str) -> str:
    """A list of findings or warnings; a broken run can have hundreds, and the page is a summary."""
    shown = "".join(f"<li>{_e(t)}</li>" for t in texts[:MAX_LIST_ITEMS])
    left = len(texts) - MAX_LIST_ITEMS
    more = f"<li>… and {left} more (<code>fedshop audit RUN_DIR</code> lists them all)</li>" if left > 0 else ""
    return f'<ul class="{cls}">{shown}{more}</ul>' if cls else f"<ul>{shown}{more}</ul>"


def _headline(run: _Run, merchants: list[_Merchant]) -> str:
    summary = run.summary
    dp = run.config.get("dp")
    rounds = summary.get("rounds_completed", max((r.round for r in run.spend), default=0))
    facts = [
        ("run folder", _e(run.run_dir)),
        ("run id", _e(run.meta.get("run_id", "not recorded"))),
        ("rounds completed", _e(rounds) + (f" of {_e(run.config['num-server-rounds'])} planned"
                                           if "num-server-rounds" in run.config else "")),
        ("merchants", f"{len(merchants)} in the ledger or run log"
                      + (f", {_e(run.config['merchants-per-round'])} sampled per round"
                         if "merchants-per-round" in run.config else "")),
        ("stopped because", _e(summary.get("stopped_because", "not recorded"))),
        ("privacy", _e(run.meta.get("guarantee", "")) if dp is not False else "none: dp = false (a non-private run)"),
    ]
    if run.config.get("tasks"):
        facts.append(("tasks", _e(run.config["tasks"])))
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _verdict_badge(run: _Run) -> str:
    if run.audit is None:
        return '<span class="badge unknown">audit could not run</span>'
    if run.audit.passed:
        return '<span class="badge passed">privacy audit passed</span>'
    return f'<span class="badge failed">privacy audit FAILED ({len(run.audit.findings)} finding(s))</span>'


def _utility_section(run: _Run) -> str:
    series = _utility_series(run.rounds)
    released = _utility_series(run.rounds, baselines=True)
    scales = _noise_scales(run.rounds)
    baselines = _baselines(run.summary)
    dp = run.config.get("dp") is not False
    noised = (
        "<p class=\"note\">These are computed from what the merchants <em>released</em>: each one's "
        "held-out data as sums noised before they left it (σ<sub>eval</sub> = "
        f"{_e(run.config.get('eval-noise-multiplier', 'as configured'))}, on clipped per-unit values) and "
        "accounted in the privacy ledger as an evaluation release; the server adds up the merchants' noised "
        "sums and computes each metric from the pooled sums (where a merchant sent no sums, a mean of the "
        "merchants' metrics weighted by held-out size). A change of a few hundredths between rounds can be "
        "that noise, not the model: each figure's ± (the shaded band) is the standard deviation the noise "
        "alone gives it, re-drawn from the pooled sums and their noise (post-processing, no privacy cost); "
        "± ? where the noise could leave the figure undefined, so no spread is estimated: read it as rough.</p>"
        if dp else
        "<p class=\"note\">A non-private run: these are the merchants' exact held-out metrics, averaged "
        "weighted by held-out size.</p>"
    )
    parts = ["<h2>Utility per round</h2>", noised]
    if not series:
        parts.append("<p>No round released evaluation metrics (evaluation off, held-out sets too small, "
                     "or no round finished).</p>")
    else:
        alt = "utility per round: " + ", ".join(series)
        figure = _utility_figure(series, baselines, released, scales, last_round=_last_round(run))
        parts.append(f"<figure>{_img(figure, alt)}<figcaption>Each "
                     "metric per round, as released (noised)"
                     + (", shaded: ± one standard deviation of the noise alone" if scales else "")
                     + (", dashed in colour: the baseline released beside it (a constant or random-order predictor "
                        "scored on the same noised sums)" if released else "")
                     + (", dashed grey: baselines from the summary" if baselines else "") + ".</figcaption></figure>")
        names = list(baselines)
        rows = []
        for metric, points in series.items():
            better = HIGHER_IS_BETTER.get(metric)
            values = [v for _, v in points]
            best = (max(values) if better else min(values)) if better is not None else None
            rows.append([_e(metric), "↑" if better else "↓" if better is not None else "",
                         f"{_pm(points[-1], scales.get(metric, {}), bool(scales))} (round {points[-1][0]})",
                         "" if best is None else f"{best:.4f}",
                         *([_released_baseline(metric, released, scales)] if released else []),
                         *(f"{baselines[n][metric]:.4f}" if metric in baselines[n] else "–" for n in names)])
        parts.append(_table(["metric", "better", "last released", "best round",
                             *(["released baseline (last)"] if released else []),
                             *(f"baseline: {n}" for n in names)], rows,
                            classes=["", "", "num", "num", *(["num"] if released else []), *(["num"] * len(names))]))
    if series and not baselines and not released:
        parts.append("<p class=\"note\">This run's summary carries no baselines (no <code>baselines</code> in "
                     "summary.json), so none are drawn. When it does — <code>{\"metric\": value}</code> or "
                     "<code>{\"name\": {\"metric\": value}}</code>, e.g. the constant predictor or the merchants "
                     "alone — they appear here as dashed lines and table columns.</p>")
    return "\n".join(parts)


def _pm(point: tuple[int, float], scales: Mapping[int, float], noised: bool = False) -> str:
    """A round's figure, with ``± sd`` where that round released its noise scale (``± ?`` where a
    noised figure came without one: ``server.round_report.NO_SCALE``)."""
    rnd, value = point
    return f"{value:.4f}" + (f" ± {scales[rnd]:.4f}" if rnd in scales else f" {NO_SCALE}" if noised else "")


def _released_baseline(metric: str, released: Mapping[str, list[tuple[int, float]]],
                       scales: Mapping[str, Mapping[int, float]] | None = None) -> str:
    """The last released ``<metric>_baseline`` (± its noise scale) and what it is, or a dash."""
    if metric not in released:
        return "–"
    rnd = released[metric][-1][0]
    shown = _pm(released[metric][-1], (scales or {}).get(baseline_key(metric), {}), bool(scales))
    return f"{shown} ({_e(BASELINES.get(metric, baseline_key(metric)))}, round {rnd})"


def _per_merchant_section(run: _Run, merchants: list[_Merchant]) -> str:
    last = _per_merchant_last(run.rounds)
    parts = ["<h2>Per merchant</h2>"]
    shown = {m for by_merchant in last.values() for m in by_merchant}
    if len(shown) > MAX_FIGURE_MERCHANTS:
        parts.append(f"<p class=\"note\">{len(shown)} merchants released metrics: too many rows for a figure "
                     f"(at most {MAX_FIGURE_MERCHANTS}); each one's are in metrics.jsonl "
                     f"(<code>{PER_MERCHANT_KEY}</code>).</p>")
    elif last:
        alt = "utility per merchant: " + ", ".join(last)
        parts.append(f"<figure>{_img(_per_merchant_figure(last), alt)}<figcaption>Each "
                     "merchant's last released figure (noised: dot, ± one standard deviation of its noise, "
                     f"{NO_SCALE} where none could be estimated) and, "
                     "where one was released, its constant predictor's from the same sums (hollow square). A "
                     "merchant's release is noised on its own, so its ± is far wider than the pooled figures' "
                     "above. The exact scores stay with each merchant: <code>fedshop evaluate RUN_DIR</code> "
                     "on its own machine (no privacy cost, nothing leaves).</figcaption></figure>")
    else:
        parts.append("<p class=\"note\">The run log records each round's evaluation as the merchants' weighted "
                     "mean only, so utility per merchant is not shown; what each merchant did is.</p>")
    rows = []
    for m in merchants:
        private = m.in_ledger and m.dp
        used = (m.epsilon / m.budget if private and math.isfinite(m.epsilon) and 0 < m.budget < math.inf
                else None)
        bar = ("" if used is None else
               f'<div class="bar"><div style="width:{min(used, 1.0) * 100:.1f}%"></div></div> {used:.0%}')
        spent = "–" if not m.in_ledger else _eps(m.epsilon) if m.dp else "no DP"
        rows.append([_e(m.merchant_id), str(m.accepted), str(m.rejected), str(m.refused), str(m.failed),
                     str(m.evaluations), spent, _eps(m.budget) if private else "–", bar,
                     f"{m.delta:g}" if private else ""])
    parts.append(_table(["merchant", "trained (accepted)", "rejected", "refused", "failed", "evaluations",
                         "ε spent", "ε budget", "budget used", "δ"], rows,
                        classes=["", "num", "num", "num", "num", "num", "num", "num", "", "num"],
                        more=" (every merchant is in the ledger)"))
    return "\n".join(parts)


def _epsilon_section(run: _Run) -> str:
    series = _epsilon_series(run.spend)
    parts = ["<h2>Privacy spent per merchant, per round</h2>"]
    if not series:
        parts.append("<p>No private spend recorded (a non-private run, or no round finished).</p>")
        return "\n".join(parts)
    budgets = {r.merchant_id: r.epsilon_budget for r in run.spend if r.dp}
    figure = _epsilon_figure(series, budgets, _last_round(run))
    parts.append(f"<figure>{_img(figure, 'cumulative epsilon per merchant per round')}"
                 "<figcaption>Each merchant's cumulative ε after each round it took part in (its updates and "
                 "noised evaluations together), as its own accountant reported it to the ledger; dashed: "
                 "budgets.</figcaption></figure>")
    return "\n".join(parts)


def _outcomes_section(run: _Run) -> str:
    outcomes = _outcomes(run)
    parts = ["<h2>Refusals, rejections and failures</h2>"]
    if not outcomes:
        parts.append("<p>None: every sampled merchant trained and every update was accepted.</p>")
    else:
        parts.append("<p class=\"note\">Refused: the merchant declined to train (its budget could not afford "
                     "the call; nothing spent). Rejected: it trained and spent, but the server discarded the "
                     "update. Failed: no usable reply (no ledger row; from the run log).</p>")
        parts.append(_table(["round", "merchant", "outcome", "reason"],
                            [[str(r), _e(m), f'<span class="{o}">{o}</span>', _e(reason)]
                             for r, m, o, reason in outcomes],
                            classes=["num", "", "", "reason"], more=" (in the ledger and metrics.jsonl)"))
    return "\n".join(parts)


def _audit_section(run: _Run) -> str:
    parts = ["<h2>Privacy audit</h2>"]
    if run.audit is None:
        parts.append(f'<p class="failed">The audit could not run: {_e(run.audit_error)}</p>')
        return "\n".join(parts)
    audit = run.audit
    if audit.passed:
        parts.append(f'<p class="passed"><strong>PASSED.</strong> {audit.rounds} round(s), {len(audit.merchants)} '
                     "merchant(s): no recorded ε below the one re-derived independently from the recorded "
                     "mechanisms (PLD), no merchant over budget, every release's facts possible and the run's, "
                     "the ledger consistent with the run log.</p>")
    else:
        parts.append(f'<p class="failed"><strong>FAILED</strong> — {len(audit.findings)} finding(s):</p>')
        parts.append(_items(audit.findings, "findings"))
    if audit.warnings:
        parts.append(f"<p>{len(audit.warnings)} warning(s) (not failures):</p>")
        parts.append(_items(audit.warnings, ""))
    rows = [[_e(m.merchant_id), str(m.rounds_joined), str(m.evaluations), str(m.total_steps),
             _eps(m.epsilon_recorded), _eps(m.epsilon_pld), _eps(m.budget), str(len(m.findings))]
            for m in audit.merchants]
    parts.append(_table(["merchant", "updates", "evaluations", "steps", "ε recorded", "ε re-derived (PLD)",
                         "budget", "findings"], rows,
                        classes=["", "num", "num", "num", "num", "num", "num", "reason"],
                        more=" (fedshop audit RUN_DIR lists every merchant)"))
    parts.append("<p class=\"note\">The full audit, with the empirical canary audit: "
                 f"<code>fedshop audit {_e(run.run_dir)}</code>.</p>")
    return "\n".join(parts)


_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 0 auto;
       max-width: 1060px; padding: 1.2em 1.5em 3em; }
h1 { font-size: 1.6em; margin: 0.2em 0; } h2 { font-size: 1.2em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { border-bottom: 1px solid #eee; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
table.facts th { font-weight: 600; color: #555; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.reason { max-width: 520px; overflow-wrap: anywhere; }
figure { margin: 0.6em 0; } figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 12.5px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600; font-size: 13px; }
.badge.passed { background: #e3f4e6; color: #17692a; } .badge.failed { background: #fbe3e3; color: #a11; }
.badge.unknown { background: #eee; color: #555; }
p.passed { color: #17692a; } p.failed, span.rejected, span.failed { color: #a11; } span.refused { color: #8a5a00; }
.bar { display: inline-block; width: 80px; height: 8px; background: #eee; vertical-align: middle; }
.bar div { height: 100%; background: #4a7fd0; }
"""


def render_report(run_dir: Path) -> str:
    """The page, as HTML text (``write_report`` writes it)."""
    run = _read(Path(run_dir))
    merchants = _merchants(run)
    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"fedshop run report — {run.run_dir.name or run.run_dir}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p>{_verdict_badge(run)} <span class=\"note\">generated {generated} from the run folder's "
        "ledger.sqlite, metrics.jsonl, summary.json and config.json"
        + ("" if run.summary_written else " (no summary.json yet)") + "</span></p>",
        _headline(run, merchants),
        _utility_section(run),
        _per_merchant_section(run, merchants),
        _epsilon_section(run),
        _outcomes_section(run),
        _audit_section(run),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(run_dir: Path) -> Path:
    """Write ``RUN_DIR/report.html`` (atomically: a reader sees the old page or the new one)."""
    path = Path(run_dir) / REPORT_FILE
    atomic.write_text(path, render_report(Path(run_dir)))
    return path


def write_report_or_warn(run_dir: Path) -> Path | None:
    """``write_report`` at the end of a run: the run and its summary stand whatever the page does."""
    try:
        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - a view must not fail the run it describes
        log.warning("could not write the run report %s: %s: %s", Path(run_dir) / REPORT_FILE,
                    type(exc).__name__, exc)
        return None
    log.info("run report: %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.report_html RUN_DIR``: (re)write a run's report, print its path."""
    import argparse

    parser = argparse.ArgumentParser(prog="fedshop report", description="Write RUN_DIR/report.html.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"fedshop report: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
