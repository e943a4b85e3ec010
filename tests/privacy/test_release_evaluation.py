"""Accounted evaluation (issue "Privacy end to end", finding 6): a merchant's evaluation
metrics leave only as functions of noised, clipped per-unit sums (``client.release``), each
release is its own spend (release ``"evaluation"``) in the merchant's privacy state and the
server's ledger, and a merchant that does not evaluate, or cannot (too few held-out units, no
budget left), releases nothing and spends nothing.

Driven through the real ClientApp with Flower messages, as ``tests/client/test_app.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

import client.app as client_app
from client import release
from client.data import load_merchant
from client.evaluation import metrics_of, predict
from client.merchant import split_merchant
from server.ledger import PrivacyLedger
from server.ledger_record import spend_record
from shared import eval_sums
from shared import metrics as metrics_lib
from shared.config import ConfigError, RunConfig
from shared.model import ModelSpec, build_model, get_trainable, load_tokenizer
from shared.privacy.accounting import epsilon
from shared.privacy.budget import PrivacyState
from shared.privacy.events import MechanismEvent
from shared.run_files import LEDGER_FILE
from shared.tasks import Example
from shared.wire import (
    ARRAYS,
    CONFIG,
    METRICS,
    MODEL_VERSION,
    NUM_EXAMPLES,
    PRIVACY,
    RUN_ID,
    SERVER_ROUND,
    STATUS_OK,
    EvalReply,
    TrainReply,
    params_to_record,
)
from tests.helpers.merchants import write_merchant

BUDGET = 100.0  # room for several evaluations at the small σ_eval these tiny merchants need
CONFIG_ = RunConfig(encoder="tiny", max_local_steps=2, batch_size=16, max_seq_len=32, eval_max_examples=64,
                    noise_multiplier=1.0, target_epsilon=BUDGET)
NODE_ID = 7
# A handful of held-out units: the merchant's node config lowers the minimum and picks a σ_eval
# small enough that the noised sums stay readable (ε ≈ 10 per evaluation at δ = 1e-5).
SMALL = {"eval-min-units": 1, "eval-noise-multiplier": 0.5}


@pytest.fixture(scope="module")
def global_params() -> dict[str, np.ndarray]:
    return dict(get_trainable(build_model(ModelSpec.from_config(CONFIG_))))


@pytest.fixture
def merchant_dir(tmp_path: Path) -> Path:
    return write_merchant(tmp_path / "data", "shop-a", seed=1, interactions=120, judgments=32)


def state_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "privacy-state.json"


def context(merchant_dir: Path, tmp_path: Path, *, budget: float = BUDGET, **node: Any) -> Context:
    PrivacyState.create(state_file(tmp_path), merchant_id="shop-a", target_epsilon=budget,
                        target_delta=CONFIG_.target_delta)
    return Context(run_id=1, node_id=NODE_ID, state=RecordDict(), run_config=CONFIG_.to_mapping(),
                   node_config={"data-dir": str(merchant_dir), "merchant-id": "shop-a",
                                "state-dir": str(tmp_path / "state"), **node})


def message(message_type: str, params: dict[str, np.ndarray], *, server_round: int = 1) -> Message:
    content = RecordDict({ARRAYS: params_to_record(params),
                          CONFIG: ConfigRecord({SERVER_ROUND: server_round, MODEL_VERSION: server_round - 1,
                                                RUN_ID: "run-1"})})
    metadata = Metadata(run_id=1, message_id=f"msg-{message_type}-{server_round}", src_node_id=0,
                        dst_node_id=NODE_ID, reply_to_message_id="", group_id=str(server_round),
                        created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]


def evaluate(ctx: Context, params: dict[str, np.ndarray], *, server_round: int = 1) -> EvalReply:
    reply = client_app.app(message("evaluate", params, server_round=server_round), ctx)
    assert not reply.has_error(), reply.error
    return EvalReply.from_recorddict(reply.content)


def entries(tmp_path: Path) -> list[dict[str, Any]]:
    if not state_file(tmp_path).exists():
        return []
    return list(json.loads(state_file(tmp_path).read_text())["entries"])


def test_each_evaluation_is_noised_and_accounted_in_the_state_and_the_ledger(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray]
) -> None:
    ctx = context(merchant_dir, tmp_path, **SMALL)
    train = TrainReply.from_recorddict(client_app.app(message("train", global_params), ctx).content)
    assert train.facts.status == STATUS_OK

    first, second = evaluate(ctx, global_params, server_round=1), evaluate(ctx, global_params, server_round=2)

    # The same model on the same data: different noise, so different metrics (the count is public).
    assert first.metrics[NUM_EXAMPLES] == second.metrics[NUM_EXAMPLES] > 0
    shared = (first.metrics.keys() & second.metrics.keys()) - {NUM_EXAMPLES}
    assert shared and any(first.metrics[k] != second.metrics[k] for k in shared)
    # Every released sum carries fresh noise. (A derived ratio such as eval-loss may clamp to
    # 0 in both rounds when a small merchant's noised sum goes negative, so it is not compared.)
    first_sums, second_sums = eval_sums.from_metrics(first.metrics), eval_sums.from_metrics(second.metrics)
    assert first_sums is not None and second_sums is not None
    assert np.all(first_sums[0] != second_sums[0])
    # Each released figure comes with the spread the noise alone gives it (post-processing).
    assert first.metrics["eval-loss_sd"] > 0 and "num-examples_sd" not in first.metrics
    # The noised sums themselves leave too (the server pools them), with σ_eval·C_eval; the
    # metrics are those of the sums.
    parsed = eval_sums.from_metrics(first.metrics)
    assert parsed is not None and set(parsed[1]) == set(CONFIG_.task_names)
    assert parsed[2] == first.metrics[metrics_lib.SUM_NOISE_SD] == 0.5 * release.EVAL_CLIP_NORM
    derived = release.metrics_from_sums(parsed[0], parsed[1], parsed[2])  # the same estimability floor
    assert derived and {k: first.metrics[k] for k in derived} == pytest.approx(derived)
    # Each is its own spend: an evaluation event appended to the merchant's state ...
    assert [e["event"]["release"] for e in entries(tmp_path)] == ["update", "evaluation", "evaluation"]
    assert first.facts is not None and second.facts is not None
    event = first.facts.event
    assert (event.release, event.mechanism.sample_rate, event.mechanism.steps) == ("evaluation", 1.0, 1)
    assert (event.mechanism.noise_multiplier, event.mechanism.max_grad_norm) == (0.5, release.EVAL_CLIP_NORM)
    assert event.unit_count == first.metrics[NUM_EXAMPLES] and event.delta == CONFIG_.target_delta
    # ... and cumulative ε composes the training spend with both evaluations.
    mechanisms = [MechanismEvent.from_dict(e["event"]) for e in entries(tmp_path)]
    assert train.facts.epsilon < first.facts.epsilon < second.facts.epsilon
    assert second.facts.epsilon == pytest.approx(epsilon(mechanisms, CONFIG_.target_delta), rel=1e-9)
    # The server's ledger: one update row and one evaluation row for the merchant's round.
    with PrivacyLedger(tmp_path / "run" / LEDGER_FILE) as ledger:
        ledger.record_round([spend_record(train.facts, run_id="run-1", round=1, node_id=NODE_ID,
                                          status="accepted", reason="")])
        ledger.record_round([spend_record(first.facts, run_id="run-1", round=1, node_id=NODE_ID,
                                          status="accepted", reason="")])
        rows = ledger.rows()
    assert [(r.round, r.event.release) for r in rows] == [(1, "update"), (1, "evaluation")]
    assert rows[1].event == event and rows[1].epsilon_reported == first.facts.epsilon


def test_the_noise_has_the_spread_of_sigma_times_c(merchant_dir: Path, global_params: dict[str, np.ndarray]) -> None:
    """Seeded draws of the release's noised sums around the exact sums: per coordinate, standard
    deviation σ_eval·C_eval (generous bound), mean 0; and no unit's contribution exceeds C_eval."""
    test = split_merchant(load_merchant(merchant_dir), CONFIG_).test
    model = build_model(ModelSpec.from_config(CONFIG_))
    losses, preds = predict(model, test, load_tokenizer(ModelSpec.from_config(CONFIG_)), CONFIG_)
    rows = release.contributions(test, losses, preds, CONFIG_.task_names, unit=CONFIG_.privacy_unit)
    assert rows.shape[0] == release.unit_count(test, unit=CONFIG_.privacy_unit) > 0
    assert np.linalg.norm(rows, axis=1).max() <= release.EVAL_CLIP_NORM + 1e-9
    sigma = 3.0
    exact = rows.sum(axis=0)
    draws = np.stack([release.noised_sums(rows, sigma, seed=seed) for seed in range(400)]) - exact
    expected = sigma * release.EVAL_CLIP_NORM
    assert np.abs(draws.std(axis=0) / expected - 1).max() < 0.25
    assert np.abs(draws.mean(axis=0)).max() < 5 * expected / np.sqrt(len(draws))
    assert not np.array_equal(release.noised_sums(rows, sigma), release.noised_sums(rows, sigma))  # fresh


