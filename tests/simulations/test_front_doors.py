"""The README's front doors work as documented: every command in its command table is
exercised by a test (this file or the one ``COVERED`` names), and Flower's own ``flwr run``
works from a fresh ``FLWR_HOME``.

The ``fedshop simulate`` variants here stop where the simulation starts
(``engine.run_simulation`` replaced): what they check is the front door, the scenario and
options arriving in the run's config; the simulation itself runs in ``test_simulate.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from server.federation import Federation, FederationError
from server.ledger import PrivacyLedger
from shared.config import RunConfig
from shared.model import MANIFEST_FILE
from shared.run_files import LEDGER_FILE, MODEL_DIR, SUMMARY_FILE
from simulations import cli, engine
from tests.helpers import proc
from tests.helpers.deployment import free_ports
from tests.helpers.federation import FAST, write_scenario
from tests.helpers.merchants import write_merchants

README = proc.REPO / "README.md"
TESTS = proc.REPO / "tests"

# Each row of the README's command table (its "Goal" cell) and a test that runs that command.
HERE = "simulations/test_front_doors.py::"
COVERED: dict[str, str] = {
    "Run a federation locally": HERE + "test_simulate_default_and_its_dated_second_run",
    "Resume a run that was interrupted":
        "simulations/test_simulate.py::test_resume_after_killing_the_whole_process_group",
    "Fine-tune the encoder too": HERE + "test_simulate_scenario_on_a_users_data",
    "Hold out fold k of K": HERE + "test_simulate_set_test_fraction_and_offset",
    "Same scenario through Flower's own CLI": HERE + "test_flwr_run_from_a_fresh_flwr_home",
    "Hide each merchant's update from the operator":
        "simulations/test_simulate_secagg.py::test_a_secagg_round_moves_the_model_by_the_plain_mean_of_the_updates",
    "Check a merchant's data": HERE + "test_data_validate",
    "Prepare the bundled real data": HERE + "test_data_prepare_reviews_and_esci",
    "Generate synthetic merchants": HERE + "test_data_synth",
    "Train one merchant alone, or the pooled": HERE + "test_train_local_one_merchant_and_pooled",
    "A merchant's exact scores of a run's model":
        "client/test_held_out.py::test_fedshop_evaluate_prints_the_table_or_json",
    "Audit a run's privacy ledger":
        "server/test_privacy_report.py::test_cli_report_names_every_merchant_delta_guarantee_and_plot",
    "Audit a merchant's own record": "server/test_audit.py::test_cli_node_state_exit_codes",
    "Empirical privacy audit": "simulations/test_canary_audit.py::test_audit_without_noise_exits_non_zero",
    "A run's one-page report": "server/test_report_html.py::test_the_command_rewrites_the_page",
    "Search a catalogue": "client/test_serving.py::test_cli_json_output_and_table",
    "Recommend from a user's history": "client/test_serving.py::test_recommend_serves_the_trained_head",
    "Deploy a merchant node": "simulations/test_deploy.py::test_deployment_tls_auth_faults_and_budgets",
}


def _command_table() -> dict[str, str]:
    """The README's "Everyday commands" table: goal -> command cell."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Everyday commands", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 2 and cells[0] not in ("Goal", "---"):
            rows[cells[0]] = cells[1]
    return rows


def test_every_readme_command_is_exercised_by_a_test() -> None:
    rows = _command_table()
    assert len(rows) >= 10, "the README's command table was not found"
    for goal in rows:
        matches = [key for key in COVERED if goal.startswith(key)]
        assert matches, f"README command {goal!r} has no test in COVERED: add one"
        path, name = COVERED[matches[0]].split("::")
        assert re.search(rf"^def {name}\(", (TESTS / path).read_text(encoding="utf-8"), re.M), \
            f"{COVERED[matches[0]]} (for README row {goal!r}) does not exist"
    assert len(rows) == len(COVERED), f"COVERED names rows the README no longer has: {sorted(COVERED)}"


# --------------------------------------------------------------------------- fedshop simulate, up to the engine
@pytest.fixture()
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[RunConfig, int]]:
    """What ``fedshop simulate`` would have simulated (config, merchants), instead of simulating."""
    calls: list[tuple[RunConfig, int]] = []

    def run_simulation(config: RunConfig, *, num_merchants: int) -> None:
        calls.append((config, num_merchants))
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.run_dir) / LEDGER_FILE).touch()  # as a run leaves it

    monkeypatch.setattr(engine, "run_simulation", run_simulation)
    return calls


