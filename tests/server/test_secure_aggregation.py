"""Secure aggregation (aggregation = secagg+): Flower's SecAgg+ protocol run from fedshop's
round loop, against ClientApps in this process (``tests.helpers.inprocess_grid``).

The stand-in merchants reply to a train instruction with a known update and real privacy
facts, behind fedshop's own ``client.secure_aggregation`` mod, so every check below is on
the protocol's real messages: what the server receives from one merchant, the unmasked
mean, dropouts, a round below the threshold, and a merchant that cheats.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client.secure_aggregation import secure_aggregation_mod
from server.federation import Federation, RoundFailedError
from server.ledger import PrivacyLedger
from shared.config import ConfigError, RunConfig
from shared.privacy.accounting import epsilon
from shared.privacy.events import NOISE_SOURCE, MechanismEvent, SpendEvent
from shared.run_files import LEDGER_FILE
from shared.wire import (
    ARRAYS,
    NUM_EXAMPLES,
    STATUS_OK,
    STATUS_REFUSED,
    STEPS,
    EvalReply,
    PrivacyFacts,
    TrainReply,
    record_to_params,
)
from tests.helpers.federation import metrics_rows
from tests.helpers.inprocess_grid import InProcessGrid

RANGE = 8.0  # secagg-clipping-range
LEVELS = 2 ** 22  # secagg-quantization-range
STEP = 2 * RANGE / LEVELS  # one quantisation level
RNG = np.random.default_rng(0)
PARAMS = {"w": RNG.normal(size=(40, 25)).astype(np.float32), "b": RNG.normal(size=(3,)).astype(np.float32)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Message built outside a running ServerApp needs the identity Flower's runtime sets.
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def facts(merchant: str, status: str = STATUS_OK) -> PrivacyFacts:
    """A merchant's facts as its accountant writes them: one call of three steps, or a refusal."""
    trained = status == STATUS_OK
    mechanism = MechanismEvent(noise_multiplier=1.0 if trained else 0.0, sample_rate=0.1 if trained else 0.0,
                               steps=3 if trained else 0, max_grad_norm=1.0)
    event = SpendEvent.of(mechanism, unit_count=200 if trained else 0, delta=1e-5,
                          noise=NOISE_SOURCE if trained else "")
    return PrivacyFacts(merchant_id=merchant, status=status, dp=True, event=event,
                        epsilon=epsilon([mechanism], 1e-5) if trained else 0.0, epsilon_budget=8.0, accountant="pld",
                        model_version=0, reason="" if trained else "budget: one more call would exceed it")