def test_metrics_from_exact_sums_are_the_exact_metrics(merchant_dir: Path) -> None:
    """With no noise the released statistics give back what shared.metrics computes where no
    unit is clipped (one-row units: interactions under ``privacy-unit = "record"``), the AUC up
    to its histogram's resolution. A query is one unit with many rows: clipping re-weights
    whole queries (never a query's own ratios), so relevance's means are query-weighted."""
    test = split_merchant(load_merchant(merchant_dir), CONFIG_).test
    spec = ModelSpec.from_config(CONFIG_)
    losses, preds = predict(build_model(spec), test, load_tokenizer(spec), CONFIG_)
    sums = release.contributions(test, losses, preds, CONFIG_.task_names, unit="record").sum(axis=0)
    got = release.metrics_from_sums(sums, CONFIG_.task_names)
    want = metrics_of(test, preds)
    for key in ("rating_rmse", "rating_mae"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["ctr_logloss"] == pytest.approx(want["ctr_logloss"], abs=1e-3)  # float32 BCE on logits
    # The AUC of the scores as binned (ties counted half): what the histogram can resolve.
    ctr = [i for i, e in enumerate(test) if e.task == "ctr"]
    binned = [release.score_bin(float(preds[i])) for i in ctr]
    labels = [test[i].target for i in ctr]
    assert got["ctr_auc"] == pytest.approx(metrics_lib.auc(labels, binned), abs=1e-9)
    assert got["ctr_ap"] == pytest.approx(metrics_lib.average_precision(labels, binned), abs=1e-9)
    # The baselines of one-row units are exact: the base rate's log-loss, the mean's RMSE.
    for key in ("ctr_logloss_baseline", "rating_rmse_baseline"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    # Precision, recall and F1 at the released threshold: the base rate, snapped to a bin edge.
    assert got["ctr_threshold"] == pytest.approx(
        release.bin_edge_probability(release.threshold_edge(float(np.mean(labels)))))
    assert abs(got["ctr_threshold"] - want["ctr_threshold"]) <= 0.1  # one bin: logit ±0.25 around the rate
    prf = metrics_lib.precision_recall_f1(labels, preds[ctr], threshold=got["ctr_threshold"])
    assert (got["ctr_precision"], got["ctr_recall"]) == pytest.approx((prf["precision"], prf["recall"]), abs=1e-9)
    for key in ("relevance_rmse", "relevance_ndcg@10", "relevance_mrr", "relevance_recall@10",
                "relevance_rmse_baseline", "relevance_ndcg@10_baseline", "relevance_mrr_baseline"):
        assert got[key] == pytest.approx(want[key], abs=0.2), key


def test_evaluate_false_releases_nothing_and_spends_nothing(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray]
) -> None:
    ctx = context(merchant_dir, tmp_path, **SMALL, evaluate=False)  # the merchant's own node config
    reply = client_app.app(message("evaluate", global_params), ctx)
    assert not reply.has_error()
    assert METRICS not in reply.content.metric_records and PRIVACY not in reply.content.config_records
    parsed = EvalReply.from_recorddict(reply.content)
    assert parsed.metrics == {} and parsed.facts is None and "off" in parsed.reason
    assert entries(tmp_path) == []


def test_a_too_small_held_out_set_is_refused(merchant_dir: Path, tmp_path: Path,
                                            global_params: dict[str, np.ndarray]) -> None:
    ctx = context(merchant_dir, tmp_path)  # default eval-min-units = 100: more than this merchant holds
    parsed = evaluate(ctx, global_params)
    assert parsed.metrics == {} and parsed.facts is None
    assert "eval-min-units = 100" in parsed.reason
    assert entries(tmp_path) == []


def test_a_budget_that_cannot_afford_the_evaluation_refuses_it(
    merchant_dir: Path, tmp_path: Path, global_params: dict[str, np.ndarray]
) -> None:
    ctx = context(merchant_dir, tmp_path, budget=1.0, **SMALL)  # σ_eval 0.5 costs ε ≈ 10
    parsed = evaluate(ctx, global_params)
    assert parsed.metrics == {} and parsed.facts is None and "budget" in parsed.reason
    assert entries(tmp_path) == []
    assert json.loads(state_file(tmp_path).read_text()).get("reservations", []) == []


def test_the_merchants_node_config_wins_over_the_run_config() -> None:
    run = CONFIG_.replace(evaluate=False, eval_noise_multiplier=20.0, eval_min_units=50)
    assert release.EvalSettings.resolve({}, run) == release.EvalSettings(evaluate=False, noise_multiplier=20.0,
                                                                         min_units=50)
    node = {"evaluate": "true", "eval-noise-multiplier": 4, "eval-min-units": 200}
    assert release.EvalSettings.resolve(node, run) == release.EvalSettings(evaluate=True, noise_multiplier=4.0,
                                                                           min_units=200)
    with pytest.raises(ConfigError, match="eval-noise-multiplier"):
        release.EvalSettings.resolve({"eval-noise-multiplier": 0}, run)
    # The default: one evaluation costs a small ε at δ = 1e-5 (docs/privacy.md quotes it).
    default = release.EvalSettings.resolve({}, RunConfig()).mechanism
    assert epsilon([default], 1e-5) == pytest.approx(0.73, abs=0.01)  # replace-one: sensitivity 2 C_eval


# ----------------------------------------------------------------------------- baselines, AP, threshold
# Hand-made held-out sets fed straight to ``contributions`` (losses and predictions given): no model.


def interaction(i: int, *, clicked: bool, stars: float | None = None) -> list[Example]:
    """One interaction record: its ctr example, and its rating example when it has stars."""
    common = dict(context=f"user {i}", product=f"item {i}", group=f"u{i}", product_id=f"p{i}", record=f"r{i}")
    rows = [Example(task="ctr", target=float(clicked), **common)]  # type: ignore[arg-type]
    if stars is not None:
        rows.append(Example(task="rating", target=stars, **common))  # type: ignore[arg-type]
    return rows


def judgments(query: str, grades: list[int]) -> list[Example]:
    return [Example(task="relevance", context=query, product=f"{query} {j}", target=float(g), group=query,
                    product_id=f"{query}-{j}") for j, g in enumerate(grades)]


def test_a_one_record_unit_is_never_clipped_and_the_worst_fills_the_bound() -> None:
    """One record (here a click with its rating) fits in C_eval after the scale: every one-record
    unit keeps the same weight (its count coordinate is the scale), which clipping would break
    for the worst record if a row's bound (``TASK_STATISTICS``) were too small; that worst record (loss
    at the clip, the largest error, the top star) reaches norm C_eval exactly."""
    examples = [*interaction(0, clicked=True, stars=5.0), *interaction(1, clicked=False, stars=3.0),
                *interaction(2, clicked=True, stars=1.0)]
    tasks = ("ctr", "rating")
    losses = np.array([99.0, 99.0, 0.1, 0.2, 0.3, 0.0])  # the first record's loss past the clip
    preds = np.array([0.01, 1.0, 0.4, 3.0, 0.9, 1.0])  # its rating: predicted 1 star for 5
    rows = release.contributions(examples, losses, preds, tasks, unit="record")
    names = release.layout(tasks)
    scale = release.unit_scale(tasks)
    assert scale == pytest.approx(1 / 3)  # ctr's 3 + rating's 6 coordinates at most 1
    assert rows[:, names.index("ctr/count")] == pytest.approx([scale] * 3, rel=1e-12)
    assert rows[:, names.index("rating/count")] == pytest.approx([scale] * 3, rel=1e-12)
    norms = np.linalg.norm(rows, axis=1)
    assert norms[0] == pytest.approx(release.EVAL_CLIP_NORM, rel=1e-12) and (norms[1:] < norms[0]).all()
    # The rating's new coordinates: the target over the star range, and its square.
    assert rows[0, names.index("rating/target")] == rows[0, names.index("rating/target_sq")] == pytest.approx(scale)
    assert rows[1, names.index("rating/target")] == pytest.approx(0.5 * scale)
    assert rows[1, names.index("rating/target_sq")] == pytest.approx(0.25 * scale)


def test_one_querys_block_fits_its_bound() -> None:
    """The per-query block (count, NDCG, MRR, recall, and their random-order expectations) has
    six coordinates in [0, 1]: norm at most ``QUERY_BLOCK_BOUND``. Ten exact matches and one
    irrelevant candidate, ranked perfectly, come close, well past the four-coordinate bound 2."""
    block = release.query_block([3.0] * 10 + [0.0], np.linspace(1.0, 0.0, 11))
    assert block[:4].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert 2.0 < np.linalg.norm(block) <= release.QUERY_BLOCK_BOUND
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 15))
        grades = rng.integers(0, 4, n).astype(float).tolist()
        b = release.query_block(grades, rng.random(n))
        assert ((0.0 <= b) & (b <= 1.0)).all() and np.linalg.norm(b) <= release.QUERY_BLOCK_BOUND + 1e-12


