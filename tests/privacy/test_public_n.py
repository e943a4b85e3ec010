"""Red team, finding 7: N is released exactly, so ε must hold for replace-one neighbours.

Every train and evaluate reply states N (``num-examples``, ``unit-count``), and q, steps and a
planned σ are functions of it: a dataset with one unit more or fewer is told apart by N alone,
so the only neighbours a guarantee can speak of are datasets of the same size with one unit
replaced. Before this, every ε (the merchant's Opacus PRV, the audit's PLD) was accounted for
add/remove neighbours: a ledger written that way audited PASSED (``build_run`` wrote exactly
such ledgers, and the audit's clean-run tests passed on them at 9cd1e54). Now the merchant
accounts replace-one (dp-accounting PLD), every spend says which relation it was accounted
for (``neighbours``), and the audit fails an add/remove row twice over: by the relation, and
by its ε, which under-reports the replace-one one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.audit import audit_node_state, audit_run
from shared.privacy import accounting
from shared.privacy.budget import PrivacyState
from shared.privacy.events import (
    NEIGHBOURS_ADD_REMOVE,
    NEIGHBOURS_REPLACE_ONE,
    NOISE_SOURCE,
    MechanismEvent,
    SpendEvent,
)
from shared.wire import PrivacyFacts
from simulations.cli import main
from tests.helpers.audit_runs import MECHANISMS, ROUNDS, build_run, tamper

DELTA = 1e-5


def test_replace_one_costs_more_than_add_remove_for_what_fedshop_releases() -> None:
    # A training history like a mid-sized merchant's (4 calls of 20 steps at q = 1/20, σ 1)
    # and the default evaluation release: replace-one is the larger, and the merchant reports it.
    update = MechanismEvent(noise_multiplier=1.0, sample_rate=0.05, steps=20, max_grad_norm=1.0)
    evaluation = MechanismEvent(noise_multiplier=10.0, sample_rate=1.0, steps=1, max_grad_norm=1.0)
    for history in ([update] * 4, [update, evaluation] * 4):
        replace = accounting.epsilon_pld(history, DELTA)
        add_remove = accounting.epsilon_pld(history, DELTA, neighbours=NEIGHBOURS_ADD_REMOVE)
        assert replace > 1.2 * add_remove
        assert accounting.epsilon(history, DELTA) == replace


def test_the_merchant_commits_and_reports_replace_one(tmp_path: Path) -> None:
    state = PrivacyState.open(tmp_path / "privacy.json", merchant_id="m1", target_epsilon=50.0, target_delta=DELTA)
    mechanism = MECHANISMS["m1"]
    planned = state.check(mechanism)
    reported = state.commit(mechanism, unit_count=200, round=1, model_version=0)
    assert reported == planned == accounting.epsilon_pld([mechanism], DELTA)
    assert reported > accounting.epsilon_pld([mechanism], DELTA, neighbours=NEIGHBOURS_ADD_REMOVE)
    entry = json.loads((tmp_path / "privacy.json").read_text())["entries"][0]["event"]
    assert entry["neighbours"] == NEIGHBOURS_REPLACE_ONE


def scenario_ledger_accounted_for_add_remove(tmp_path: Path) -> Path:
    """m1's rows as the version before this one wrote them: ε for add/remove neighbours."""
    run = build_run(tmp_path / "run")
    with tamper(run) as conn:
        for rnd in range(1, ROUNDS + 1):
            eps = accounting.epsilon_pld([MECHANISMS["m1"]] * rnd, DELTA, neighbours=NEIGHBOURS_ADD_REMOVE)
            conn.execute("UPDATE spend SET neighbours = 'add-remove', epsilon_reported = ? "
                         "WHERE merchant_id = 'm1' AND round = ?", (eps, rnd))
    return run


def test_a_ledger_accounted_for_add_remove_fails_the_audit(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    honest = build_run(tmp_path / "honest")
    assert audit_run(honest).passed

    report = audit_run(scenario_ledger_accounted_for_add_remove(tmp_path))

    assert {f.split(":")[0] for f in report.findings} == {"m1"}
    for rnd in range(1, ROUNDS + 1):
        assert any(f.startswith(f"m1: round {rnd}: ε accounted for 'add-remove' neighbours") for f in report.findings)
        assert any(f.startswith(f"m1: round {rnd}: recorded ε") and "under-reports" in f for f in report.findings)
    capsys.readouterr()
    assert main(["audit", str(tmp_path / "run")]) == 1
    assert "'add-remove' neighbours" in capsys.readouterr().out


def test_an_older_state_is_reaccounted_for_replace_one_and_its_audit_says_so(tmp_path: Path) -> None:
    # A version-3 state: entries without a relation, accounted for add/remove when recorded.
    path = tmp_path / "privacy.json"
    mechanism = MECHANISMS["m3"]
    spent = {k: v for k, v in SpendEvent.of(mechanism, unit_count=500, delta=DELTA, noise=NOISE_SOURCE)
             .to_dict().items() if k != "neighbours"}
    entries = [{"event": spent, "round": r, "run_id": "old", "model_version": r - 1, "recorded_at": float(r)}
               for r in (1, 2)]
    path.write_text(json.dumps({"version": 3, "merchant_id": "m3", "target_epsilon": 8.0, "target_delta": DELTA,
                                "accountant": "prv", "entries": entries, "reservations": []}))

    state = PrivacyState.open(path, merchant_id="m3", target_epsilon=8.0, target_delta=DELTA)
    assert [e.event.neighbours for e in state.entries] == [NEIGHBOURS_ADD_REMOVE] * 2
    # Its ε is the replace-one one of the whole history: more than it reported then.
    assert state.epsilon() == accounting.epsilon_pld([mechanism] * 2, DELTA)
    assert state.epsilon() > accounting.epsilon_pld([mechanism] * 2, DELTA, neighbours=NEIGHBOURS_ADD_REMOVE)

    result = audit_node_state(path)
    assert not result.passed
    assert any("accounted for 'add-remove' neighbours when recorded" in f for f in result.findings)
    assert result.epsilon_pld == state.epsilon()


def test_a_reply_that_does_not_say_its_relation_reads_as_add_remove() -> None:
    # A merchant on an older version sends no ``neighbours``: the server keeps what it then
    # accounted for (add/remove), and the audit fails it, instead of refusing the reply.
    spend = SpendEvent.of(MECHANISMS["m1"], unit_count=200, delta=DELTA, noise=NOISE_SOURCE)
    facts = PrivacyFacts(merchant_id="m1", status="ok", dp=True, event=spend, epsilon=1.0, epsilon_budget=8.0,
                         accountant="prv", model_version=0)
    record = facts.to_record()
    assert record["neighbours"] == NEIGHBOURS_REPLACE_ONE
    del record["neighbours"]
    assert PrivacyFacts.from_record(record).event.neighbours == NEIGHBOURS_ADD_REMOVE