def merchant_app(name: str, update: dict[str, np.ndarray] | None, outer: tuple[Callable, ...] = ()) -> ClientApp:
    """A merchant that, asked to train, replies ``global + update`` (or refuses: update None),
    behind fedshop's secure-aggregation mod; ``outer``: mods around it (a node that dies, one
    that cheats)."""
    app = ClientApp(mods=[*outer, secure_aggregation_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sent = record_to_params(msg.content.array_records[ARRAYS])
        if update is None:
            reply = TrainReply(facts=facts(name, STATUS_REFUSED), params=None, metrics={})
        else:
            trained = {k: (v + update[k]).astype(v.dtype) for k, v in sent.items()}
            reply = TrainReply(facts=facts(name), params=trained, metrics={NUM_EXAMPLES: 200.0, STEPS: 3.0})
        return Message(reply.to_recorddict(), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(EvalReply(merchant_id=name, facts=None, metrics={}, reason="evaluation is off").to_recorddict(),
                       reply_to=msg)

    return app


def crash_at(stage: str) -> Callable:
    """A mod under which the node dies when the protocol reaches ``stage``."""
    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if record is not None and record.get(Key.STAGE) == stage:
            raise ConnectionError(f"node lost during {stage}")
        return call_next(msg, context)
    return mod


def tamper_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """A cheating node: adds 2**31 to every coordinate of the masked vector it sends."""
    reply = call_next(msg, context)
    record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if record is not None and Key.MASKED_PARAMETERS in record:
        record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(b) + 2 ** 31)
                                         for b in record[Key.MASKED_PARAMETERS]]
    return reply


def updates(n: int, scale: float = 0.5) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return {node: {k: (scale * rng.normal(size=v.shape)).astype(np.float64) for k, v in PARAMS.items()}
            for node in range(1, n + 1)}


def federation(tmp_path: Path, apps: dict[int, ClientApp], **keys: object) -> tuple[Federation, InProcessGrid]:
    config = RunConfig.from_mapping({
        "num-server-rounds": 1, "merchants-per-round": len(apps), "run-dir": str(tmp_path / "run"),
        "evaluate": False, "node-wait-timeout-s": 1.0, "round-timeout-s": 5.0, "aggregation": "secagg+",
        "secagg-clipping-range": RANGE, "secagg-quantization-range": LEVELS, **keys})
    grid = InProcessGrid(apps, {n: {} for n in apps}, config.to_mapping())
    return Federation(grid, config, PARAMS), grid  # type: ignore[arg-type]


def run_round(tmp_path: Path, apps: dict[int, ClientApp], **keys: object) -> tuple[dict, InProcessGrid, list]:
    fed, grid = federation(tmp_path, apps, **keys)
    try:
        result = fed.run()
    finally:
        fed.close()
    with PrivacyLedger(tmp_path / "run" / LEDGER_FILE) as ledger:
        rows = ledger.rows()
    return result.params, grid, rows


def failed_round(tmp_path: Path, apps: dict[int, ClientApp], match: str) -> list:
    """Run one round that must fail with ``match``; the ledger's rows after it."""
    fed, _ = federation(tmp_path, apps)
    with pytest.raises(RoundFailedError, match=match):
        try:
            fed.run()
        finally:
            fed.close()
    with PrivacyLedger(tmp_path / "run" / LEDGER_FILE) as ledger:
        return ledger.rows()


def masked_vectors(grid: InProcessGrid) -> dict[int, list[np.ndarray]]:
    """What each node's third-stage reply carried, as the server received it."""
    out = {}
    for node, sent, reply in grid.exchanges:
        record = sent.content.config_records.get(RECORD_KEY_CONFIGS)
        if record is not None and record.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
            out[node] = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][
                Key.MASKED_PARAMETERS]]
    return out


def test_the_server_gets_the_mean_update_and_from_each_merchant_only_a_masked_vector(tmp_path: Path) -> None:
    ups = updates(4)
    params, grid, rows = run_round(tmp_path, {n: merchant_app(f"shop-{n}", u) for n, u in ups.items()})

    # The model moved by the plain mean of the four updates, to within quantisation.
    for k, v in PARAMS.items():
        mean = np.mean([u[k] for u in ups.values()], axis=0)
        assert np.max(np.abs(params[k] - (v + mean))) <= 2 * STEP + 1e-6  # float32 storage adds ~1e-7
    assert [(r.merchant_id, r.status) for r in sorted(rows, key=lambda r: r.merchant_id)] == [
        (f"shop-{n}", "accepted") for n in ups]

    # What one merchant sent is independent of its update: uniform over [0, 2**32), no
    # correlation with the update (d = 1,003 coordinates: |r| < 0.12 is 3.8 sds of chance).
    vectors = masked_vectors(grid)
    assert sorted(vectors) == sorted(ups)
    for node, sent in vectors.items():
        flat = np.concatenate([np.ravel(a) for a in sent]).astype(np.float64)
        truth = np.concatenate([np.ravel(ups[node][k]) for k in PARAMS])
        # The first coordinate the mod adds is the vector's weight factor: compare the rest.
        flat = flat[-truth.size:]
        assert abs(np.corrcoef(flat, truth)[0, 1]) < 0.12
        assert 0.4 < flat.mean() / 2 ** 32 < 0.6 and flat.std() / 2 ** 32 > 0.25
    # No reply carried the update's arrays in the clear.
    assert all(ARRAYS not in reply.content.array_records for _, _, reply in grid.exchanges if not reply.has_error())
    (row,) = metrics_rows(tmp_path / "run")
    assert row["bytes_received"] > 0 and sorted(row["accepted"]) == sorted(f"shop-{n}" for n in ups)


