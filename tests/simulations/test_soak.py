"""Issue #24: a soak with faults, nothing lost (``benchmarks/soak.py``, here at its small scale).

A TLS deployment with node authentication on loopback, three merchants and a fourth that joins
during the run, three rounds:

- round 1: shop-b's update is malformed (it trained and spent, then sent an array of the wrong
  shape) and is rejected; shop-d's node starts while the round runs;
- after round 1's checkpoint (after round 2's, if round 2's messages had already gone out) the
  SuperLink's machine "crashes" (SuperLink, nginx, SuperExec and ServerApp SIGKILLed, with
  nothing of the next round sent); its start script is run again on the same ``--database``,
  and the run submitted again with ``resume = true`` (it waits for all four merchants);
- round 3: shop-c's update is over ``max-update-norm`` and rejected; the late joiner is accepted.

The driver's checks (every accepted update in exactly one checkpointed round; each merchant's
ledger rows equal to its own state's entries; ``fedshop audit`` of the run and of each merchant's
state passing; no round past its timeout; the run finished) are asserted one by one, so a failure
names the check and shows its detail.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.benchmarks.conftest import load_benchmark

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soaked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    soak = load_benchmark("soak")
    return soak.soak(soak.SMALL, tmp_path_factory.mktemp("soak"))


@pytest.mark.parametrize("check", [
    "run_finished",
    "accepted_updates_each_in_one_checkpointed_round",
    "ledger_rows_equal_each_merchants_state_entries",
    "fedshop_audit_passes",
    "no_round_past_its_timeout",
    "faults_did_what_they_should",
])
def test_soak_check_passes(soaked: dict[str, Any], check: str) -> None:
    verdict = soaked["checks"][check]
    assert verdict["passed"], json.dumps(verdict["detail"], indent=1)


def test_each_fault_shows_in_its_round(soaked: dict[str, Any]) -> None:
    rounds = {r["round"]: r for r in soaked["rounds"]}
    assert sorted(rounds) == [1, 2, 3] and soaked["rounds_completed"] == 3
    # round 1: the malformed update rejected, the late joiner not yet there
    assert rounds[1]["accepted"] == ["shop-a", "shop-c"]
    assert list(rounds[1]["rejected"]) == ["shop-b"] and "has shape" in rounds[1]["rejected"]["shop-b"]
    # round 2: everyone in (the late joiner too, if it was connected as the round began)
    assert set(rounds[2]["accepted"]) - {"shop-d"} == {"shop-a", "shop-b", "shop-c"} and not rounds[2]["rejected"]
    # round 3, on the restarted SuperLink: the over-norm update rejected, the late joiner in
    assert rounds[3]["accepted"] == ["shop-a", "shop-b", "shop-d"]
    assert list(rounds[3]["rejected"]) == ["shop-c"]
    assert "exceeds max-update-norm" in rounds[3]["rejected"]["shop-c"]
    assert all(not r["refused"] and not r["failed"] for r in rounds.values())
    assert (soaked["refusals"], soaked["rejections"]) == (0, 2)

    events = [e["event"] for e in soaked["events"]]
    crash = next(i for i, e in enumerate(events) if e.startswith("SuperLink host crash"))
    assert events[crash - 1].startswith("ServerApp stopped at a round boundary")
    assert soaked["events"][crash]["round_checkpointed"] in (1, 2)
    assert events[crash + 1] == "SuperLink restarted (same --database)"
    # the first `flwr run --stream` lost its SuperLink and ended with an error; the resumed one did not
    first, second = soaked["submissions"]
    assert first["exit"] not in (0, None) and second["exit"] == 0, soaked["submissions"]


def test_each_merchants_spend_is_one_record_across_both_submissions(soaked: dict[str, Any]) -> None:
    """Each merchant's spend composes in one run: its state's entries of the ledger's run id are
    the ledger's rows (a call per round it trained in, in either submission), and its own audit
    against the run passes."""
    spend = soaked["checks"]["ledger_rows_equal_each_merchants_state_entries"]["detail"]
    trained = {m: sum(m in r["accepted"] or m in r["rejected"] for r in soaked["rounds"]) for m in spend}
    assert trained["shop-a"] == trained["shop-b"] == trained["shop-c"] == 3 and trained["shop-d"] in (1, 2)
    assert {m: v["state_entries"] for m, v in spend.items()} == trained
    audits = soaked["checks"]["fedshop_audit_passes"]["detail"]
    assert sorted(audits) == ["run", "shop-a", "shop-b", "shop-c", "shop-d"]
    assert all(a["exit"] == 0 for a in audits.values()), audits