def test_released_baselines_equal_the_exact_ones_without_noise() -> None:
    """With the noise off (the exact sums) or negligible (σ = 1e-9), every released baseline is
    the exact one ``shared.metrics.task_metrics`` computes, and so are the metrics where no unit
    is clipped (every unit here is a record or a small query, under its bound)."""
    examples = [e for i in range(40) for e in interaction(i, clicked=i % 5 != 0, stars=float(1 + i % 5))]
    examples += judgments("lamp", [0, 1]) + judgments("desk", [0, 2]) + judgments("shoes", [2, 2])
    rng = np.random.default_rng(3)
    preds = np.array([float(rng.random()) if e.task == "ctr" else e.target + 0.5 * float(rng.random())
                      for e in examples])
    losses = np.zeros(len(examples))
    tasks = ("ctr", "rating", "relevance")
    rows = release.contributions(examples, losses, preds, tasks, unit="record")
    assert np.linalg.norm(rows, axis=1).max() < release.EVAL_CLIP_NORM  # nothing clipped
    want = metrics_of(examples, preds)
    for sums in (rows.sum(axis=0), release.noised_sums(rows, 1e-9, seed=0)):
        got = release.metrics_from_sums(sums, tasks)
        for key in ("ctr_logloss_baseline", "rating_rmse_baseline", "relevance_rmse_baseline",
                    "relevance_ndcg@10_baseline", "relevance_mrr_baseline", "relevance_ndcg@10", "relevance_mrr",
                    "relevance_recall@10", "rating_rmse", "relevance_rmse"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # By hand: base rate 0.8; stars 1..5 evenly: standard deviation sqrt(2); grades 0, 1, 0, 2, 2, 2.
    got = release.metrics_from_sums(rows.sum(axis=0), tasks)
    assert got["ctr_logloss_baseline"] == pytest.approx(-(0.8 * np.log(0.8) + 0.2 * np.log(0.2)))
    assert got["rating_rmse_baseline"] == pytest.approx(np.sqrt(2.0))
    assert got["relevance_rmse_baseline"] == pytest.approx(np.std([0, 1, 0, 2, 2, 2]))
    # Ranking counts lamp and desk, not shoes (one grade): their random orders, by hand.
    assert got["relevance_ndcg@10_baseline"] == pytest.approx((1 + 1 / np.log2(3)) / 2)  # both: half the time first
    assert got["relevance_mrr_baseline"] == pytest.approx(0.75)


def test_a_single_grade_query_does_not_count() -> None:
    """A query whose candidates share one grade scores NDCG = MRR = 1 whatever the model does:
    its block is all zeros, and the ranking metrics are the informative query's alone."""
    examples = judgments("lamp", [0, 1, 2, 3]) + judgments("shoes", [2, 2, 2]) + judgments("hat", [1])
    preds = np.array([3.0, 2.0, 1.0, 0.0, 0.0, 1.0, 2.0, 0.0])  # lamp ranked worst first
    rows = release.contributions(examples, np.zeros(8), preds, ("relevance",), unit="record")
    names = release.layout(("relevance",))
    block = [names.index(f"relevance/{c}") for c in ("queries", "ndcg", "mrr", "recall", "ndcg_random",
                                                      "mrr_random")]
    assert rows[0, block].min() > 0 and not rows[1:, block].any()
    got = release.metrics_from_sums(rows.sum(axis=0), ("relevance",))
    lamp = [0.0, 1.0, 2.0, 3.0]
    assert got["relevance_ndcg@10"] == pytest.approx(metrics_lib.ndcg_at_k([0] * 4, lamp, preds[:4]))
    assert got["relevance_mrr"] == pytest.approx(1 / 2)  # grade 0 first, grade 1 second
    assert got["relevance_ndcg@10_baseline"] == pytest.approx(metrics_lib.random_order_ndcg(lamp))
    assert got["relevance_mrr_baseline"] == pytest.approx(metrics_lib.random_order_mrr(lamp))
    assert got["relevance_ndcg@10"] < got["relevance_ndcg@10_baseline"]  # worse than chance: visible now
    exact = metrics_lib.task_metrics("relevance", targets=[e.target for e in examples], preds=preds,
                                     groups=[e.group for e in examples])
    for key in ("relevance_ndcg@10", "relevance_mrr", "relevance_ndcg@10_baseline", "relevance_mrr_baseline"):
        assert got[key] == pytest.approx(exact[key]), key


def test_average_precision_from_the_histogram() -> None:
    """Every score in its own bin: the histogram's AP is the exact AP. Scores sharing bins: the
    AP of the binned scores, a bin's items admitted together (``shared.metrics`` ties)."""
    labels = [1, 0, 1, 1, 0, 0, 1, 0]
    logits = [4.2, 3.3, 2.1, 0.7, -0.4, -1.8, -2.6, -4.1]  # distinct bins of width 0.5
    examples = [e for i, y in enumerate(labels) for e in interaction(i, clicked=bool(y))]
    preds = 1 / (1 + np.exp(-np.array(logits)))
    assert len({release.score_bin(float(p)) for p in preds}) == len(preds)
    rows = release.contributions(examples, np.zeros(8), preds, ("ctr",), unit="record")
    got = release.metrics_from_sums(rows.sum(axis=0), ("ctr",))
    assert got["ctr_ap"] == pytest.approx(metrics_lib.average_precision(labels, preds), abs=1e-12)
    # (1 + 2/3 + 3/4 + 4/7) / 4: a hand check of the value both give.
    assert got["ctr_ap"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 7) / 4)
    assert got["ctr_ap"] == pytest.approx(metrics_of(examples, preds)["ctr_ap"], abs=1e-12)

    tied = 1 / (1 + np.exp(-np.array([4.2, 4.3, 2.1, 2.2, -0.4, -1.8, -2.6, -2.7])))  # pairs share bins
    rows = release.contributions(examples, np.zeros(8), tied, ("ctr",), unit="record")
    got = release.metrics_from_sums(rows.sum(axis=0), ("ctr",))
    binned = [release.score_bin(float(p)) for p in tied]
    assert got["ctr_ap"] == pytest.approx(metrics_lib.average_precision(labels, binned), abs=1e-12)
    assert got["ctr_ap"] != pytest.approx(metrics_lib.average_precision(labels, tied))  # the ties cost