def test_simulate_default_and_its_dated_second_run(started: list[tuple[RunConfig, int]], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedshop simulate`` with no flags: the reviews scenario, its bundled data prepared on first
    use (6 departments), ``runs/reviews``; run again, a dated folder beside it."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["simulate"]) == 0
    config, merchants = started[0]
    assert merchants == 6 and sorted(p.name for p in (tmp_path / "merchants" / "reviews").iterdir()) == [
        "bottoms", "dresses", "intimate", "jackets", "tops", "trend"]
    assert config.to_mapping() == engine.build_config(engine.load_scenario("reviews"), {}, out=None).to_mapping()
    assert cli.main(["simulate"]) == 0
    second = started[1][0].run_dir
    assert re.fullmatch(r"runs/reviews-\d{8}-\d{6}", second), second


@pytest.mark.parametrize("scenario", ["reviews", "reviews-lora"])
def test_simulate_scenario_on_a_users_data(scenario: str, started: list[tuple[RunConfig, int]], tmp_path: Path) -> None:
    write_merchants(tmp_path / "data", ["shop-a", "shop-b"])
    assert cli.main(["simulate", "--scenario", scenario, "--out", str(tmp_path / "run"),
                     "--set", f"data-dir={tmp_path / 'data'}"]) == 0
    config, merchants = started[0]
    recipe = engine.load_scenario(scenario)
    expected = {"reviews": "heads", "reviews-lora": "lora"}[scenario]
    assert merchants == 2 and config.trainable == expected == recipe["trainable"]
    # every setting of the scenario arrives, but where it goes and how many it samples (2 merchants here)
    mine = ("data-dir", "run-dir", "merchants-per-round")
    assert {k: v for k, v in config.to_mapping().items() if k in recipe and k not in mine} == {
        k: v for k, v in recipe.items() if k not in mine}
    assert config.run_dir == str(tmp_path / "run")


def test_simulate_default_trains_the_tasks_the_data_holds(started: list[tuple[RunConfig, int]], tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The default scenario (conversion + rating) on ESCI's judgments trains relevance, the one
    head that data supports; ``--set tasks`` is the user's choice and stays."""
    from client.sources import adapters

    adapters.prepare_esci(tmp_path / "esci")
    with caplog.at_level("INFO", logger="simulations.engine"):
        assert cli.main(["simulate", "--out", str(tmp_path / "run"), "--set", f"data-dir={tmp_path / 'esci'}"]) == 0
    assert engine.load_scenario("reviews")["tasks"] == "ctr,rating"
    assert started[0][0].tasks == "relevance"
    assert "tasks ctr,rating -> relevance" in caplog.text
    assert cli.main(["simulate", "--out", str(tmp_path / "run2"), "--set", f"data-dir={tmp_path / 'esci'}",
                     "--set", "tasks=ctr"]) == 0
    assert started[1][0].tasks == "ctr"
    # Data holding more than the scenario names: the scenario's tasks, and the log says how to add the rest.
    write_merchants(tmp_path / "shops", ["shop-a"])
    caplog.clear()
    with caplog.at_level("INFO", logger="simulations.engine"):
        assert cli.main(["simulate", "--scenario", "reviews-lora", "--out", str(tmp_path / "run3"),
                         "--set", f"data-dir={tmp_path / 'shops'}"]) == 0
    assert started[2][0].tasks == "ctr"
    assert "--set tasks=ctr,rating" in caplog.text


def test_simulate_refuses_to_start_when_every_merchant_has_spent_its_budget(
        started: list[tuple[RunConfig, int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client.merchant import privacy_state_path
    from shared.privacy.budget import PrivacyState
    from shared.privacy.events import MechanismEvent

    shops = write_merchants(tmp_path / "data", ["shop-a", "shop-b"])
    costly = MechanismEvent(noise_multiplier=0.6, sample_rate=1.0, steps=1, max_grad_norm=1.0)
    for shop in shops:
        path = privacy_state_path(shop)
        PrivacyState.create(path, merchant_id=shop.name, target_epsilon=1.0, target_delta=1e-5)
        state = PrivacyState.open(path, merchant_id=shop.name, target_epsilon=1.0, target_delta=1e-5)
        state.commit(costly, unit_count=50, round=1, model_version=0, run_id="earlier")
        if shop.name == "shop-a":
            room = state.epsilon()
    argv = ["simulate", "--out", str(tmp_path / "run"), "--set", f"data-dir={tmp_path / 'data'}"]
    assert cli.main([*argv, "--set", "target-epsilon=1"]) == 2
    err = capsys.readouterr().err
    assert "every merchant" in err and "shop-a ε" in err and "shop-b ε" in err and not started
    # One merchant with room left (a fresh state, a budget above that spend): the run starts.
    state_a = privacy_state_path(shops[0])
    state_a.unlink()
    PrivacyState.create(state_a, merchant_id="shop-a", target_epsilon=2 * room, target_delta=1e-5)
    assert cli.main([*argv, "--set", f"target-epsilon={2 * room}"]) == 0 and started


def test_simulate_set_test_fraction_and_offset(started: list[tuple[RunConfig, int]], tmp_path: Path) -> None:
    write_merchants(tmp_path / "data", ["shop-a"])
    assert cli.main(["simulate", "--out", str(tmp_path / "run"), "--set", f"data-dir={tmp_path / 'data'}",
                     "--set", "test-fraction=0.2", "--set", "test-offset=0.4"]) == 0
    config = started[0][0]
    assert (config.test_fraction, config.test_offset) == (0.2, 0.4)
    # a fold outside [0, 1) is refused with the key and value named
    assert cli.main(["simulate", "--out", str(tmp_path / "r2"), "--set", f"data-dir={tmp_path / 'data'}",
                     "--set", "test-offset=1.0"]) == 2
    assert len(started) == 1


# --------------------------------------------------------------------------- fedshop data, train-local
def test_data_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = write_merchants(tmp_path, ["good", "bad"])
    assert cli.main(["data", "validate", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: OK"
    (bad / "interactions.csv").write_text("user_id,product_id,label\nu1,p1,click\nu2,nope,click\n")
    assert cli.main(["data", "validate", str(bad)]) == 1
    out = capsys.readouterr()
    assert "interactions.csv" in out.out and "'nope'" in out.out and "1 problem(s)" in out.err


def test_data_prepare_reviews_and_esci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "prepare", "reviews", "--out", str(tmp_path / "reviews")]) == 0
    reviews = capsys.readouterr().out.split()
    assert [Path(p).name for p in reviews] == ["bottoms", "dresses", "intimate", "jackets", "tops", "trend"]
    assert cli.main(["data", "validate", reviews[-1]]) == 0  # what it writes is valid merchant data
    assert capsys.readouterr().out.strip() == f"{reviews[-1]}: OK"
    assert cli.main(["data", "prepare", "esci", "--out", str(tmp_path / "esci")]) == 0
    assert len(capsys.readouterr().out.split()) == 4
    # The README's `flwr run` line starts one simulated SuperNode per merchant the reviews data has.
    assert _readme_flwr_command()["num-supernodes"] == len(reviews)


def test_data_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "synth", "--merchants", "50", "--out", str(tmp_path), "--limit", "2"]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 2 and all(Path(p).is_dir() for p in written)
    assert cli.main(["data", "validate", written[0]]) == 0


def test_train_local_one_merchant_and_pooled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = write_merchants(tmp_path / "data", ["shop-a", "shop-b"])
    tiny = ["--set", "encoder=tiny", "--set", "max-local-steps=2", "--set", "batch-size=8", "--set", "evaluate=false",
            "--set", "target-epsilon=100.0"]
    assert cli.main(["train-local", "--data", str(a), "--out", str(tmp_path / "alone"), *tiny]) == 0
    out = capsys.readouterr().out
    assert "cumulative ε" in out and (tmp_path / "alone" / MODEL_DIR / MANIFEST_FILE).is_file()
    assert cli.main(["train-local", "--data", str(a), str(b), "--out", str(tmp_path / "pooled"), "--json",
                     "--set", "dp=false", *tiny]) == 0
    pooled = json.loads(capsys.readouterr().out)
    assert pooled["dp"] is False and pooled["steps"] >= 1 and set(pooled["per_merchant"]) == {"shop-a", "shop-b"}
    # Pooling is non-private only: a private pooled call would spend every merchant's budget.
    assert cli.main(["train-local", "--data", str(a), str(b), "--out", str(tmp_path / "no"), *tiny]) == 2
    assert "dp = true with several merchant folders" in capsys.readouterr().err


# --------------------------------------------------------------------------- flwr run
def test_a_run_dir_holding_a_run_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).touch()
    config = RunConfig.from_mapping({"run-dir": str(tmp_path)})
    with pytest.raises(FederationError) as refused:
        Federation(None, config, {})  # type: ignore[arg-type]  (refused before the grid is used)
    message = str(refused.value)
    assert f"fedshop simulate --resume {tmp_path}" in message and "resume = true" in message
    assert "fedshop simulate --out NEW_DIR" in message and "run-dir names a new folder" in message


def _readme_flwr_command() -> dict[str, Any]:
    """The README's `flwr run` command: its argv and its federation size."""
    cell = next(c for goal, c in _command_table().items() if goal.startswith("Same scenario through Flower"))
    command = next(c for c in re.findall(r"`([^`]+)`", cell) if c.startswith("flwr run"))
    argv = shlex.split(command)
    federation = argv[argv.index("--federation-config") + 1]
    size = re.fullmatch(r"num-supernodes=(\d+)", federation)
    assert size, f"README: flwr run's --federation-config {federation!r} does not set num-supernodes"
    return {"argv": argv, "num-supernodes": int(size.group(1))}


def _started_with(flwr_home: Path) -> list[int]:
    """PIDs of live processes whose environment carries this test's own FLWR_HOME: the local
    SuperLink ``flwr run`` starts detached (its own session), its SuperExec (another session),
    and what those start. Nothing else can carry that temporary path."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0") and proc.is_alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _stop_started_with(flwr_home: Path, *, timeout_s: float = 30.0) -> None:
    """SIGKILL, by PID, what this test's ``flwr run`` left running; raise if anything survives."""
    deadline = time.monotonic() + timeout_s
    while left := _started_with(flwr_home):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes started with FLWR_HOME={flwr_home} survived SIGKILL: {left}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@pytest.mark.slow
def test_flwr_run_from_a_fresh_flwr_home(tmp_path: Path) -> None:
    """The README's ``flwr run`` line on a machine that never ran Flower: a fresh FLWR_HOME, the
    local SuperLink Flower starts by itself, as many SuperNodes as the README's
    ``--federation-config`` gives (here 3, one per merchant; Flower's default of 2 would leave
    the run waiting for a third). Tiny encoder, one round."""
    readme = _readme_flwr_command()
    merchants = ["shop-a", "shop-b", "shop-c"]
    write_merchants(tmp_path / "data", merchants)
    run_dir = tmp_path / "run"
    scenario = write_scenario(tmp_path / "tiny.toml", {
        **FAST, "num-server-rounds": 1, "evaluate": False, "tasks": "ctr,rating", "target-epsilon": 1000.0,
        "data-dir": str(tmp_path / "data"), "run-dir": str(run_dir), "node-wait-timeout-s": 30.0})
    argv = [a.replace("simulations/scenarios/reviews.toml", str(scenario)) for a in readme["argv"]]
    argv[argv.index("--federation-config") + 1] = f"num-supernodes={len(merchants)}"
    assert str(scenario) in argv and argv[:3] == ["flwr", "run", "."]
    argv[0] = str(Path(sys.executable).parent / "flwr")

    flwr_home = tmp_path / "flwr-home"
    http_port, control_port = free_ports(2)
    env = proc.subprocess_env({
        "FLWR_HOME": str(flwr_home),
        # Ports of this test's own: a local SuperLink already running on the default ports
        # (someone's `flwr run`) would otherwise take the run, with its own state.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        # `flwr` starts `flower-superlink` by name.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    })
    pyproject = (proc.REPO / "pyproject.toml").read_bytes()
    try:
        result = proc.run(argv, log_dir=tmp_path / "log", timeout_s=240, env=env)
    finally:
        _stop_started_with(flwr_home)
    assert result.returncode == 0, result.describe()
    assert f"({len(merchants)} simulated SuperNodes)" in result.output, result.describe()
    assert (flwr_home / "config.toml").is_file()  # Flower set its home up from nothing
    # A [tool.flwr.federations] table in pyproject would be "migrated" by `flwr run`: moved to
    # FLWR_HOME and commented out in the checkout's pyproject. The size travels on the command line.
    assert (proc.REPO / "pyproject.toml").read_bytes() == pyproject
    assert "federations" not in tomllib.loads(pyproject.decode())["tool"]["flwr"]

    assert (run_dir / SUMMARY_FILE).is_file(), result.describe()
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        trained = {row.merchant_id for row in ledger.rows() if row.round == 1 and row.status == "accepted"}
    assert trained == set(merchants), result.describe()
    manifest = json.loads((run_dir / MODEL_DIR / MANIFEST_FILE).read_text())
    assert manifest["heads"] == ["ctr", "rating"]  # the run's tasks, and only those
