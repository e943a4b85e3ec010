"""The ``fedshop`` command. Each subcommand parses arguments and calls one library function.

    fedshop simulate [--scenario reviews] [--out DIR] [--set KEY=VALUE ...] [--resume RUN_DIR]
    fedshop train-local --data DIR [DIR ...] [--scenario NAME] [--set KEY=VALUE ...] [--out DIR]
    fedshop data validate DIR
    fedshop data prepare {reviews,esci} --out DIR
    fedshop data synth --merchants N --out DIR [--seed S] [--limit K]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("fedshop")


def _setup_logging(verbose: bool) -> None:
    from simulations.engine import FLOWER_ENV

    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "ray", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import flwr.supercore.logger  # noqa: F401  (configures Flower's logger; adjust it afterwards)

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own console handler; avoid every line twice
    if not verbose:
        flwr_logger.setLevel(logging.INFO)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- commands
def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations import engine

    if args.resume:
        run_dir = Path(args.resume)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise engine.ScenarioError(f"--resume {run_dir}: no config.json there (not a fedshop run dir)")
        saved = json.loads(config_path.read_text())
        config = engine.build_config(saved, {**engine.parse_overrides(args.set), "resume": True}, out=run_dir)
        scenario_name = ""
    else:
        scenario = engine.load_scenario(args.scenario)
        config = engine.build_config(scenario, engine.parse_overrides(args.set), out=args.out)
        scenario_name = args.scenario
    engine.ensure_data(config, scenario_name)
    merchants = engine.count_merchants(config)
    log.info("simulating %d merchant(s), %d round(s), %d per round; run dir %s", merchants,
             config.num_server_rounds, config.merchants_per_round, config.run_dir)
    engine.run_simulation(config, num_merchants=merchants)
    return 0  # the ServerApp has printed the run summary (also in RUN_DIR/summary.json)


def cmd_train_local(args: argparse.Namespace) -> int:
    from simulations import engine, local

    scenario = engine.load_scenario(args.scenario) if args.scenario else {}
    overrides = engine.parse_overrides(args.set)
    config = engine.build_config(scenario, overrides, out=None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = local.train_local([Path(d) for d in args.data], config, out_dir=out)
    report = local.describe(result, config)
    (out / "result.json").write_text(json.dumps(_jsonable(report), indent=1))
    if args.json:
        print(json.dumps(_jsonable(report), indent=1))
    else:
        print(f"trained on {report['examples']} examples, {report['steps']} steps, "
              f"mean train loss {report['train_loss']:.4f}")
        if config.dp:
            print(f"privacy: ε = {report['epsilon']:.4f} at δ = {report['delta']:g} (PRV accountant)")
        else:
            print("privacy: none (dp = false; a non-private baseline)")
        for key in sorted(report["metrics_after"]):
            before = report["metrics_before"].get(key)
            shown = f"{before:.4f} -> " if before is not None else ""
            print(f"  {key:<22} {shown}{report['metrics_after'][key]:.4f}")
        print(f"model and result.json written to {out}")
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
    from simulations import adapters

    if args.dataset == "reviews":
        dirs = adapters.prepare_reviews(Path(args.out), overwrite=args.overwrite)
    else:
        dirs = adapters.prepare_esci(Path(args.out), overwrite=args.overwrite)
    for d in dirs:
        print(d)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from simulations.synthetic import SyntheticFederation, write_merchants

    federation = SyntheticFederation(args.merchants, seed=args.seed)
    indices = range(min(args.limit, args.merchants)) if args.limit else None
    for d in write_merchants(federation, Path(args.out), indices=indices):
        print(d)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedshop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federated simulation (Flower simulation engine, Ray)")
    sim.add_argument("--scenario", default="reviews", help="scenario name or TOML file (default: reviews)")
    sim.add_argument("--out", type=Path, help="run directory (default: the scenario's run-dir)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete round")
    sim.set_defaults(func=cmd_simulate)

    tl = sub.add_parser("train-local", help="train and evaluate one merchant (or the union of several)")
    tl.add_argument("--data", nargs="+", required=True, metavar="DIR", help="merchant folder(s)")
    tl.add_argument("--scenario", help="take run-config defaults from this scenario")
    tl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key")
    tl.add_argument("--out", default="runs/local", help="where the model and result.json go")
    tl.add_argument("--json", action="store_true", help="print the result as JSON")
    tl.set_defaults(func=cmd_train_local)

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
    syn.set_defaults(func=cmd_data_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from client.budget import BudgetExceededError, PrivacyStateError
    from client.data import DataValidationError
    from server.federation import FederationError
    from shared.config import ConfigError
    from simulations.engine import ScenarioError

    try:
        return int(args.func(args))
    except (ConfigError, ScenarioError, DataValidationError, BudgetExceededError, PrivacyStateError,
            FederationError, FileExistsError, FileNotFoundError) as exc:
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