def test_precision_recall_and_f1_are_at_the_snapped_base_rate() -> None:
    """Base rate 0.82, logit 1.516: the nearest bin edge is logit 1.5 (p = 0.8176), released as
    ``ctr_threshold``; precision, recall and F1 are those of ``prob >= threshold``, not of 0.5,
    where every prediction here is positive (recall 1, which would say nothing)."""
    rng = np.random.default_rng(5)
    labels = [int(i % 50 < 41) for i in range(100)]  # 82 positives
    examples = [e for i, y in enumerate(labels) for e in interaction(i, clicked=bool(y))]
    preds = np.clip(np.where(np.array(labels) == 1, 0.85, 0.75) + rng.normal(0, 0.08, 100), 0.55, 0.99)
    rows = release.contributions(examples, np.zeros(100), preds, ("ctr",), unit="record")
    got = release.metrics_from_sums(rows.sum(axis=0), ("ctr",))
    assert release.threshold_edge(0.82) == 13  # (1.516 + 5) / 0.5 = 13.03
    assert got["ctr_threshold"] == pytest.approx(1 / (1 + np.exp(-1.5)))
    prf = metrics_lib.precision_recall_f1(labels, preds, threshold=got["ctr_threshold"])
    assert (got["ctr_precision"], got["ctr_recall"], got["ctr_f1"]) == pytest.approx(
        (prf["precision"], prf["recall"], prf["f1"]), abs=1e-12)
    assert metrics_lib.precision_recall_f1(labels, preds)["recall"] == 1.0 > got["ctr_recall"]
    # The exact (non-private) path thresholds at the unsnapped base rate.
    assert metrics_of(examples, preds)["ctr_threshold"] == pytest.approx(0.82)
    # Snapping stays inside the histogram's interior edges, whatever the noise did to the rate.
    assert release.threshold_edge(0.0) == 1 and release.threshold_edge(1.0) == release.HIST_BINS - 1
    assert release.threshold_edge(0.5) == release.HIST_BINS // 2


