"""server.report_html: RUN_DIR/report.html — its sections, its escaping, the audit's verdict, and
that a real browser (Debian's headless Chromium, installed by .ci/setup) renders it with its figures."""

from __future__ import annotations

import html
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server import report_html
from server.audit import audit_run
from server.ledger import PrivacyLedger, SpendRecord
from server.report import run_summary, write_summary
from server.report_html import REPORT_FILE, main, render_report, write_report, write_report_or_warn
from shared.privacy.events import MechanismEvent, SpendEvent
from shared.run_files import LEDGER_FILE, METRICS_FILE, SUMMARY_FILE
from tests.helpers.audit_runs import MERCHANTS, metrics_line, tamper

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ("Utility per round", "Per merchant", "Privacy spent per merchant, per round",
            "Refusals, rejections and failures", "Privacy audit")
# Merchant ids and reasons are user data: mark-up for the page, and for matplotlib ($: its maths;
# a leading _: left out of legends).
HOSTILE = '_<img src=x onerror="alert(1)">&$x$'
HOSTILE_REASON = "<script>alert('reason')</script> over budget"


def with_eval_metrics(run_dir: Path) -> Path:
    """Rewrite the run log of a ``build_run`` run with each round's released (noised) metrics."""
    rows = []
    for rnd in (1, 2, 3):
        row = metrics_line(rnd, MERCHANTS)
        row["eval_metrics"] = {"ctr_auc": 0.6 + 0.05 * rnd, "ctr_logloss": 0.7 - 0.05 * rnd,
                               "eval-loss": 0.7 - 0.05 * rnd, "rating_rmse": None}
        rows.append(json.dumps(row, sort_keys=True))
    (run_dir / METRICS_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return run_dir


def images(page: str) -> list[str]:
    return re.findall(r"<img [^>]*>", page)


def section(page: str, title: str) -> str:
    """The page from heading ``title`` to the next heading."""
    start = page.index(f"<h2>{html.escape(title)}</h2>")
    end = page.find("<h2>", start + 4)
    return page[start:end if end >= 0 else None]


def test_a_clean_run_has_every_section_and_passes(run_dir: Path) -> None:
    with_eval_metrics(run_dir)
    path = write_report(run_dir)
    assert path == run_dir / REPORT_FILE
    page = path.read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"<h2>{html.escape(title)}</h2>" in page
    assert "privacy audit passed" in page and "<strong>PASSED.</strong>" in section(page, "Privacy audit")
    assert "FAILED" not in page
    # Self-contained: figures are embedded PNGs, nothing is fetched, nothing runs.
    figures = images(page)
    assert len(figures) == 2  # utility per round; ε per merchant (no per-merchant metrics in the run log)
    assert all('src="data:image/png;base64,' in img for img in figures)
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "<script" not in page
    utility = section(page, "Utility per round")
    assert "noised" in utility and "accounted in the privacy ledger" in utility
    # The released metrics, last and best, the loss and an undefined metric left out.
    assert "0.7500 (round 3)" in utility and "0.5500 (round 3)" in utility
    assert "eval-loss" not in utility and "rating_rmse" not in utility
    assert "carries no baselines" in utility  # the hook, said out loud
    merchants = section(page, "Per merchant")
    for m in MERCHANTS:
        assert f"<td>{m}</td>" in merchants
    assert "not shown" in merchants  # no per-merchant utility in this run log
    assert "None: every sampled merchant trained" in section(page, "Refusals, rejections and failures")
    assert "no summary.json yet" in page and "not recorded" in page


def test_a_run_that_released_no_metrics_says_so_and_nothing_about_baselines(run_dir: Path) -> None:
    """Every held-out set under eval-min-units (the esci scenario): the page says no round
    released metrics, draws one figure (ε), and has no baselines to speak of."""
    page = write_report(run_dir).read_text(encoding="utf-8")
    utility = section(page, "Utility per round")
    assert "No round released evaluation metrics" in utility and "carries no baselines" not in utility
    assert len(images(page)) == 1


def test_baselines_and_per_merchant_metrics_are_drawn_when_the_run_carries_them(
        run_dir: Path) -> None:
    with_eval_metrics(run_dir)
    summary = run_summary(run_dir, stopped_because="all rounds done")
    summary["baselines"] = {"constant predictor": {"ctr_logloss": 0.69}, "merchants alone": {"ctr_auc": 0.62}}
    write_summary(run_dir, summary)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    for row in rows:
        row["eval_per_merchant"] = {m: {"ctr_auc": 0.6 + 0.01 * i} for i, m in enumerate(MERCHANTS)}
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    page = write_report(run_dir).read_text(encoding="utf-8")
    utility = section(page, "Utility per round")
    assert "<th>baseline: constant predictor</th>" in utility and "<th>baseline: merchants alone</th>" in utility
    assert "0.6900" in utility and "0.6200" in utility
    assert "carries no baselines" not in utility
    assert len(images(page)) == 3  # per-merchant utility too
    assert "utility per merchant" in section(page, "Per merchant")
    assert "all rounds done" in page and "no summary.json yet" not in page


def test_released_baselines_are_drawn_on_their_metrics_plot(run_dir: Path) -> None:
    """A ``<metric>_baseline`` in the run log is its metric's dashed line and table column, not a
    plot of its own; the page then needs no note about summary.json's baselines."""
    with_eval_metrics(run_dir)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    for row in rows:
        row["eval_metrics"]["ctr_logloss_baseline"] = 0.5 + 0.01 * row["round"]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    utility = section(write_report(run_dir).read_text(encoding="utf-8"), "Utility per round")
    assert 'alt="utility per round: ctr_auc, ctr_logloss"' in utility  # two plots, the baseline on one
    assert "<th>released baseline (last)</th>" in utility
    assert "0.5300 (constant base rate, round 3)" in utility
    assert "<td>ctr_logloss_baseline</td>" not in utility
    assert "dashed in colour: the baseline released beside it" in utility
    assert "carries no baselines" not in utility
    released = report_html._utility_series(rows, baselines=True)
    assert released == {"ctr_logloss": [(1, 0.51), (2, 0.52), (3, 0.53)]}


def test_noise_scales_are_a_band_and_a_plus_minus_never_a_plot(run_dir: Path) -> None:
    """``<key>_sd`` in the run log is shown as ± beside its figure (the metric's and the released
    baseline's last values) and drawn as a band around it: never a plot, a series or a table row
    of its own, in the utility or the per-merchant section."""
    with_eval_metrics(run_dir)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    for row in rows:
        row["eval_metrics"] |= {"ctr_auc_sd": 0.1 * row["round"], "ctr_logloss_baseline": 0.5 + 0.01 * row["round"],
                                "ctr_logloss_baseline_sd": 0.02, "eval-loss_sd": 0.1}
        row["eval_per_merchant"] = {m: {"ctr_auc": 0.6, "ctr_auc_sd": 0.1} for m in MERCHANTS}
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert report_html._utility_series(rows).keys() == {"ctr_auc", "ctr_logloss"}
    assert report_html._utility_series(rows, baselines=True).keys() == {"ctr_logloss"}
    assert report_html._per_merchant_utility(rows).keys() == {"ctr_auc"}
    assert report_html._noise_scales(rows)["ctr_auc"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert report_html._noise_scales(rows)["ctr_logloss_baseline"] == {1: 0.02, 2: 0.02, 3: 0.02}
    page = write_report(run_dir).read_text(encoding="utf-8")
    utility = section(page, "Utility per round")
    assert 'alt="utility per round: ctr_auc, ctr_logloss"' in utility
    assert "0.7500 ± 0.3000 (round 3)" in utility  # ctr_auc's last value and its scale
    assert "0.5500 ± ? (round 3)" in utility  # ctr_logloss released no scale: its spread unknown, not 0
    assert "0.5300 ± 0.0200 (constant base rate, round 3)" in utility
    assert "_sd" not in utility and "shaded: ± one standard deviation of the noise alone" in utility
    assert "_sd" not in section(page, "Per merchant")
    assert 'alt="utility per merchant: ctr_auc"' in section(page, "Per merchant")


def test_per_merchant_figures_are_each_merchants_last_release_with_its_noise_and_constant(run_dir: Path) -> None:
    """Per merchant, the page draws the last released figure ± its own noise scale beside the
    constant's from the same round (a line through noised points would draw the noise as a
    trend); the public held-out count is no utility figure."""
    with_eval_metrics(run_dir)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    for row in rows[:2]:  # a merchant evaluated in rounds 1 and 2 only keeps its round-2 figure
        row["eval_per_merchant"] = {MERCHANTS[0]: {"rating_rmse": 1.0 + row["round"], "rating_rmse_sd": 0.3,
                                                   "rating_rmse_baseline": 1.2, "num-examples": 40.0}}
    rows[2]["eval_per_merchant"] = {MERCHANTS[1]: {"rating_rmse": 0.8, "num-examples": 10.0}}
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert report_html._per_merchant_utility(rows).keys() == {"rating_rmse"}
    last = report_html._per_merchant_last(rows)["rating_rmse"]
    assert last[MERCHANTS[0]] == report_html._Last(2, 3.0, 0.3, 1.2, None)
    assert last[MERCHANTS[1]] == report_html._Last(3, 0.8, None, None, None)
    merchants = section(write_report(run_dir).read_text(encoding="utf-8"), "Per merchant")
    assert 'alt="utility per merchant: rating_rmse"' in merchants and "fedshop evaluate RUN_DIR" in merchants
    # A row per merchant: past MAX_FIGURE_MERCHANTS the page says where they are instead.
    many = {f"m{i:03d}": {"rating_rmse": 1.0} for i in range(report_html.MAX_FIGURE_MERCHANTS + 1)}
    rows[2]["eval_per_merchant"] = many
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    merchants = section(write_report(run_dir).read_text(encoding="utf-8"), "Per merchant")
    assert "utility per merchant" not in merchants and "too many rows for a figure" in merchants


@pytest.mark.parametrize(("planned", "points", "ticks"), [
    (8, [(8, 0.9)], list(range(1, 9))),  # one release, in round 8 of 8: a point at 8, not at mid-axis
    (None, [(1, 0.9), (2, 0.8)], [1, 2]),
    (40, [(40, 0.9)], None),  # past 12 rounds: whole-number ticks, however many
])
def test_every_plot_spans_the_runs_rounds_in_whole_numbers(
        planned: int | None, points: list[tuple[int, float]], ticks: list[int] | None) -> None:
    run = report_html._Run(run_dir=Path("run"), summary={}, summary_written=True,
                           rounds=[{"round": r} for r, _ in points], spend=[], meta={},
                           config={} if planned is None else {"num-server-rounds": planned}, audit=None,
                           audit_error=None)
    last = report_html._last_round(run)
    assert last == (planned or 2)
    fig = report_html._utility_figure({"ctr_auc": points}, {}, {}, {"ctr_auc": {points[-1][0]: 0.05}},
                                      last_round=last)
    (ax,) = fig.axes
    assert ax.get_xlim() == (0.5, last + 0.5)
    shown = list(ax.get_xticks())
    if ticks is not None:
        assert shown == ticks
    assert shown and all(float(t).is_integer() for t in shown)


def test_released_sums_are_never_a_series_or_a_plot(run_dir: Path) -> None:
    """A merchant's raw release (``sum:<task>/<statistic>``, ``sum-noise-sd``) in the run log is
    no figure: never a utility or per-merchant series, a noise band, or a word on the page."""
    with_eval_metrics(run_dir)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    sums = {"sum:ctr/count": 40.0, "sum:ctr/pos3": -1.5, "sum:rating/target_sq": 2.0, "sum-noise-sd": 10.0}
    for row in rows:
        row["eval_metrics"] |= sums
        row["eval_per_merchant"] = {m: {"ctr_auc": 0.6, **sums} for m in MERCHANTS}
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert report_html._utility_series(rows).keys() == {"ctr_auc", "ctr_logloss"}
    assert report_html._utility_series(rows, baselines=True) == {}
    assert report_html._per_merchant_utility(rows).keys() == {"ctr_auc"}
    assert not report_html._noise_scales(rows)
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "sum:" not in page and "sum-noise-sd" not in page


def test_a_failing_ledger_fails_the_audit_on_the_page(run_dir: Path) -> None:
    with tamper(run_dir) as conn:  # m2 claims less than its recorded mechanisms spent
        conn.execute("UPDATE spend SET epsilon_reported = 0.5 WHERE merchant_id = 'm2' AND round = 3")
    findings = audit_run(run_dir).findings
    assert findings

    page = write_report(run_dir).read_text(encoding="utf-8")
    audit = section(page, "Privacy audit")
    assert f"privacy audit FAILED ({len(findings)} finding(s))" in page
    assert "<strong>FAILED</strong>" in audit and "PASSED" not in audit
    for finding in findings:
        assert f"<li>{html.escape(finding)}</li>" in audit
    assert any("m2: round 3" in f and "under-reports" in f for f in findings)


def hostile_run(run_dir: Path) -> Path:
    """A run whose merchant ids and reasons carry mark-up: one trains, is rejected, is refused; one fails."""
    def row(round_: int, epsilon: float, **fields: Any) -> SpendRecord:
        steps = 0 if fields.get("status") == "refused" else 3
        event = SpendEvent(mechanism=MechanismEvent(noise_multiplier=1.0, sample_rate=0.1, steps=steps,
                                                    max_grad_norm=1.0),
                           delta=1e-5, unit_count=30, expected_batch=3.0, release="update")
        return SpendRecord(run_id="run-x", round=round_, merchant_id=HOSTILE, node_id=7, model_version=round_ - 1,
                           event=event, epsilon_reported=epsilon, epsilon_budget=4.0, accountant="prv",
                           **{"status": "accepted", **fields})

    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        ledger.record_round([row(1, 1.5)])
        ledger.record_round([row(2, 2.5, status="rejected", reason="update norm <b>1e9</b> > max-update-norm")])
        ledger.record_round([row(3, 2.5, status="refused", reason=HOSTILE_REASON)])
    lines = [{"round": r, "accepted": [HOSTILE] if r == 1 else [], "rejected": {}, "refused": {},
              "failed": {"<i>node-9</i>": "<b>boom</b>"} if r == 2 else {},
              "eval_metrics": {"ctr_auc": 0.6 + 0.01 * r}} for r in (1, 2, 3)]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


def test_merchant_ids_and_reasons_are_escaped(tmp_path: Path) -> None:
    page = render_report(hostile_run(tmp_path))
    for raw in (HOSTILE, HOSTILE_REASON, "<b>1e9</b>", "<i>node-9</i>", "<b>boom</b>"):
        assert raw not in page
        assert html.escape(raw) in page
    assert "<script" not in page and "<b>" not in page and "<i>" not in page
    assert len(images(page)) == 2 and all(img.startswith('<img src="data:image/png') for img in images(page))
    outcomes = section(page, "Refusals, rejections and failures")
    assert outcomes.count('<span class="refused">refused</span>') == 1
    assert outcomes.count('<span class="rejected">rejected</span>') == 1
    assert outcomes.count('<span class="failed">failed</span>') == 1


def test_no_run_no_page_and_the_run_stands(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="no run there"):
        write_report(tmp_path)
    assert os.listdir(tmp_path) == []  # no empty ledger invented
    with caplog.at_level(logging.WARNING, logger="server.report_html"):
        assert write_report_or_warn(tmp_path) is None
    assert "could not write the run report" in caplog.text and "no run there" in caplog.text
    assert main([str(tmp_path)]) == 1


def test_a_failing_page_leaves_the_summary_and_the_old_page(run_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    write_summary(run_dir, run_summary(run_dir, stopped_because="all rounds done"))
    old = write_report(run_dir).read_text(encoding="utf-8")
    summary = (run_dir / SUMMARY_FILE).read_text()

    def broken(_: Path) -> str:
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(report_html, "render_report", broken)
    with caplog.at_level(logging.WARNING, logger="server.report_html"):
        assert write_report_or_warn(run_dir) is None
    assert "matplotlib exploded" in caplog.text
    assert (run_dir / REPORT_FILE).read_text(encoding="utf-8") == old
    assert (run_dir / SUMMARY_FILE).read_text() == summary
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]


def test_the_command_rewrites_the_page(run_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / REPORT_FILE)
    assert (run_dir / REPORT_FILE).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # The same through the front door, `fedshop report RUN_DIR`, over a page removed first.
    from simulations.cli import main as fedshop

    (run_dir / REPORT_FILE).unlink()
    assert fedshop(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / REPORT_FILE)
    assert (run_dir / REPORT_FILE).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# ----------------------------------------------------------------------------- a real browser

# Appended to a copy of the page (the report itself runs no script): once the page has loaded,
# record what the browser made of each figure where --dump-dom will show it.
PROBE = """<script>
window.addEventListener("load", () => {
  const figures = [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth,
                                                   h: i.naturalHeight, shown: i.getBoundingClientRect().width}));
  document.body.setAttribute("data-probe", JSON.stringify({figures, sections: document.querySelectorAll("h2").length}));
});
</script>"""


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: .ci/setup installs Debian's chromium package (apt-get install chromium)")
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, f"chromium exited {result.returncode}: {result.stderr[-2000:]}"
    return result


def test_chromium_renders_the_page_with_its_figures(tmp_path: Path, run_dir: Path) -> None:
    with_eval_metrics(run_dir)
    page = write_report(run_dir)
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "\n</body>"), encoding="utf-8")

    # --virtual-time-budget: the DOM is dumped after the page (and its load handlers) settled.
    dom = chromium(tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, f"the probe did not run; dumped DOM starts: {dom[:500]}"
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["sections"] == len(SECTIONS)
    declared = [(int(w), int(h)) for w, h in re.findall(r'<img [^>]*width="(\d+)" height="(\d+)"', page.read_text())]
    assert len(probe["figures"]) == len(declared) == 2
    for figure, (width, height) in zip(probe["figures"], declared, strict=True):
        # Decoded at the size matplotlib drew it, and laid out on the page.
        assert figure["complete"] and (figure["w"], figure["h"]) == (width, height), figure
        assert figure["shown"] > 0, figure

    from PIL import Image

    shot = tmp_path / "shot.png"
    chromium(tmp_path / "profile-2", f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1000, 1400)
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20) or []
        # Anything clearly darker than white (an RGB image's colours are (r, g, b) tuples).
        ink = sum(n for n, rgb in colours if isinstance(rgb, tuple) and rgb[0] + rgb[1] + rgb[2] < 600)
    # Text, tables and plots: many colours and a fair amount of ink, not a blank or error page.
    assert len(colours) > 50
    assert ink > 0.01 * 1000 * 1400


@pytest.mark.parametrize(("label", "drawn"), [
    ("$x$", r"\$x\$"),  # not maths
    ("_hidden", " _hidden"),  # not left out of the legend
    ("m" * 80, "m" * 39 + "…"),  # a legend, not a paragraph
])
def test_figure_labels_are_drawn_as_written(label: str, drawn: str) -> None:
    assert report_html._mpl(label) == drawn