def test_a_merchant_that_drops_after_sharing_its_keys_does_not_stop_the_round(tmp_path: Path) -> None:
    ups = updates(5)
    apps = {n: merchant_app(f"shop-{n}", u) for n, u in ups.items()}
    apps[3] = merchant_app("shop-3", ups[3], (crash_at(Stage.COLLECT_MASKED_VECTORS),))
    params, _, rows = run_round(tmp_path, apps)
    survivors = [n for n in ups if n != 3]
    for k, v in PARAMS.items():
        mean = np.mean([ups[n][k] for n in survivors], axis=0)
        assert np.max(np.abs(params[k] - (v + mean))) <= 2 * STEP + 1e-6
    assert sorted((r.merchant_id, r.status) for r in rows) == [(f"shop-{n}", "accepted") for n in survivors]
    (row,) = metrics_rows(tmp_path / "run")
    assert list(row["failed"]) == ["node-3"] and "masked update" in row["failed"]["node-3"]


def test_below_the_threshold_the_round_fails_and_the_ledger_says_why(tmp_path: Path) -> None:
    ups = updates(5)
    apps = {n: merchant_app(f"shop-{n}", u) for n, u in ups.items()}
    for n in (2, 4, 5):  # three of five drop in the third stage; two are left, the threshold is 3
        apps[n] = merchant_app(f"shop-{n}", ups[n], (crash_at(Stage.COLLECT_MASKED_VECTORS),))
    rows = failed_round(tmp_path, apps, "secure aggregation stopped")
    # The two that sent their masked update trained: their spend is recorded, their update unused.
    assert sorted(r.merchant_id for r in rows) == ["shop-1", "shop-3"]
    assert all(r.status == "rejected" and "not used" in r.reason and "threshold" in r.reason for r in rows)
    assert all(r.event.mechanism.steps == 3 for r in rows)


def test_a_refusing_merchant_keeps_its_place_with_weight_zero(tmp_path: Path) -> None:
    ups = updates(3)
    apps = {n: merchant_app(f"shop-{n}", u) for n, u in ups.items()}
    apps[2] = merchant_app("shop-2", None)
    params, _, rows = run_round(tmp_path, apps)
    for k, v in PARAMS.items():
        mean = np.mean([ups[n][k] for n in (1, 3)], axis=0)
        assert np.max(np.abs(params[k] - (v + mean))) <= 2 * STEP + 1e-6
    assert sorted((r.merchant_id, r.status) for r in rows) == [
        ("shop-1", "accepted"), ("shop-2", "refused"), ("shop-3", "accepted")]


def test_an_out_of_range_update_moves_the_mean_by_at_most_the_clipping_range(tmp_path: Path) -> None:
    ups = updates(4)
    wild = {k: np.full(v.shape, 1e6) for k, v in PARAMS.items()}  # far outside ±RANGE
    apps = {n: merchant_app(f"shop-{n}", u) for n, u in ups.items()}
    apps[4] = merchant_app("shop-4", wild)
    params, _, _ = run_round(tmp_path, apps)
    for k, v in PARAMS.items():
        honest = np.mean([ups[n][k] for n in (1, 2, 3)], axis=0)
        # The wild update counts as +RANGE in every coordinate: the mean of four.
        assert np.allclose(params[k] - v, (3 * honest + RANGE) / 4, atol=2 * STEP + 1e-6)


def test_a_merchant_that_cheats_on_its_masked_vector_is_caught_by_the_range_check(tmp_path: Path) -> None:
    ups = updates(3)
    apps = {n: merchant_app(f"shop-{n}", u) for n, u in ups.items()}
    apps[3] = merchant_app("shop-3", ups[3], (tamper_mod,))
    rows = failed_round(tmp_path, apps, "outside")
    assert len(rows) == 3 and all(r.status == "rejected" and "quantise honestly" in r.reason for r in rows)


def test_secagg_settings_are_checked_with_the_key_and_value_named() -> None:
    with pytest.raises(ConfigError, match="'secagg-threshold' = 1.5"):
        RunConfig.from_mapping({"aggregation": "secagg+", "secagg-threshold": 1.5})
    with pytest.raises(ConfigError, match="'aggregation'.*fedadam"):
        RunConfig.from_mapping({"aggregation": "secagg+", "strategy": "fedadam"})
    with pytest.raises(ConfigError, match="'aggregation'.*merchants-per-round"):
        RunConfig.from_mapping({"aggregation": "secagg+", "merchants-per-round": 1})
    with pytest.raises(ConfigError, match="must be one of"):
        RunConfig.from_mapping({"aggregation": "secagg"})


