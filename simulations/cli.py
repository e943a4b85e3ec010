"""The ``fedshop`` command. Each subcommand parses arguments and calls one library function.

    fedshop [-v] [-q] COMMAND ...   (-q: no progress display)
    fedshop simulate [--scenario reviews] [--out DIR] [--set KEY=VALUE ...] [--resume RUN_DIR] [--no-exact-scores]
    fedshop train-local --data DIR [DIR ...] [--scenario NAME] [--set KEY=VALUE ...] [--steps N] [--out DIR]
    fedshop audit RUN_DIR [--json] [--plot FILE.png] [--report FILE.md]
    fedshop audit --node-state PATH [RUN_DIR]
    fedshop audit --empirical --data DIR [--canaries M] [--calls K] [--no-noise] [--set KEY=VALUE ...]
    fedshop report RUN_DIR    (re)write RUN_DIR/report.html (every run writes it when it ends)
    fedshop evaluate RUN_DIR [--data DIR ...] [--offsets STATE_DIR] [--set KEY=VALUE ...] [--json]
    fedshop rank --model DIR --catalog FILE --query TEXT [-k 10] [--offsets STATE_DIR] [--json]
    fedshop recommend --model DIR --catalog FILE --history FILE [-k 10] [--offsets STATE_DIR] [--json]
    fedshop data validate DIR
    fedshop data prepare {reviews,esci} --out DIR
    fedshop data synth --merchants N --out DIR [--interactions N] [--products N] [--judgments N] [--seed S] [--limit K]
    fedshop deploy init DIR --name HOST... --address IP... [--port P] [--insecure]
    fedshop deploy add-merchant NAME --dir DIR --data-dir PATH --budget EPS --delta D [--device auto] [--port P]
    fedshop deploy register NAME... --dir DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared import flower_log, progress
from shared.jsonable import finite
from shared.run_files import CONFIG_FILE, LEDGER_FILE, MODEL_DIR

log = logging.getLogger("fedshop")


def _quiet_third_party_warnings() -> None:
    """Leave out of the default output the warnings that tell its reader nothing to do.

    Each is filtered by its own message, category and module, never wholesale: a new warning
    still shows. Ray's FutureWarning (``ray.init``) announces a future change to how it sets
    accelerator environment variables for actors with no GPU; the setting it proposes would
    change which devices a ClientApp sees, so fedshop keeps today's behaviour and only the
    notice goes.
    """
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\._private\.worker",
                            message=r"Tip: In future versions of Ray, Ray will no longer override accelerator")


def _setup_logging(verbose: bool) -> None:
    from simulations.engine import FLOWER_ENV

    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():  # Ray wraps its workers' lines in colour codes, for a terminal only
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "ray", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    flower_log.quiet_flower()  # configures Flower's logger (importing it), then quietens it
    flwr_logger = logging.getLogger(flower_log.FLOWER_LOGGER)
    flwr_logger.propagate = False  # Flower has its own console handler; avoid every line twice
    # Flower's round lines ("configure_train: Sampled 6 nodes", "aggregate_train: Received 6
    # results") repeat server.federation's own, in another format: shown with -v only.
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


# --------------------------------------------------------------------------- commands
def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations import engine

    if args.resume:
        run_dir = Path(args.resume)
        config_path = run_dir / CONFIG_FILE
        if not config_path.is_file():
            raise engine.ScenarioError(f"--resume {run_dir}: no {CONFIG_FILE} there (not a fedshop run dir)")
        saved = json.loads(config_path.read_text())
        config = engine.build_config(saved, {**engine.parse_overrides(args.set), "resume": True}, out=run_dir)
        scenario_name = ""
    else:
        scenario = engine.load_scenario(args.scenario)
        config = engine.build_config(scenario, engine.parse_overrides(args.set), out=args.out)
        scenario_name = args.scenario
        if args.out is None and (Path(config.run_dir) / LEDGER_FILE).exists():
            # Re-running the same command must not fail on the previous run's folder, nor
            # touch it: a new, dated run directory beside it.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            config = config.replace(run_dir=f"{config.run_dir}-{stamp}")
            log.info("%s holds an earlier run; this one goes to %s", scenario.get("run-dir"), config.run_dir)
    engine.ensure_data(config, scenario_name)
    if not args.resume:  # a resumed run keeps its saved tasks
        config = engine.fit_tasks_to_data(config, engine.parse_overrides(args.set))
    merchants = engine.count_merchants(config)
    engine.refuse_if_every_budget_is_spent(config, num_merchants=merchants)
    if config.merchants_per_round > merchants:
        log.warning("merchants-per-round = %d but only %d merchants exist; sampling all of them",
                    config.merchants_per_round, merchants)
        config = config.replace(merchants_per_round=merchants)
    log.info("simulating %d merchant(s), %d round(s), %d per round; run dir %s", merchants,
             config.num_server_rounds, config.merchants_per_round, config.run_dir)
    engine.run_simulation(config, num_merchants=merchants)
    # The ServerApp has printed the run summary (also in RUN_DIR/summary.json): noised figures.
    if not args.no_exact_scores:
        _print_merchants_own_view(Path(config.run_dir), Path(config.data_dir), merchants)
    return 0


# The simulation's closing table scores every merchant's whole held-out set: a few seconds a
# merchant with a frozen encoder, too long for a federation of thousands.
OWN_VIEW_MAX_MERCHANTS = 12


def _print_merchants_own_view(run_dir: Path, data_dir: Path, merchants: int) -> None:
    """Each merchant's exact scores of the run's model on its own held-out records, beside the
    constants' (client.held_out): what each merchant sees on its own machine at no ε. In
    simulation one person holds every merchant's data, so the table goes to this console (every
    merchant's own log here); nothing of it is written to the run folder."""
    from client import held_out

    command = f"fedshop evaluate {run_dir}"
    if not held_out.has_model(run_dir):
        return  # the run stopped before exporting a model: nothing to score
    if merchants > OWN_VIEW_MAX_MERCHANTS or not data_dir.is_dir():
        print(f"each merchant's exact scores on its own held-out records: {command} --data MERCHANT_DIR")
        return
    found = list(held_out.views(run_dir))  # scored first: the encoders' log lines come before the table
    print(f"each merchant's own view: exact scores on its own held-out records, beside the constants' "
          f"({held_out.LEGEND}; again with: {command}):")
    print(held_out.table(found), flush=True)