# ----------------------------------------------------------------------------- noise scales

TASKS = ("ctr", "rating", "relevance")


def synthetic_sums(units: int, tasks: tuple[str, ...] = TASKS) -> np.ndarray:
    """Exact sums of ``units`` one-record units (and ``units // 4`` informative queries) with
    round figures: ctr loss 0.1·LOSS_CLIP per example, base rate 0.2 with positives scoring
    higher, rating and relevance errors and targets of fixed means; scaled as ``contributions``."""
    names = release.layout(tasks)
    index = {n: i for i, n in enumerate(names)}
    s = np.zeros(len(names))
    n, scale = float(units), release.unit_scale(tasks)
    for t in tasks:
        s[index[f"{t}/count"]], s[index[f"{t}/loss"]] = n, 0.1 * n
    if "ctr" in tasks:
        weights = np.arange(1, release.HIST_BINS + 1, dtype=float)
        for i in range(release.HIST_BINS):
            s[index[f"ctr/pos{i}"]] = 0.2 * n * weights[i] / weights.sum()
            s[index[f"ctr/neg{i}"]] = 0.8 * n * weights[::-1][i] / weights.sum()
    if "rating" in tasks:
        for c, v in (("sq", 0.04), ("abs", 0.15), ("target", 0.7), ("target_sq", 0.55)):
            s[index[f"rating/{c}"]] = v * n
    if "relevance" in tasks:
        for c, v in (("sq", 0.1), ("target", 0.4), ("target_sq", 0.25)):
            s[index[f"relevance/{c}"]] = v * n
        for c, v in zip(release.QUERY_STATISTICS, (1.0, 0.7, 0.6, 0.8, 0.5, 0.4), strict=True):
            s[index[f"relevance/{c}"]] = v * (units // 4)
    return s * scale


def test_noise_scales_vanish_without_noise_and_grow_with_it() -> None:
    """Every released figure gets ``<key>_sd``; with a negligible σ it is ~0, and on the same
    standard normal draws (one seed) it grows with σ, about in proportion where the figures are
    smooth ratios of large counts."""
    sums = synthetic_sums(2000)
    point = release.metrics_from_sums(sums, TASKS)
    assert release.noise_scales(sums, TASKS, 0.01, seed=3).keys() == {
        metrics_lib.noise_scale_key(k) for k in point}
    assert not any(metrics_lib.is_noise_scale(k) for k in point)  # no figure is itself a scale
    tiny = release.noise_scales(sums, TASKS, 1e-9, seed=3)
    assert set(tiny) == {metrics_lib.noise_scale_key(k) for k in point}
    assert max(tiny.values()) < 1e-6
    sigmas = (1e-9, 0.01, 0.1, 1.0)
    scales = [release.noise_scales(sums, TASKS, sigma, seed=3) for sigma in sigmas]
    for key in scales[0]:
        values = [s[key] for s in scales]
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:], strict=False)), (key, values)
    for key in ("eval-loss_sd", "ctr_logloss_sd", "ctr_auc_sd", "rating_rmse_sd", "relevance_ndcg@10_sd",
                "rating_rmse_baseline_sd"):
        assert scales[1][key] > 0 and scales[2][key] == pytest.approx(10 * scales[1][key], rel=0.05), key
    # A fresh generator unless seeded: different draws, the same spread.
    assert release.noise_scales(sums, TASKS, 0.1, seed=3) == scales[2]
    assert release.noise_scales(sums, TASKS, 0.1) != release.noise_scales(sums, TASKS, 0.1)