def test_real_merchants_train_privately_and_the_ledger_matches_their_own_records(tmp_path: Path) -> None:
    """fedshop's own ClientApp (tiny encoder, DP-SGD, its noised evaluation) on three merchant
    folders: every spend reaches the ledger through the masked round, and each merchant's
    state file holds the same history."""
    import client.app as client_app
    from shared.model import ModelSpec, build_model, get_trainable
    from shared.privacy.budget import PrivacyState
    from tests.helpers.merchants import write_merchants

    names = ["shop-a", "shop-b", "shop-c"]
    dirs = write_merchants(tmp_path / "data", names)
    config = RunConfig.from_mapping({
        "encoder": "tiny", "trainable": "heads", "tasks": "ctr,rating", "max-local-steps": 2, "batch-size": 16,
        "max-seq-len": 32, "noise-multiplier": 2.0, "eval-noise-multiplier": 0.5, "eval-min-units": 1,
        "num-server-rounds": 2, "merchants-per-round": 3, "run-dir": str(tmp_path / "run"),
        "node-wait-timeout-s": 1.0, "round-timeout-s": 60.0, "aggregation": "secagg+", "target-epsilon": 50.0})
    node_configs = {}
    for node, (name, folder) in enumerate(zip(names, dirs, strict=True), start=1):
        state = tmp_path / "state" / name
        PrivacyState.create(state / "privacy-state.json", merchant_id=name, target_epsilon=50.0, target_delta=1e-5)
        node_configs[node] = {"data-dir": str(folder), "merchant-id": name, "state-dir": str(state)}
    grid = InProcessGrid({n: client_app.app for n in node_configs}, node_configs, config.to_mapping())
    start = dict(get_trainable(build_model(ModelSpec.from_config(config))))
    fed = Federation(grid, config, start)  # type: ignore[arg-type]
    try:
        result = fed.run()
    finally:
        fed.close()
    assert result.rounds_completed == 2 and all(r.aggregated for r in result.reports)
    moved = {k: result.params[k] - v for k, v in start.items()}
    assert any(np.any(d != 0) for d in moved.values()) and all(np.all(np.isfinite(d)) for d in moved.values())
    with PrivacyLedger(tmp_path / "run" / LEDGER_FILE) as ledger:
        rows, latest = ledger.rows(), ledger.latest_epsilon()
    assert sorted((r.round, r.merchant_id, r.status) for r in rows if r.event.release == "update") == [
        (rnd, name, "accepted") for rnd in (1, 2) for name in names]
    for node, name in enumerate(names, start=1):
        raw = json.loads((Path(node_configs[node]["state-dir"]) / "privacy-state.json").read_text())
        events = [MechanismEvent.from_dict(e["event"]) for e in raw["entries"]]
        assert events == [r.event.mechanism for r in rows if r.merchant_id == name]
        assert epsilon(events, 1e-5) == pytest.approx(latest[name], rel=1e-9)
    # The evaluation (plain messages, the merchants' noised releases) ran after each masked round.
    (first, second) = metrics_rows(tmp_path / "run")
    assert "ctr_logloss" in second["eval_metrics"] and sorted(first["accepted"]) == names