def cmd_train_local(args: argparse.Namespace) -> int:
    from simulations import engine, local

    scenario = engine.load_scenario(args.scenario) if args.scenario else {}
    overrides = engine.parse_overrides(args.set)
    config = engine.build_config(scenario, overrides, out=None)
    # As many steps as the federation it stands beside (benchmarks/utility.py's reference arms).
    plan = local.federation_steps(config, len(args.data), steps=args.steps)
    config = plan.config
    log.info("train-local: %d steps (%s)", config.max_local_steps, plan.why)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = local.train_local([Path(d) for d in args.data], config, out_dir=out)
    report = local.describe(result, config, steps_why=plan.why)
    (out / "result.json").write_text(json.dumps(finite(report), indent=1))
    if args.json:
        print(json.dumps(finite(report), indent=1))
    else:
        print(f"trained on {report['examples']} examples, {report['steps']} steps ({plan.why}), "
              f"mean train loss {report['train_loss']:.4f}")
        if config.dp:
            print(f"privacy: the merchant's cumulative ε = {report['epsilon']:.4f} at δ = {report['delta']:g} "
                  "(PLD for replace-one neighbours; its state lives with its data and counts every run)")
        else:
            print("privacy: none (dp = false; a non-private baseline)")
        for key in sorted(report["metrics_after"]):
            before = report["metrics_before"].get(key)
            shown = f"{before:.4f} -> " if before is not None else ""
            print(f"  {key:<22} {shown}{report['metrics_after'][key]:.4f}")
        print(f"model and result.json written to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from server import report_html

    return report_html.main([args.run_dir])


def cmd_audit(args: argparse.Namespace) -> int:
    from server import audit
    from server.audit import report as privacy_report

    if args.empirical:
        return _empirical_audit(args)
    if args.node_state:
        result = audit.audit_node_state(Path(args.node_state), run_dir=Path(args.run_dir) if args.run_dir else None,
                                        tolerance_abs=args.tolerance_abs, tolerance_rel=args.tolerance_rel)
        if args.json:
            print(json.dumps(result.to_dict(), indent=1))
        else:
            print(f"merchant {result.merchant_id}: {result.calls} training call(s), {result.total_steps} steps")
            left = max(0.0, result.budget - result.epsilon_pld)
            print(f"  ε {result.epsilon_pld:.4f} (PLD, replace-one neighbours; add/remove for reference "
                  f"{result.epsilon_add_remove:.4f}) at δ {result.delta:g}; budget {result.budget:.4f}, "
                  f"left {left:.4f}")
            if result.compared_with:
                print(f"  compared with the ledger of {result.compared_with}")
            print("  PASSED" if result.passed else "  FAILED:\n" + "\n".join(f"    - {f}" for f in result.findings))
        return 0 if result.passed else 1
    if not args.run_dir:
        raise audit.AuditInputError("give a RUN_DIR, --node-state PATH, or --empirical")
    report = audit.audit_run(Path(args.run_dir), tolerance_abs=args.tolerance_abs, tolerance_rel=args.tolerance_rel)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(privacy_report.audit_table(report))
    if args.plot:
        print(f"plot: {privacy_report.plot_epsilon(report, Path(args.plot))}", file=sys.stderr)
    if args.report:
        empirical = None
        candidate = Path(args.empirical_result) if args.empirical_result else Path(args.run_dir) / "canary_audit.json"
        if candidate.is_file():
            empirical = json.loads(candidate.read_text())
        print(f"report: {privacy_report.write_privacy_report(report, Path(args.report), empirical=empirical)}",
              file=sys.stderr)
    return 0 if report.passed else 1


def _empirical_audit(args: argparse.Namespace) -> int:
    """One-run canary audit; 0 when both lower bounds stay at or below the claim, 1 when either
    exceeds it (the claim is refuted), 2 (via ``main``) when the setting could not fail."""
    from simulations import engine
    from simulations.canary_audit import run_canary_audit

    if not args.data:
        raise engine.ScenarioError("--empirical needs --data DIR (one merchant folder)")
    scenario = engine.load_scenario(args.scenario) if args.scenario else {}
    config = engine.build_config(scenario, engine.parse_overrides(args.set), out=None)
    out = Path(args.out or "runs/canary-audit")
    result = run_canary_audit([Path(d) for d in args.data], config, m=args.canaries, calls=args.calls,
                              noise=not args.no_noise, seed=config.seed, out_dir=out)
    info = result.to_dict()
    if args.json:
        print(json.dumps(finite(info), indent=1))
    else:
        mode = "DP-SGD" if info["dp"] else "NO NOISE, a control"
        print(f"canary audit, {mode}: {info['m']} canaries, {info['calls']} consecutive call(s), "
              f"{info['steps']} steps at q = {info['sample_rate']:.4g}, σ = {info['noise_multiplier']:g}")
        print(f"  guesses: {info['r']} ({info['k_plus']} included, {info['k_minus']} excluded), {info['v']} correct")
        print(f"  lower bound ε ≥ {info['epsilon_lower_bound_fdp']:.3f} (f-DP, Mahloujifar et al. 2024), "
              f"ε ≥ {info['epsilon_lower_bound_steinke']:.3f} (Steinke et al. 2023), "
              f"{info['confidence']:.0%} confidence")
        print(f"  claimed ε = {info['epsilon_claimed']:.3f} at δ = {info['delta']:g} for the {info['calls']} call(s) "
              "composed" + ("" if info["dp"] else " (what the DP configuration would claim; this run had no noise)"))
        print(f"  power: all {info['r']} guesses right would prove ε ≥ {info['power_fdp']:.3f} (f-DP) / "
              f"{info['power_steinke']:.3f} (Steinke); the DP training draws {info['seen']:.1%} of the canaries "
              f"into some batch, so even a perfect attack on it expects to prove about {info['power_expected']:.3f}")
        if info["passed"]:
            print("  PASSED: both lower bounds are at or below the claim")
        else:
            print(f"  FAILED: the lower bound {info['epsilon_lower_bound']:.3f} EXCEEDS the claimed ε "
                  f"{info['epsilon_claimed']:.3f}" + ("" if info["dp"] else " (as a no-noise control must)"))
        print(f"  result written to {out / 'canary_audit.json'}")
    return 0 if info["passed"] else 1


def _print_scored(results: list[Any], *, as_json: bool, what: str) -> None:
    if as_json:
        print(json.dumps([{"rank": r.rank, "product_id": r.product_id, "title": r.title, "score": r.score}
                          for r in results], indent=1))
        return
    if not results:
        print("no products to show")
        return
    width = min(70, max(len(r.title) for r in results))
    print(f"{'rank':>4}  {'product_id':<14} {'title':<{width}}  {what:>9}")
    for r in results:
        title = r.title if len(r.title) <= width else r.title[: width - 1] + "…"
        print(f"{r.rank:>4}  {r.product_id:<14} {title:<{width}}  {r.score:>9.4f}")


OFFSETS_HELP = ("a merchant's state folder (in simulation RUN_DIR/nodes/<merchant>): score with its local "
                "offsets (local-offsets = true), on its own scale; the order is the global model's")


def _check_model(path: str) -> Path:
    model_dir = Path(path)
    if not (model_dir / "fedshop.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: not an exported fedshop model (no fedshop.json); "
                                "a run writes one to RUN_DIR/model")
    return model_dir


def _offsets(args: argparse.Namespace) -> Path | None:
    return Path(args.offsets) if args.offsets else None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from client import held_out
    from simulations.engine import parse_overrides

    data = [Path(d) for d in args.data] if args.data else None
    found = list(held_out.views(Path(args.run_dir), data, offsets_dir=_offsets(args), own=parse_overrides(args.set)))
    if args.json:
        print(json.dumps([v.to_json() for v in found], indent=1))
    else:
        print(f"exact scores of {Path(args.run_dir) / MODEL_DIR} on each merchant's own held-out records, beside the "
              f"constants' ({held_out.LEGEND}):")
        print(held_out.table(found))
    return 1 if any(v.problem for v in found) else 0  # a merchant that could not be scored


def cmd_rank(args: argparse.Namespace) -> int:
    from client.serving import rank

    results = rank(_check_model(args.model), Path(args.catalog), args.query, k=args.k, offsets=_offsets(args))
    _print_scored(results, as_json=args.json, what="relevance")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from client.serving import recommend

    results = recommend(_check_model(args.model), Path(args.catalog), Path(args.history), k=args.k,
                        offsets=_offsets(args))
    _print_scored(results, as_json=args.json, what="P(convert)")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from client.data import validate_merchant_dir

    problems = validate_merchant_dir(Path(args.dir))
    if not problems:
        print(f"{args.dir}: OK")
        return 0
    for problem in problems:
        print(problem)
    print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
    return 1


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from client.sources import adapters

    if args.dataset == "reviews":
        dirs = adapters.prepare_reviews(Path(args.out), overwrite=args.overwrite)
    else:
        dirs = adapters.prepare_esci(Path(args.out), overwrite=args.overwrite)
    for d in dirs:
        print(d)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from client.sources.synthetic import SyntheticFederation, write_merchants

    federation = SyntheticFederation(args.merchants, seed=args.seed, products_per_merchant=args.products,
                                     interactions_per_merchant=args.interactions, judgments_per_merchant=args.judgments)
    indices = range(min(args.limit, args.merchants)) if args.limit else None
    for d in write_merchants(federation, Path(args.out), indices=indices):
        print(d)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from simulations import deploy_cli

    return deploy_cli.main(args)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedshop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress display (it shows only on a terminal, for steps over 5 s)")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federated simulation (Flower simulation engine, Ray)")
    sim.add_argument("--scenario", default="reviews", help="scenario name or TOML file (default: reviews)")
    sim.add_argument("--out", type=Path, help="run directory (default: the scenario's run-dir)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete round")
    sim.add_argument("--no-exact-scores", action="store_true",
                     help="do not end with each merchant's exact scores on its own held-out records (for scripts "
                          "that score the model themselves; `fedshop evaluate RUN_DIR` prints them later)")
    sim.set_defaults(func=cmd_simulate)

    tl = sub.add_parser("train-local", help="train and evaluate one merchant (or the union of several)")
    tl.add_argument("--data", nargs="+", required=True, metavar="DIR", help="merchant folder(s)")
    tl.add_argument("--scenario", help="take run-config defaults from this scenario")
    tl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key")
    tl.add_argument("--steps", type=int, metavar="N",
                    help="train exactly N steps; default: as many as the federation takes (several folders: "
                         "rounds x merchants per round x max-local-steps; one folder: rounds x max-local-steps, "
                         "the steps it takes if sampled every round), in one call whose noise plan fits the "
                         "merchant's budget")
    tl.add_argument("--out", default="runs/local", help="where the model and result.json go")
    tl.add_argument("--json", action="store_true", help="print the result as JSON")
    tl.set_defaults(func=cmd_train_local)

    aud = sub.add_parser("audit", help="audit privacy: a run's ledger, a merchant's own state, or empirically")
    aud.add_argument("run_dir", nargs="?", metavar="RUN_DIR")
    aud.add_argument("--json", action="store_true", help="machine-readable output")
    aud.add_argument("--plot", metavar="FILE.png", help="ε per merchant over rounds against its budget")
    aud.add_argument("--report", metavar="FILE.md", help="one-page privacy report (Markdown + plot)")
    aud.add_argument("--empirical-result", metavar="FILE", help="canary audit JSON to include in --report")
    aud.add_argument("--node-state", metavar="PATH", help="a merchant's privacy-state.json (compared with RUN_DIR)")
    aud.add_argument("--tolerance-abs", type=float, default=0.05,
                     help="RUN_DIR: recorded ε above re-derived by more than this (+ rel) is a warning (below it "
                          "by more than 0.001 always fails); --node-state: the allowed disagreement (+ rel)")
    aud.add_argument("--tolerance-rel", type=float, default=0.02, help="relative part of --tolerance-abs")
    aud.add_argument("--empirical", action="store_true",
                     help="one-run canary audit (Steinke et al. 2023; Mahloujifar et al. 2024): exit 1 if it "
                          "refutes the claimed ε, 2 if the setting could not refute it")
    aud.add_argument("--data", nargs="+", metavar="DIR", help="with --empirical: the merchant folder(s)")
    aud.add_argument("--scenario", help="with --empirical: run-config defaults from this scenario")
    aud.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    aud.add_argument("--canaries", type=int, default=1000, help="with --empirical: number of canaries m")
    aud.add_argument("--calls", type=int, default=2, metavar="K",
                     help="with --empirical: consecutive training calls of the merchant, canaries inserted once "
                          "(the claim is the K calls composed; default 2)")
    aud.add_argument("--no-noise", action="store_true",
                     help="with --empirical: train without DP, a control that must fail (exit 1)")
    aud.add_argument("--out", help="with --empirical: output folder")
    aud.set_defaults(func=cmd_audit)

    rep = sub.add_parser("report", help="(re)write RUN_DIR/report.html: one page on a run, figures embedded")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.set_defaults(func=cmd_report)

    ev = sub.add_parser("evaluate", help="a merchant's exact scores of a run's model on its own held-out records "
                                         "(no ε: nothing is released)")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's folder (its config.json and model/)")
    ev.add_argument("--data", nargs="+", metavar="DIR",
                    help="merchant folders, or folders of them (default: the run's data-dir)")
    ev.add_argument("--offsets", metavar="STATE_DIR", help=OFFSETS_HELP)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a key your node config pins (test-fraction, test-offset, split-seed, privacy-unit, ...): "
                         "your split was made with it, not the run's")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    rk = sub.add_parser("rank", help="rank a catalogue's products for a search query (relevance head)")
    rk.add_argument("--model", required=True, help="an exported model folder (RUN_DIR/model)")
    rk.add_argument("--catalog", required=True, help="catalogue file in the merchant data format")
    rk.add_argument("--query", required=True)
    rk.add_argument("-k", type=int, default=10)
    rk.add_argument("--offsets", metavar="STATE_DIR", help=OFFSETS_HELP)
    rk.add_argument("--json", action="store_true")
    rk.set_defaults(func=cmd_rank)
    rc = sub.add_parser("recommend", help="recommend products from a user's recent interactions (conversion head)")
    rc.add_argument("--model", required=True, help="an exported model folder (RUN_DIR/model)")
    rc.add_argument("--catalog", required=True, help="catalogue file in the merchant data format")
    rc.add_argument("--history", required=True, help="the user's interactions file (merchant data format)")
    rc.add_argument("-k", type=int, default=10)
    rc.add_argument("--offsets", metavar="STATE_DIR", help=OFFSETS_HELP)
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=cmd_recommend)

    data = sub.add_parser("data", help="merchant data: validate, prepare bundled data, generate")
    dsub = data.add_subparsers(dest="data_command", required=True)
    val = dsub.add_parser("validate", help="check a merchant folder and list every problem")
    val.add_argument("dir")
    val.set_defaults(func=cmd_data_validate)
    prep = dsub.add_parser("prepare", help="write merchant folders from bundled real data")
    prep.add_argument("dataset", choices=["reviews", "esci"])
    prep.add_argument("--out", required=True)
    prep.add_argument("--overwrite", action="store_true")
    prep.set_defaults(func=cmd_data_prepare)
    syn = dsub.add_parser("synth", help="write synthetic merchants with a planted ground truth")
    syn.add_argument("--merchants", type=int, required=True)
    syn.add_argument("--out", required=True)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--limit", type=int, default=0, help="write only the first K merchants")
    syn.add_argument("--products", type=int, default=60, help="nominal products per merchant (each 0.5x-2x)")
    syn.add_argument("--interactions", type=int, default=300,
                     help="nominal interactions per merchant (each 0.5x-2x; about 6 per user)")
    syn.add_argument("--judgments", type=int, default=60, help="nominal relevance judgments per merchant")
    syn.set_defaults(func=cmd_data_synth)

    from simulations.deploy_cli import add_arguments as add_deploy_arguments

    dep = sub.add_parser("deploy", help="real federation: SuperLink certificates, merchants' SuperNode folders")
    add_deploy_arguments(dep)
    dep.set_defaults(func=cmd_deploy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    _quiet_third_party_warnings()
    # Decided here, where the terminal is known, before any Ray worker copies the environment.
    progress.enable(sys.stderr.isatty() and not args.quiet)
    from client.data import DataValidationError
    from server.audit import AuditInputError
    from server.federation import FederationError
    from server.ledger import LedgerError
    from shared.config import ConfigError
    from shared.privacy.budget import BudgetExceededError, PrivacyStateError
    from simulations.engine import ScenarioError

    try:
        return int(args.func(args))
    except (ConfigError, ScenarioError, DataValidationError, BudgetExceededError, PrivacyStateError,
            FederationError, LedgerError, AuditInputError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"fedshop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ray has been shut down by now (simulations.engine), and every committed ledger row
        # and checkpoint is already on disk. The ServerApp thread may still be waiting for
        # replies that will never come, so leave without joining it.
        print("fedshop: interrupted; resume with: fedshop simulate --resume RUN_DIR", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
