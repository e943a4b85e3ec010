"""shared.privacy.budget: the merchant's persisted accountant and its hard budget stop."""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

import shared.privacy.budget as budget
import shared.privacy.state_file as state_file
from shared import atomic
from shared.privacy import accounting
from shared.privacy.budget import BudgetExceededError, PrivacyState, PrivacyStateError
from shared.privacy.events import (
    NEIGHBOURS_ADD_REMOVE,
    NEIGHBOURS_REPLACE_ONE,
    NOISE_SOURCE,
    RELEASE_EVALUATION,
    RELEASE_UPDATE,
    UNIT_RECORD,
    MechanismEvent,
    SpendEvent,
)
from tests.helpers.reference import reference_epsilon

DELTA = 1e-5
SIGMA, Q = 1.0, 0.05
N = 200  # records each call trains on


def event(steps: int, *, sigma: float = SIGMA, q: float = Q) -> MechanismEvent:
    return MechanismEvent(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0)


def open_state(path: Path, *, eps: float = 50.0, delta: float = DELTA, merchant: str = "m1") -> PrivacyState:
    return PrivacyState.open(path, merchant_id=merchant, target_epsilon=eps, target_delta=delta)


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("second", [event(30), event(25, sigma=1.5, q=0.1)], ids=["same", "different"])
def test_epsilon_composes_across_a_restart(tmp_path: Path, second: MechanismEvent) -> None:
    path = tmp_path / "privacy.json"
    first = event(40)

    state = open_state(path)
    state.check(first)
    eps_first = state.commit(first, unit_count=N, round=1, model_version=1)
    del state  # the process ends

    reopened = open_state(path)
    assert reopened.events == [first]
    assert reopened.epsilon() == eps_first
    planned_eps = reopened.check(second)
    eps_total = reopened.commit(second, unit_count=N, round=2, model_version=2)

    expected = reference_epsilon([first, second])
    assert eps_total == pytest.approx(expected, rel=1e-9)
    assert planned_eps == eps_total  # check() predicts exactly what commit() then reports
    # A fresh accountant per call would report only the second call: the classic bug.
    assert eps_total > eps_first
    assert eps_total > reference_epsilon([second]) * 1.05
    # And the file on disk says the same after yet another restart.
    assert open_state(path).epsilon() == pytest.approx(expected, rel=1e-9)
    assert [e["round"] for e in json.loads(path.read_text())["entries"]] == [1, 2]
    # Each call carries the noise source it was made with, across the restart too.
    assert [e["event"]["noise"] for e in json.loads(path.read_text())["entries"]] == [NOISE_SOURCE] * 2
    assert [e.event.noise for e in open_state(path).entries] == [NOISE_SOURCE] * 2


def test_state_written_before_the_noise_source_was_kept_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    open_state(path).commit(event(10), unit_count=N, round=1, model_version=1)
    raw = json.loads(path.read_text())
    del raw["entries"][0]["event"]["noise"]
    path.write_text(json.dumps(raw))

    state = open_state(path)  # spend is never dropped for a missing field: it is kept, unmarked

    assert state.events == [event(10)] and state.entries[0].event.noise == ""
    state.commit(event(10), unit_count=N, round=2, model_version=2)
    assert [e["event"]["noise"] for e in json.loads(path.read_text())["entries"]] == ["", NOISE_SOURCE]


def test_a_commit_records_the_whole_spend(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    open_state(path).commit(event(10), unit_count=N, round=1, model_version=1)

    (entry,) = open_state(path).entries

    assert entry.event == SpendEvent(mechanism=event(10), delta=DELTA, unit=UNIT_RECORD, unit_count=N,
                                     expected_batch=Q * N, release=RELEASE_UPDATE, noise=NOISE_SOURCE)
    assert json.loads(path.read_text())["entries"][0]["event"] == entry.event.to_dict()


def test_a_version_1_state_is_migrated_on_read(tmp_path: Path) -> None:
    # Version 1 kept the mechanism alone under "event" and the noise source beside it.
    path = tmp_path / "privacy.json"
    old = [{"event": event(10).to_dict(), "round": 1, "run_id": "r", "model_version": 0, "recorded_at": 1.0,
            "noise": NOISE_SOURCE},
           {"event": event(5).to_dict(), "round": 2, "run_id": "r", "model_version": 1, "recorded_at": 2.0}]
    path.write_text(json.dumps({"version": 1, "merchant_id": "m1", "target_epsilon": 50.0, "target_delta": DELTA,
                                "accountant": "prv", "entries": old}))

    state = open_state(path)

    assert state.events == [event(10), event(5)]
    assert [e.event for e in state.entries] == [
        SpendEvent(mechanism=event(10), delta=DELTA, unit=UNIT_RECORD, unit_count=0, expected_batch=0.0,
                   release=RELEASE_UPDATE, noise=NOISE_SOURCE, neighbours=NEIGHBOURS_ADD_REMOVE),
        SpendEvent(mechanism=event(5), delta=DELTA, unit=UNIT_RECORD, unit_count=0, expected_batch=0.0,
                   release=RELEASE_UPDATE, noise="", neighbours=NEIGHBOURS_ADD_REMOVE),
    ]
    assert state.epsilon() == pytest.approx(reference_epsilon([event(10), event(5)]), rel=1e-9)
    state.commit(event(1), unit_count=N, round=3, model_version=2)  # the next save writes version 4
    raw = json.loads(path.read_text())
    assert raw["version"] == budget.STATE_VERSION == 4 and raw["reservations"] == []
    assert [e.event for e in open_state(path).entries][:2] == [e.event for e in state.entries][:2]


def test_a_state_newer_than_this_fedshop_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps({"version": budget.STATE_VERSION + 1, "merchant_id": "m1", "target_epsilon": 8.0,
                                "target_delta": DELTA, "entries": []}))
    with pytest.raises(PrivacyStateError, match="newer"):
        open_state(path)