def test_merchant_level_dp_clips_each_update_and_the_unmasked_mean_carries_the_planned_noise(tmp_path: Path) -> None:
    import sqlite3

    from server.audit import audit_run
    from shared.privacy import merchant_level

    ups = updates(5)  # norms ~16, far above the clipping norm 1
    params, _, rows = run_round(tmp_path, {n: merchant_app(f"shop-{n}", u) for n, u in ups.items()},
                                **{"merchant-epsilon": 8.0, "merchant-clip-norm": 1.0})
    config = RunConfig.from_mapping({"aggregation": "secagg+", "merchant-epsilon": 8.0, "num-server-rounds": 1})
    sigma = merchant_level.noise_multiplier(config)
    threshold = round(0.67 * 5)  # Flower's: round(secagg-threshold · merchants), at least 2

    def clipped(u: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in u.values()))
        return {k: a / norm for k, a in u.items()}

    residual = np.concatenate([np.ravel(params[k] - v - np.mean([clipped(u)[k] for u in ups.values()], axis=0))
                               for k, v in PARAMS.items()])
    # Five merchants each add N(0, σ²/t): the sum carries 5σ²/t ≥ σ², the mean its fifth.
    expected = sigma * np.sqrt(5 / threshold) / 5
    assert residual.std() == pytest.approx(expected, rel=0.15)
    assert abs(residual.mean()) < 4 * expected / np.sqrt(residual.size)

    with PrivacyLedger(tmp_path / "run" / LEDGER_FILE) as ledger:
        (row,) = ledger.merchant_level_rows()
        assert "merchant-level (ε = 8" in ledger.meta()["guarantee"]
    assert (row.round, row.contributors, row.noise_multiplier, row.clip_norm) == (1, 5, sigma, 1.0)
    assert 7.5 < row.epsilon <= 8.0  # one round, planned to fit
    assert all(r.status == "accepted" for r in rows)

    from server.report import format_summary, run_summary

    summary = run_summary(tmp_path / "run", stopped_because="all rounds done")
    assert summary["merchant_level"] == {"epsilon": row.epsilon, "delta": 1e-5, "noise_multiplier": sigma,
                                         "clip_norm": 1.0, "rounds": 1}
    assert f"merchant-level DP (secagg+): ε {row.epsilon:.3f}" in format_summary(summary)

    report = audit_run(tmp_path / "run")
    assert report.passed, report.findings
    assert report.merchant_level is not None and report.merchant_level.epsilon_derived == pytest.approx(row.epsilon)
    # A recorded ε lowered after the fact (the append-only triggers dropped by hand) fails the audit.
    conn = sqlite3.connect(tmp_path / "run" / LEDGER_FILE)
    conn.execute("DROP TRIGGER merchant_level_no_update")
    conn.execute("UPDATE merchant_level SET epsilon = 1.0")
    conn.commit()
    conn.close()
    report = audit_run(tmp_path / "run")
    assert not report.passed and any("merchant-level round 1: recorded ε 1.0000 is below" in f for f in report.findings)


def test_merchant_level_dp_never_unmasks_a_sum_with_fewer_noise_shares_than_the_threshold(tmp_path: Path) -> None:
    ups = updates(5)
    apps = {n: merchant_app(f"shop-{n}", u if n <= 2 else None) for n, u in ups.items()}  # 3 refuse
    fed, grid = federation(tmp_path, apps, **{"merchant-epsilon": 8.0})
    try:
        result = fed.run()  # refusals are no fault: the run goes on, its model unchanged
    finally:
        fed.close()
    assert not result.reports[0].aggregated and all(np.array_equal(result.params[k], v) for k, v in PARAMS.items())
    (row,) = metrics_rows(tmp_path / "run")
    assert all("merchant-level noise needs 3" in why for why in row["rejected"].values())
    with PrivacyLedger(tmp_path / "run" / LEDGER_FILE) as ledger:
        assert ledger.merchant_level_rows() == []
        rows = ledger.rows()
    assert sorted((r.merchant_id, r.status) for r in rows) == [
        ("shop-1", "rejected"), ("shop-2", "rejected"), ("shop-3", "refused"), ("shop-4", "refused"),
        ("shop-5", "refused")]
    # The server never asked for the shares that would unmask the sum.
    stages = {sent.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) for _, sent, _ in grid.exchanges
              if RECORD_KEY_CONFIGS in sent.content.config_records}
    assert Stage.UNMASK not in stages


def test_merchant_level_settings_need_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="'merchant-epsilon' = 8.0: needs aggregation = 'secagg\\+'"):
        RunConfig.from_mapping({"merchant-epsilon": 8.0})
    with pytest.raises(ConfigError, match="'merchant-clip-norm' = 0.0"):
        RunConfig.from_mapping({"aggregation": "secagg+", "merchant-epsilon": 8.0, "merchant-clip-norm": 0.0})
