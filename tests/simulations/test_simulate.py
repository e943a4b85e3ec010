"""``fedshop simulate``: real Flower simulations (Ray backend) in subprocesses, end to end.

Each test starts the CLI in a new session (``tests.helpers.proc``) and, whatever happens,
kills what is left of that session, Ray included. Tiny encoder, three small merchants:
a run costs ~30-60 s, most of it Ray and interpreter start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, BertModel

from server import checkpoint as ckpt
from server.audit import audit_node_state
from server.ledger import PrivacyLedger, SpendRecord
from shared.config import RunConfig
from shared.model import (
    MANIFEST_FILE,
    ModelSpec,
    build_model,
    load_exported,
    load_tokenizer,
    set_trainable,
    trainable_names,
)
from shared.privacy.accounting import epsilon
from shared.privacy.events import NOISE_SOURCE, RELEASE_EVALUATION, RELEASE_UPDATE, MechanismEvent
from shared.run_files import CHECKPOINTS_DIR, CONFIG_FILE, LEDGER_FILE, MODEL_DIR, SUMMARY_FILE
from simulations import cli, local
from tests.helpers import proc
from tests.helpers.federation import FAST, ledger_rows, metrics_rows, resume, simulate, write_scenario
from tests.helpers.merchants import write_merchants

pytestmark = pytest.mark.slow

MERCHANTS = ["shop-a", "shop-b", "shop-c"]
# The two-round run evaluates at σ_eval 0.05 under a large budget: over the test merchants'
# handful of held-out units (~6 each) the default σ_eval = 10 leaves a metric undefined (left
# out of the round's metrics) in about 3 rounds in 10, σ_eval 0.5 in about 1 in 1000; and the
# ctr histogram's figures need each class's pooled total above 3 noise sds over its 20 bins
# (shared.eval_sums.ESTIMABLE_SDS). At σ 0.05 the pooled sd is 0.087 per bin, the floor 1.16
# and a class total's sd 0.39; the scarcer class, positives, totals 1.97 over the default
# test-fraction's held-out users (2.1 sds above the floor: AUC withheld in ~2 % of rounds) and
# 3.27 at TEST_FRACTION (5.4 sds). A smaller σ costs more accounting time than it saves
# (the PLD of a σ 0.02 release takes ~4× as long as one of σ 0.05).
# The run asserts that evaluation produces metrics, not what a budget allows.
EVAL_SIGMA = 0.05
TEST_FRACTION = 0.4
BIG_BUDGET = 1e6
# The test merchants' privacy unit is the user (14 users each): a training call samples them
# all (q = 1) for one step and costs ε ≈ 4.4 at FAST's σ 2 (replace-one: a Gaussian of
# sensitivity 2C; 4.38, two calls 6.6, three 8.4), so
# a test that needs three training calls of a merchant sets this budget; none tests refusal.
THREE_CALLS_BUDGET = 20.0


def updates(rows: list[SpendRecord]) -> list[SpendRecord]:
    """The ledger's update rows: one per training call the server recorded."""
    return [r for r in rows if r.event.release == RELEASE_UPDATE]


def evaluations(rows: list[SpendRecord]) -> list[SpendRecord]:
    return [r for r in rows if r.event.release == RELEASE_EVALUATION]


def entries_of(entries: list[dict], release: str = RELEASE_UPDATE) -> list[dict]:
    """A merchant's state entries of one release (state files of every version record it)."""
    return [e for e in entries if e["event"].get("release", RELEASE_UPDATE) == release]


def state_file(run_dir: Path, merchant: str) -> Path:
    """A merchant's privacy state: with its data (the run's data-dir), not in the run folder."""
    data_dir = Path(json.loads((run_dir / CONFIG_FILE).read_text())["data-dir"])
    return data_dir / merchant / ".fedshop" / "privacy-state.json"


def merchant_state(run_dir: Path, merchant: str) -> dict:
    return json.loads(state_file(run_dir, merchant).read_text())