def test_new_state_is_not_written_until_a_commit(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "privacy.json"
    state = open_state(path)
    assert state.epsilon() == 0.0 and state.total_steps == 0
    state.check(event(10))
    assert not path.exists()
    state.commit(event(10), unit_count=N, round=0, model_version=0)
    assert path.is_file() and state.total_steps == 10


# ----------------------------------------------------------------------------- budget stop


def test_budget_stop_names_the_overshoot_and_spends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    state = open_state(path, eps=2.0)
    small = event(5)
    state.commit(small, unit_count=N, round=1, model_version=1)
    before_bytes = path.read_bytes()
    before_eps = state.epsilon()
    assert 0 < before_eps < 2.0

    big = event(300)
    after = reference_epsilon([small, big])
    with pytest.raises(BudgetExceededError) as info:
        state.check(big)
    error = info.value
    assert error.budget == 2.0 and error.merchant_id == "m1"
    assert error.epsilon_now == pytest.approx(before_eps)
    assert error.epsilon_after == pytest.approx(after, rel=1e-9)
    message = str(error)
    assert "'m1'" in message
    assert f"by {after - 2.0:.4f}" in message  # the overshoot, in ε
    assert f"{before_eps:.4f}" in message and f"{after:.4f}" in message
    # Nothing spent: memory and disk unchanged, no temp files.
    assert state.events == [small]
    assert path.read_bytes() == before_bytes
    assert sorted(os.listdir(tmp_path)) == ["privacy.json"]


def test_budget_boundary_is_inclusive(tmp_path: Path) -> None:
    # The merchant's own ε as the budget (the reference agrees with it to ~1e-10, not to the bit).
    exact = accounting.epsilon([event(50)], DELTA)
    state = open_state(tmp_path / "s.json", eps=exact)
    assert state.check(event(50)) == pytest.approx(exact, rel=1e-12)  # spending exactly the budget is fine
    with pytest.raises(BudgetExceededError):
        state.check(event(51))


def test_stored_budget_cannot_be_loosened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "privacy.json"
    state = open_state(path, eps=2.0)
    state.commit(event(10), unit_count=N, round=1, model_version=1)

    with caplog.at_level("WARNING", logger="shared.privacy.budget"):
        louder = open_state(path, eps=100.0)
    assert louder.target_epsilon == 2.0
    assert "100.000" in caplog.text and "2.000" in caplog.text
    with pytest.raises(BudgetExceededError, match="budget 2.0000"):
        louder.check(event(300))
    louder.commit(event(1), unit_count=N, round=2, model_version=2)  # writes the stored budget back
    assert json.loads(path.read_text())["target_epsilon"] == 2.0

    # Tightening is allowed, and it sticks once written.
    tighter = open_state(path, eps=1.5)
    assert tighter.target_epsilon == 1.5
    tighter.commit(event(1), unit_count=N, round=3, model_version=3)
    assert open_state(path, eps=100.0).target_epsilon == 1.5


def test_delta_change_after_spending_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    open_state(path).commit(event(10), unit_count=N, round=1, model_version=1)
    with pytest.raises(PrivacyStateError) as info:
        open_state(path, delta=1e-6)
    assert str(path) in str(info.value) and "1e-06" in str(info.value)
    assert open_state(path, delta=DELTA).target_delta == DELTA  # same δ is fine


def test_delta_change_before_spending_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    open_state(path).save()  # a state with a budget but no spend yet
    assert open_state(path, delta=1e-6).target_delta == 1e-6


def test_state_of_another_merchant_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    open_state(path, merchant="m1").commit(event(1), unit_count=N, round=0, model_version=0)
    with pytest.raises(PrivacyStateError, match="'m1'.*'m2'"):
        open_state(path, merchant="m2")


# ----------------------------------------------------------------------------- the file


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"merchant_id": "m1", "target_epsilon": 8.0, "target_delta": DELTA}),  # no entries
        json.dumps({"merchant_id": "m1", "target_epsilon": 8.0, "target_delta": DELTA,
                    "entries": [{"event": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -5,
                                           "max_grad_norm": 1.0}, "round": 0, "model_version": 0,
                                 "recorded_at": 0.0}]}),
        json.dumps({"merchant_id": "m1", "target_epsilon": "lots", "target_delta": DELTA, "entries": []}),
    ],
    ids=["truncated", "list", "no-entries", "negative-steps", "bad-budget"],
)
def test_corrupt_state_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "privacy.json"
    path.write_text(content)
    with pytest.raises(PrivacyStateError) as info:
        open_state(path)
    assert str(path) in str(info.value)