def test_a_noise_scale_matches_the_analytic_one() -> None:
    """ctr_logloss = LOSS_CLIP·L/C of the noised loss sum L and count C, each with noise sd σ
    (C_eval = 1): to first order its sd is LOSS_CLIP·σ·sqrt(1 + (L/C)²)/C (the delta method),
    and with ctr alone eval-loss is the same ratio."""
    sums = synthetic_sums(3000, ("ctr",))
    names = release.layout(("ctr",))
    count, loss = sums[names.index("ctr/count")], sums[names.index("ctr/loss")]
    sigma = 2.0
    analytic = release.LOSS_CLIP * sigma * release.EVAL_CLIP_NORM * np.sqrt(1 + (loss / count) ** 2) / count
    got = release.noise_scales(sums, ("ctr",), sigma, draws=2000, seed=11)
    assert got["ctr_logloss_sd"] == pytest.approx(analytic, rel=0.08)
    assert got["eval-loss_sd"] == pytest.approx(got["ctr_logloss_sd"], rel=1e-9)
    # The bootstrap is the spread of fresh releases around the released point: compare with the
    # spread of real releases (noised_sums of the same exact sums), a different generator.
    rows = sums[None, :]
    releases = [release.metrics_from_sums(release.noised_sums(rows, sigma, seed=s), ("ctr",))["ctr_logloss"]
                for s in range(2000)]
    assert got["ctr_logloss_sd"] == pytest.approx(float(np.std(releases, ddof=1)), rel=0.08)


def test_a_figure_the_noise_often_leaves_undefined_gets_no_noise_scale() -> None:
    """A figure undefined (left out) in more than MAX_UNDEFINED_SHARE of the draws has no
    ``_sd``: here rating's noised count is ≤ 0 in about Φ(−0.5) ≈ 31 % of them."""
    sums = synthetic_sums(2000, ("ctr", "rating"))
    names = release.layout(("ctr", "rating"))
    sums[names.index("rating/count")] = 0.5
    point = release.metrics_from_sums(sums, ("ctr", "rating"))
    got = release.noise_scales(sums, ("ctr", "rating"), 1.0, seed=2)
    assert "rating_rmse" in point and "rating_mae" in point
    assert "rating_rmse_sd" not in got and "rating_mae_sd" not in got
    assert "ctr_logloss_sd" in got and "eval-loss_sd" in got
    assert release.noise_scales(np.zeros(len(names)) - 5.0, ("ctr", "rating"), 1.0, seed=2) == {}
    with pytest.raises(ValueError, match="draws"):
        release.noise_scales(sums, ("ctr", "rating"), 1.0, draws=1)