def check_client_state_matches_ledger(run_dir: Path, merchants: list[str] = MERCHANTS) -> None:
    """Each merchant's own state file (kept by its node) reports the ε of its last ledger row.

    A call killed between its reservation and its commit leaves the reservation in the file,
    counted as spent from then on (its update may have left): the node's ε composes both."""
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        latest = ledger.latest_epsilon()
    assert sorted(latest) == merchants
    for merchant in merchants:
        state = merchant_state(run_dir, merchant)
        assert state["merchant_id"] == merchant
        events = [MechanismEvent.from_dict(e["event"]) for e in state["entries"]]
        events += [MechanismEvent.from_dict(r["mechanism"]) for r in state.get("reservations", [])]
        assert epsilon(events, state["target_delta"]) == pytest.approx(latest[merchant], rel=1e-9)


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, proc.Run]:
    """One 2-round run of 3 merchants, shared by the tests that read or continue it."""
    root = tmp_path_factory.mktemp("two-rounds")
    data = root / "data"
    write_merchants(data, MERCHANTS)
    settings = {**FAST, "data-dir": str(data), "eval-noise-multiplier": EVAL_SIGMA, "target-epsilon": BIG_BUDGET,
                "test-fraction": TEST_FRACTION}
    scenario = write_scenario(root / "scenario.toml", settings)
    result = simulate(scenario, root / "run", log_dir=root / "log", sets={"num-server-rounds": 2})
    return root / "run", result