def test_atomic_save_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    state = open_state(path)
    for i in range(3):
        state.commit(event(5), unit_count=N, round=i, model_version=i)
    assert os.listdir(tmp_path) == ["privacy.json"]
    raw = json.loads(path.read_text())
    assert raw["version"] == budget.STATE_VERSION and len(raw["entries"]) == 3


def test_failed_save_keeps_old_file_and_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "privacy.json"
    state = open_state(path)
    state.commit(event(5), unit_count=N, round=0, model_version=0)
    before = path.read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        state.commit(event(7), unit_count=N, round=1, model_version=1)
    monkeypatch.undo()

    assert path.read_bytes() == before  # the old record is intact
    assert os.listdir(tmp_path) == ["privacy.json"]  # the temp file was removed
    assert state.events == [event(5)]  # the unsaved spend is not counted as released


# ----------------------------------------------------------------------------- locked calls, reservations


def locked_state(path: Path, *, eps: float = 50.0, create: bool = False,
                 timeout_s: float | None = None) -> AbstractContextManager[PrivacyState]:
    return PrivacyState.locked(path, merchant_id="m1", target_epsilon=eps, target_delta=DELTA, create=create,
                               timeout_s=timeout_s)


def test_a_version_2_state_loads_and_the_next_save_writes_version_4(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    spent = {k: v for k, v in SpendEvent.of(event(10), unit_count=N, delta=DELTA, noise=NOISE_SOURCE).to_dict().items()
             if k != "neighbours"}  # version 2 (and 3) did not keep it
    entry = {"event": spent, "round": 1, "run_id": "r", "model_version": 0, "recorded_at": 1.0}
    path.write_text(json.dumps({"version": 2, "merchant_id": "m1", "target_epsilon": 50.0, "target_delta": DELTA,
                                "accountant": "prv", "entries": [entry]}))  # no "reservations": version 2

    assert open_state(path).events == [event(10)] and open_state(path).reservations == []
    with locked_state(path) as state:
        state.check(event(5))
        state.commit(event(5), unit_count=N, round=2, model_version=1)

    raw = json.loads(path.read_text())
    assert raw["version"] == 4 and raw["reservations"] == [] and len(raw["entries"]) == 2
    # The old entry as it was, now saying what it was accounted for when recorded.
    assert raw["entries"][0] == {**entry, "event": {**spent, "neighbours": NEIGHBOURS_ADD_REMOVE}}
    assert raw["entries"][1]["event"]["neighbours"] == NEIGHBOURS_REPLACE_ONE
    assert open_state(path).epsilon() == pytest.approx(reference_epsilon([event(10), event(5)]), rel=1e-9)


def test_locked_check_reserves_the_spend_before_training_and_commit_turns_it_into_the_entry(
        tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    PrivacyState.create(path, merchant_id="m1", target_epsilon=50.0, target_delta=DELTA)
    with locked_state(path) as state:
        assert state_file.lock_path(path).exists()  # held
        planned_eps = state.check(event(10))
        # On disk before any training: the reservation, counted by anyone who reads the file.
        raw = json.loads(path.read_text())
        assert raw["entries"] == [] and len(raw["reservations"]) == 1
        assert raw["reservations"][0]["mechanism"] == event(10).to_dict()
        assert raw["reservations"][0]["pid"] == os.getpid()
        reader = open_state(path)
        assert reader.events == [event(10)] and reader.epsilon() == pytest.approx(planned_eps, rel=1e-9)
        eps = state.commit(event(10), unit_count=N, round=1, model_version=0, run_id="r")
    assert eps == planned_eps
    raw = json.loads(path.read_text())
    assert raw["reservations"] == [] and [e["round"] for e in raw["entries"]] == [1]
    assert not state_file.lock_path(path).exists()  # released and removed: nothing stray beside the state
    assert sorted(os.listdir(tmp_path)) == ["privacy.json"]


def test_a_missing_state_is_refused_naming_the_path_unless_created(tmp_path: Path) -> None:
    path = tmp_path / "node" / "state" / "privacy.json"
    with pytest.raises(PrivacyStateError) as info, locked_state(path):
        pass
    assert str(path) in str(info.value) and "refusing to train" in str(info.value)
    assert not (tmp_path / "node").exists()  # nothing written, not even the folder

    with locked_state(path, eps=3.0, create=True) as state:
        assert state.epsilon() == 0.0 and state.target_epsilon == 3.0
    assert json.loads(path.read_text())["target_epsilon"] == 3.0  # the budget is stored at once


def test_create_writes_a_budget_and_never_overwrites_a_state(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    assert PrivacyState.create(path, merchant_id="m1", target_epsilon=2.0, target_delta=DELTA)
    open_state(path).commit(event(10), unit_count=N, round=1, model_version=0)
    before = path.read_bytes()

    assert not PrivacyState.create(path, merchant_id="m1", target_epsilon=50.0, target_delta=DELTA)
    assert path.read_bytes() == before  # spend and stored budget as they were
    with pytest.raises(PrivacyStateError, match="'m1'.*'m2'"):
        PrivacyState.create(path, merchant_id="m2", target_epsilon=2.0, target_delta=DELTA)


def test_the_budget_check_counts_reservations(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    exact = accounting.epsilon([event(50)], DELTA)  # 25 + 25 steps of one (σ, q) compose to exactly this
    PrivacyState.create(path, merchant_id="m1", target_epsilon=exact, target_delta=DELTA)
    with locked_state(path, eps=exact) as state:
        state.check(event(25))  # reserved, never committed: the block ends without a commit
    with locked_state(path, eps=exact) as state:
        assert state.events == [event(25)]
        state.check(event(25))  # the two halves fit exactly
    with locked_state(path, eps=exact) as state, pytest.raises(BudgetExceededError):
        state.check(event(1))


def test_a_call_that_fails_before_commit_withdraws_its_reservation(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "privacy.json"
    PrivacyState.create(path, merchant_id="m1", target_epsilon=50.0, target_delta=DELTA)
    with caplog.at_level("INFO", logger="shared.privacy.budget"), pytest.raises(MemoryError):
        with locked_state(path) as state:
            state.check(event(10))
            assert len(json.loads(path.read_text())["reservations"]) == 1
            raise MemoryError("training ran out of memory")  # before commit: no update left
    assert json.loads(path.read_text())["reservations"] == []
    assert "withdrawn" in caplog.text
    assert not state_file.lock_path(path).exists()


def test_check_twice_under_one_lock_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    PrivacyState.create(path, merchant_id="m1", target_epsilon=50.0, target_delta=DELTA)
    with locked_state(path) as state:
        state.check(event(10))
        with pytest.raises(RuntimeError, match="already reserved"):
            state.check(event(10))
        state.commit(event(10), unit_count=N, round=1, model_version=0)
    assert open_state(path).events == [event(10)]


def test_a_waiting_call_gives_up_after_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    PrivacyState.create(path, merchant_id="m1", target_epsilon=50.0, target_delta=DELTA)
    with locked_state(path):
        with pytest.raises(PrivacyStateError, match="still locked"), locked_state(path, timeout_s=0.2):
            pass
    with locked_state(path, timeout_s=0.2):  # released: the next one gets it at once
        pass


def test_the_module_command_creates_a_state_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state" / "privacy-state.json"
    args = ["create", str(path), "--merchant-id", "m1", "--epsilon", "4", "--delta", "1e-6"]
    assert budget.main(args) == 0 and "created" in capsys.readouterr().out
    raw = json.loads(path.read_text())
    assert (raw["merchant_id"], raw["target_epsilon"], raw["target_delta"], raw["entries"]) == ("m1", 4.0, 1e-6, [])
    assert budget.main(args) == 0 and "already there" in capsys.readouterr().out


def test_only_training_calls_use_up_a_noise_plan(tmp_path: Path) -> None:
    # A noise plan spreads the budget over the run's remaining *training* calls: an evaluation
    # release of the same run is spend (it counts in ε) but not one of those calls.
    state = open_state(tmp_path / "privacy.json")
    evaluation = MechanismEvent(noise_multiplier=10.0, sample_rate=1.0, steps=1, max_grad_norm=1.0)
    state.commit(event(10), unit_count=N, round=1, model_version=0, run_id="r1")
    state.commit(evaluation, unit_count=30, round=1, model_version=1, run_id="r1", release=RELEASE_EVALUATION)
    state.commit(event(10), unit_count=N, round=1, model_version=0, run_id="r0")
    assert state.calls_in_run("r1") == 1 and state.calls_in_run("r0") == 1 and state.calls_in_run("r2") == 0
    assert len(state.events) == 3  # all three are counted in ε