def test_simulate_two_rounds_end_to_end(two_round_run: tuple[Path, proc.Run]) -> None:
    run_dir, result = two_round_run

    assert result.returncode == 0, result.describe()
    assert "fedshop run finished: 2 round(s)" in result.output
    # Written to a pipe, not a terminal: no colour codes (Flower's, in the driver and the Ray
    # workers; Ray's), no actor shutdown notices, and Flower's own round lines, which repeat
    # server.federation's, only with -v (shared.flower_log).
    assert "\x1b[" not in result.output and "configure_train" not in result.output
    assert "Manually terminating" not in result.output
    # --- the run ends with each merchant's own exact view of the model (client.held_out): a
    # line per merchant with its figures beside the constants, and none of it in the run folder
    table = result.stdout[result.stdout.index("each merchant's own view"):].splitlines()
    assert table[1].split()[:2] == ["merchant", "examples"], result.stdout
    assert [line.split()[0] for line in table[2:5]] == MERCHANTS and all(
        line.count("(") >= 3 for line in table[2:5]), result.stdout  # log-loss, rating RMSE, relevance RMSE
    assert not any("held_out" in f.read_text(errors="ignore") for f in run_dir.glob("*.json*"))

    # --- privacy ledger: 3 merchants x 2 rounds, all accepted, ε growing within budget; each
    # merchant's round holds its update's row, then its evaluation's (noised metrics, accounted)
    rows = ledger_rows(run_dir)
    trained, evaluated = updates(rows), evaluations(rows)
    assert len(trained) == 6 and len(evaluated) == 6 and len(rows) == 12
    assert Counter((r.round, r.merchant_id) for r in trained) == {(n, m): 1 for n in (1, 2) for m in MERCHANTS}
    assert Counter((r.round, r.merchant_id) for r in evaluated) == {(n, m): 1 for n in (1, 2) for m in MERCHANTS}
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        assert ledger.last_round() == 2
        run_id = ledger.meta()["run_id"]
    for r in trained:
        assert r.status == "accepted" and r.reason == ""
        assert 1 <= r.event.mechanism.steps <= 3  # at most max-local-steps
        assert r.model_version == r.round - 1
        mechanism = r.event.mechanism
        assert r.dp and mechanism.noise_multiplier == FAST["noise-multiplier"] and mechanism.max_grad_norm == 1.0
        assert r.event.delta == 1e-5
        assert r.event.noise == NOISE_SOURCE  # the merchant's noise source, carried with its update
        assert 0 < r.event.mechanism.sample_rate <= 1
        assert 0 < r.epsilon_reported <= r.epsilon_budget == BIG_BUDGET
        assert r.run_id == run_id
    for r in evaluated:  # a Gaussian release of the whole held-out set, on the round's new global model
        assert r.status == "accepted" and r.reason == "" and r.dp and r.run_id == run_id
        assert r.model_version == r.round
        mechanism = r.event.mechanism
        assert (mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps) == (EVAL_SIGMA, 1.0, 1)
        assert mechanism.max_grad_norm > 0 and r.event.delta == 1e-5 and r.event.noise == NOISE_SOURCE
        assert r.event.unit_count > 0 and r.event.expected_batch == r.event.unit_count
        assert 0 < r.epsilon_reported <= r.epsilon_budget == BIG_BUDGET
    for merchant in MERCHANTS:
        mine = [r for r in rows if r.merchant_id == merchant]
        # In the order recorded: update 1, evaluation 1, update 2, evaluation 2; ε grows with each.
        assert [(r.round, r.event.release) for r in mine] == [
            (n, release) for n in (1, 2) for release in (RELEASE_UPDATE, RELEASE_EVALUATION)]
        assert all(a.epsilon_reported < b.epsilon_reported for a, b in zip(mine, mine[1:], strict=False))
        assert len({r.node_id for r in mine}) == 1  # one virtual SuperNode per merchant
    assert len({r.node_id for r in rows}) == 3

    # --- merchants' own accountants agree with the ledger
    check_client_state_matches_ledger(run_dir)
    for merchant in MERCHANTS:
        entries = merchant_state(run_dir, merchant)["entries"]
        assert [e["round"] for e in entries_of(entries)] == [1, 2]
        assert [e["model_version"] for e in entries_of(entries)] == [0, 1]
        assert [(e["round"], e["model_version"]) for e in entries_of(entries, RELEASE_EVALUATION)] == [(1, 1), (2, 2)]
        # Every spend, in the order spent, is on the ledger with the same mechanism.
        mechanisms = [r.event.mechanism for r in rows if r.merchant_id == merchant]
        ledger_mech = [(m.noise_multiplier, m.sample_rate, m.steps, m.max_grad_norm) for m in mechanisms]
        assert [tuple(e["event"][k] for k in ("noise_multiplier", "sample_rate", "steps", "max_grad_norm"))
                for e in entries] == ledger_mech

    # --- checkpoints: the last one is round 2, holding exactly the trainable set
    assert ckpt.list_checkpoints(run_dir) == [1, 2]
    latest = ckpt.load_latest(run_dir)
    assert latest is not None and latest.round == 2
    assert latest.extra["run_id"] == run_id
    config = RunConfig.from_mapping(latest.config)
    assert config.encoder == "tiny" and config.num_server_rounds == 2 and config.run_dir == str(run_dir)
    spec = ModelSpec.from_config(config)
    model = build_model(spec)
    assert list(latest.parameters) == trainable_names(model)
    set_trainable(model, latest.parameters)  # names and shapes fit exactly
    assert all(np.all(np.isfinite(v)) for v in latest.parameters.values())

    # --- metrics.jsonl: one line per round
    log_rows = metrics_rows(run_dir)
    assert [row["round"] for row in log_rows] == [1, 2]
    model_bytes = sum(v.nbytes for v in latest.parameters.values())
    for row in log_rows:
        assert sorted(row["accepted"]) == MERCHANTS
        assert row["rejected"] == {} and row["refused"] == {} and row["failed"] == {}
        assert row["bytes_received"] == 3 * model_bytes > 0
        assert {"ctr_auc", "rating_rmse", "relevance_ndcg@10", "eval-loss"} <= set(row["eval_metrics"])
        assert all(v is None or np.isfinite(v) for v in row["eval_metrics"].values())
        # Each merchant's ε after the round: its evaluation row's, which follows its update.
        assert row["epsilon"] == {r.merchant_id: r.epsilon_reported for r in evaluated if r.round == row["round"]}

    # --- summary.json
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["rounds_completed"] == 2
    assert summary["stopped_because"] == "all rounds done"
    assert summary["final_eval"] == log_rows[-1]["eval_metrics"]
    assert {m: p["epsilon"] for m, p in summary["privacy"].items()} == {
        r.merchant_id: r.epsilon_reported for r in evaluated if r.round == 2}
    assert all(p["rounds"] == 2 and p["evaluations"] == 2 for p in summary["privacy"].values())

    # --- the privacy audit passes on this honest run with evaluations: the ledger (two releases
    # per merchant per round) and a merchant's own state against it
    assert cli.main(["audit", str(run_dir)]) == 0
    node = audit_node_state(state_file(run_dir, "shop-a"), run_dir=run_dir)
    assert node.passed, node.findings

    # --- the exported model is the last checkpoint's model (LoRA merged) and loads two ways
    exported, tokenizer, manifest = load_exported(run_dir / MODEL_DIR)
    assert manifest["trained_as"]["encoder"] == "tiny" and manifest["trained_as"]["trainable"] == "lora"
    batch = tokenizer(["warm scarf", ""], ["Premium red wool scarf", "Cheap blue mug"], padding=True,
                      return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        got = exported(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert tokenizer.vocab_size == load_tokenizer(spec).vocab_size

    plain = AutoModel.from_pretrained(str(run_dir / MODEL_DIR))
    assert isinstance(plain, BertModel)
    assert not any("lora" in name for name in plain.state_dict())
    plain.eval()
    with torch.no_grad():
        hidden = plain(**batch).last_hidden_state
        ours = exported.encoder(**batch).last_hidden_state
    torch.testing.assert_close(hidden, ours, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def second_run(two_round_run: tuple[Path, proc.Run], tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, Path, proc.Run]:
    """A second ``fedshop simulate``, of two rounds, on a copy of the two-round run's merchant
    folders (so the fixture's stay as that run left them), training private heads on cached
    encoder states. Shared by the budget-continuity and the private-heads tests: each would
    otherwise start Ray for a run of its own. (data dir, run dir, result)"""
    first_dir, first = two_round_run
    assert first.returncode == 0, first.describe()
    root = tmp_path_factory.mktemp("second-run")
    data = root / "data"
    shutil.copytree(json.loads((first_dir / CONFIG_FILE).read_text())["data-dir"], data)
    corpus = root / "public.txt"
    corpus.write_text("\n".join(f"catalogue item {i}\tproduct {i} in size {i % 9}" for i in range(120)))
    scenario = write_scenario(root / "scenario.toml", {**FAST, "data-dir": str(data), "target-epsilon": BIG_BUDGET,
                                                       "trainable": "heads", "pooling": "mean-l2", "batch-size": 64,
                                                       "precondition-corpus": str(corpus),
                                                       "keep-optimizer-state": True})
    # --no-exact-scores: no closing table of each merchant's exact scores (test_simulate_two_rounds... has it).
    return data, root / "run", simulate(scenario, root / "run", log_dir=root / "log", flags=["--no-exact-scores"])


def test_a_second_run_on_the_same_merchant_folders_continues_their_budget(
        two_round_run: tuple[Path, proc.Run], second_run: tuple[Path, Path, proc.Run], tmp_path: Path) -> None:
    """The budget lives with the data, not with the run folder (issue "Privacy end to end", finding
    8): a second ``fedshop simulate`` on the same folders starts from the first's ε, and
    ``train-local`` spends from the same file."""
    first_dir, first = two_round_run
    data, second_dir, second = second_run
    assert f"created the privacy state of {len(MERCHANTS)} merchant(s)" in first.output
    assert second.returncode == 0, second.describe()
    assert "created the privacy state" not in second.output
    assert "fedshop run finished" in second.output and "own view" not in second.output  # --no-exact-scores
    check_client_state_matches_ledger(second_dir)

    runs = (first_dir, second_dir)
    summaries = [json.loads((run / SUMMARY_FILE).read_text())["privacy"] for run in runs]
    run_ids = [ledger_rows(run)[0].run_id for run in runs]
    for merchant in MERCHANTS:
        assert 0 < summaries[0][merchant]["epsilon"] < summaries[1][merchant]["epsilon"]  # all trained again
        entries = merchant_state(second_dir, merchant)["entries"]
        # Two training calls and two evaluations in each run: one file for both runs.
        assert [e["run_id"] for e in entries_of(entries)] == [run_ids[0]] * 2 + [run_ids[1]] * 2
        assert [e["run_id"] for e in entries_of(entries, RELEASE_EVALUATION)] == [run_ids[0]] * 2 + [run_ids[1]] * 2
        assert not (second_dir / "nodes" / merchant / "privacy-state.json").exists()

    # train-local on one of them spends from the same file, on top of both runs. (On a copy of
    # the folder, state included: the private-heads test compares the original with its ledger.)
    shutil.copytree(data / "shop-a", tmp_path / "shop-a")
    config = RunConfig.from_mapping({**FAST, "data-dir": str(tmp_path), "target-epsilon": BIG_BUDGET})
    result = local.train_local([tmp_path / "shop-a"], config, out_dir=tmp_path / "local", epochs_progress=False)
    entries = json.loads((tmp_path / "shop-a" / ".fedshop" / "privacy-state.json").read_text())["entries"]
    assert len(entries_of(entries)) == 5 and entries[-1]["run_id"].startswith("train-local-")
    assert entries[-1]["event"]["release"] == RELEASE_UPDATE
    assert result.train.epsilon > summaries[1]["shop-a"]["epsilon"]


def test_simulate_private_heads_on_cached_encoder_states(second_run: tuple[Path, Path, proc.Run]) -> None:
    """trainable = heads through the Flower simulation engine: each virtual merchant encodes its
    records once (one cache file in its own state folder, reused in round 2), trains in the
    geometry of a public corpus and continues its optimizer's state from round 1 in round 2;
    only the heads travel, the spend is recorded, and the exported model keeps the mean-l2
    pooling. (The second run on the two-round run's folders: ``second_run``.)"""
    _, run_dir, result = second_run
    assert result.returncode == 0, result.describe()
    rows = updates(ledger_rows(run_dir))
    assert sorted((r.round, r.merchant_id) for r in rows) == [(n, m) for n in (1, 2) for m in MERCHANTS]
    assert all(r.status == "accepted" and 1 <= r.event.mechanism.steps <= 3 and r.epsilon_reported > 0 for r in rows)
    check_client_state_matches_ledger(run_dir)
    for merchant in MERCHANTS:
        node = run_dir / "nodes" / merchant
        cached = [p for p in (node / "features").iterdir() if p.is_file()]
        assert len(cached) == 1 and cached[0].name.startswith("features-")  # encoded once, both rounds
        kept = torch.load(node / "optimizer-state.pt", weights_only=True)
        steps = sum(r.event.mechanism.steps for r in rows if r.merchant_id == merchant)
        assert {int(s["step"]) for s in kept["state"]["state"].values()} == {steps}  # round 2 went on from 1
    # The public corpus: encoded into the folder of the first merchant a worker process served,
    # then fitted once for every merchant it serves (client.precondition keeps the fit).
    corpus = [p for m in MERCHANTS for p in (run_dir / "nodes" / m / "features" / "precondition-corpus").glob("*")]
    assert corpus and len(corpus) <= len(MERCHANTS) and len({p.name for p in corpus}) == 1
    latest = ckpt.load_latest(run_dir)
    assert latest is not None and sorted(latest.parameters) == sorted(
        f"heads.{task}.{kind}" for task in ("ctr", "rating", "relevance") for kind in ("weight", "bias"))
    exported, _, manifest = load_exported(run_dir / MODEL_DIR)
    assert manifest["pooling"] == "mean-l2" and exported.pooling == "mean-l2"


def test_resume_after_killing_the_whole_process_group(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_merchants(data, MERCHANTS)
    run_dir = tmp_path / "run"
    settings = {**FAST, "data-dir": str(data), "num-server-rounds": 3, "target-epsilon": THREE_CALLS_BUDGET}
    scenario = write_scenario(tmp_path / "scenario.toml", settings)
    latest_file = run_dir / CHECKPOINTS_DIR / ckpt.LATEST_FILE
    cmd = proc.fedshop_command("simulate", "--scenario", str(scenario), "--out", str(run_dir))

    with proc.session(cmd, log_dir=tmp_path / "log-killed") as first:
        sid = first.pid
        deadline = time.monotonic() + 240
        while not (latest_file.exists() and latest_file.read_text().strip() == "1"):
            if first.poll() is not None:
                pytest.fail(proc.read_output(tmp_path / "log-killed", first.returncode).describe())
            assert time.monotonic() < deadline, "round 1 was not checkpointed within 240 s"
            time.sleep(0.1)
        members = proc.session_members(sid)
        # The CLI plus Ray's head (GCS, raylet, ...) and workers: all in the run's session.
        assert sid in members and len(members) >= 4, members
        os.killpg(sid, signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 15
        while proc.session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = proc.session_members(sid)
        survivors = [pid for pid in members if proc.is_alive(pid)]
    # (leaving the ``with`` killed anything still there, by PID, before these asserts)
    assert left == [], f"processes of the killed run survived SIGKILL of its group: {left}"
    assert survivors == [], f"processes of the killed run survived: {survivors}"

    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        last_at_kill = ledger.last_round()
        assert last_at_kill in (1, 2)  # round 2 may have been recorded just before the kill
        run_id = ledger.meta()["run_id"]
    assert latest_file.read_text().strip() == "1"

    result = resume(run_dir, log_dir=tmp_path / "log-resumed")

    assert result.returncode == 0, result.describe()
    assert "resuming run" in result.output
    every = ledger_rows(run_dir)
    keys = [(r.round, r.merchant_id, r.event.release) for r in every]
    assert len(keys) == len(set(keys)), "a (round, merchant, release) was recorded twice"
    rows = updates(every)
    assert {r.round for r in rows} == {1, 2, 3}
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        assert ledger.last_round() == 3
        assert ledger.meta()["run_id"] == run_id  # the resumed run kept its id
    for n in (1, 2, 3):
        assert sorted(r.merchant_id for r in rows if r.round == n) == MERCHANTS
    for merchant in MERCHANTS:
        eps = [r.epsilon_reported for r in rows if r.merchant_id == merchant]
        assert eps == sorted(eps) and len(set(eps)) == 3  # one accountant across the restart
        spent = [r.epsilon_reported for r in every if r.merchant_id == merchant]
        assert spent == sorted(spent)  # evaluations included, in the order recorded
    assert all(r.status == "accepted" for r in rows)
    # The first resumed round trained on checkpoint 1, whatever the ledger had reached.
    assert {r.model_version for r in rows if r.round == last_at_kill + 1} == {1}
    check_client_state_matches_ledger(run_dir)

    rounds = [row["round"] for row in metrics_rows(run_dir)]
    assert len(rounds) == len(set(rounds)), f"metrics.jsonl repeats a round: {rounds}"
    assert rounds == sorted(rounds) and rounds[0] == 1 and rounds[-1] == 3
    latest = ckpt.load_latest(run_dir)
    assert latest is not None and latest.round == 3 and latest.extra["run_id"] == run_id
    assert (run_dir / MODEL_DIR / MANIFEST_FILE).is_file()


def test_resume_skips_a_round_recorded_but_not_checkpointed(two_round_run: tuple[Path, proc.Run],
                                                            tmp_path: Path) -> None:
    """A crash after round 2's ledger write but before its checkpoint: round 2's spend stays
    recorded, its aggregate is lost, and the next round trains on checkpoint 1 (and says so)."""
    finished, first = two_round_run
    assert first.returncode == 0, first.describe()
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    # The merchants' privacy states live in their folders: copy those too, so that this run's
    # round 3 is spent from a copy, not from the folders the fixture's run shares.
    config_file = run_dir / CONFIG_FILE
    saved = json.loads(config_file.read_text())
    shutil.copytree(saved["data-dir"], tmp_path / "data")
    config_file.write_text(json.dumps({**saved, "data-dir": str(tmp_path / "data")}))
    shutil.rmtree(run_dir / CHECKPOINTS_DIR / ckpt.round_dir_name(2))
    (run_dir / CHECKPOINTS_DIR / ckpt.LATEST_FILE).write_text("1\n")
    before = {r.merchant_id: r.epsilon_reported for r in ledger_rows(run_dir) if r.round == 2}  # after evaluation

    cmd = proc.fedshop_command("simulate", "--resume", str(run_dir),
                               "--set", "num-server-rounds=3", "--set", "merchants-per-round=1")
    result = proc.run(cmd, log_dir=tmp_path / "log", timeout_s=240)

    assert result.returncode == 0, result.describe()
    assert "round 2 is in the ledger but was not checkpointed" in result.output
    every = ledger_rows(run_dir)
    rows = updates(every)
    earlier = [(r.round, r.merchant_id) for r in rows if r.round < 3]
    assert earlier == [(n, m) for n in (1, 2) for m in MERCHANTS]
    (third,) = [r for r in rows if r.round == 3]
    assert third.status == "accepted"
    # The update was computed on the round-1 global model: round 2's aggregate never existed on disk.
    assert third.model_version == 1
    assert third.epsilon_reported > before[third.merchant_id]
    entries = merchant_state(run_dir, third.merchant_id)["entries"]
    assert [(e["round"], e["model_version"]) for e in entries_of(entries)] == [(1, 0), (2, 1), (3, 1)]
    # Round 3's aggregate (version 3) is evaluated by every merchant still in budget, sampled or not.
    assert sorted(r.merchant_id for r in evaluations(every) if r.round == 3) == MERCHANTS
    assert all(r.model_version == 3 for r in evaluations(every) if r.round == 3)
    check_client_state_matches_ledger(run_dir)
    assert [row["round"] for row in metrics_rows(run_dir)] == [1, 2, 3]
    assert ckpt.list_checkpoints(run_dir) == [1, 3]


def test_ctrl_c_stops_the_run_and_everything_it_started(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_merchants(data, MERCHANTS)
    run_dir = tmp_path / "run"
    scenario = write_scenario(tmp_path / "scenario.toml", {**FAST, "data-dir": str(data), "num-server-rounds": 20})
    cmd = proc.fedshop_command("simulate", "--scenario", str(scenario), "--out", str(run_dir))
    latest_file = run_dir / CHECKPOINTS_DIR / ckpt.LATEST_FILE

    with proc.session(cmd, log_dir=tmp_path / "log") as run:
        sid = run.pid
        deadline = time.monotonic() + 240
        while not latest_file.exists():
            if run.poll() is not None:
                pytest.fail(proc.read_output(tmp_path / "log", run.returncode).describe())
            assert time.monotonic() < deadline, "round 1 was not checkpointed within 240 s"
            time.sleep(0.1)
        members = proc.session_members(sid)
        assert len(members) >= 4, members  # the CLI plus Ray's processes
        # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(sid, signal.SIGINT)
        returncode = run.wait(timeout=60)
        deadline = time.monotonic() + 30
        while proc.session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = proc.session_members(sid)
    output = proc.read_output(tmp_path / "log", returncode)
    assert returncode == 130, output.describe()
    assert "resume with: fedshop simulate --resume" in output.stderr
    assert left == [], f"processes of the interrupted run are still alive: {left}"
    # What was committed before the interrupt is intact and resumable.
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        assert ledger.last_round() >= 1
    assert ckpt.load_latest(run_dir) is not None
