"""A merchant's budget lasts as long as its data: overlapping calls, crashes, lost files, new runs.

Issue "Privacy end to end", findings 5 (overlapping calls lost spend: each rewrote the file
from the copy it read at its start) and 8 (the budget could be reset: a missing file was a
fresh budget, every simulation run folder held a new one, ``train-local`` kept another).
The two overlap tests fail on the version before the lock (``git show 6b3a429:shared/privacy/budget.py``):
the first keeps only the last writer's entry, the second has no ``PrivacyState.locked``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.merchant import Merchant, resolve_node
from shared.config import ConfigError, RunConfig
from shared.model import ModelSpec, build_model, get_trainable
from shared.privacy import state_file
from shared.privacy.budget import BudgetExceededError, PrivacyState, PrivacyStateError
from shared.privacy.events import MechanismEvent
from simulations import engine, local
from tests.helpers.merchants import write_merchant, write_merchants
from tests.helpers.reference import reference_epsilon

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5
N = 200
CONFIG = RunConfig(encoder="tiny", max_local_steps=2, batch_size=16, max_seq_len=32, eval_max_examples=16,
                   noise_multiplier=2.0, target_epsilon=8.0)


def event(steps: int) -> MechanismEvent:
    return MechanismEvent(noise_multiplier=1.0, sample_rate=0.05, steps=steps, max_grad_norm=1.0)


def new_state(path: Path, eps: float = 50.0) -> None:
    # Through the constructor and save(): both versions have them, so the overlap test runs on either.
    PrivacyState(path=path, merchant_id="m1", target_epsilon=eps, target_delta=DELTA).save()


def reopen(path: Path, eps: float = 50.0) -> PrivacyState:
    return PrivacyState.open(path, merchant_id="m1", target_epsilon=eps, target_delta=DELTA)


def run_threads(*targets: Any) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()


# ----------------------------------------------------------------------------- finding 5: overlapping calls


def test_two_overlapping_calls_on_one_state_both_keep_their_spend(tmp_path: Path) -> None:
    """Each call reads the state, checks, and only commits once the other has checked too.
    Fails before the lock: both rewrote the file from an empty history, keeping one entry."""
    path = tmp_path / "privacy-state.json"
    new_state(path)
    both_checked = threading.Barrier(2, timeout=60)
    errors: list[BaseException] = []

    def call(steps: int, round: int) -> None:
        try:
            state = reopen(path)  # a separate object per call, read at the call's start
            state.check(event(steps))
            both_checked.wait()
            state.commit(event(steps), unit_count=N, round=round, model_version=0)
        except BaseException as exc:  # noqa: B036 (reported below, in the test's thread)
            errors.append(exc)

    run_threads(lambda: call(10, 1), lambda: call(20, 2))

    assert errors == []
    final = reopen(path)
    assert sorted((e.round, e.event.mechanism.steps) for e in final.entries) == [(1, 10), (2, 20)]
    assert final.epsilon() == pytest.approx(reference_epsilon([event(10), event(20)]), rel=1e-6)


def test_a_second_locked_call_waits_for_the_first_and_sees_its_spend(tmp_path: Path) -> None:
    """Budget: one call of 30 steps. Two overlapping calls of 20 each both fit an empty history;
    under the lock the second sees the first's reserved spend, and the budget stops it."""
    path = tmp_path / "privacy-state.json"
    budget_eps = reference_epsilon([event(30)])
    new_state(path, eps=budget_eps)
    first_reserved, first_may_commit = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def locked() -> Any:
        return PrivacyState.locked(path, merchant_id="m1", target_epsilon=budget_eps, target_delta=DELTA)

    def first() -> None:
        with locked() as state:
            state.check(event(20))
            first_reserved.set()
            first_may_commit.wait(60)  # training
            seen["first"] = state.commit(event(20), unit_count=N, round=1, model_version=0)

    def second() -> None:
        first_reserved.wait(60)
        with locked() as state:  # waits for the first call's commit
            seen["second_saw"] = list(state.events)
            try:
                state.check(event(20))
            except BudgetExceededError as exc:
                seen["second_refused"] = exc

    def release_first() -> None:
        first_reserved.wait(60)
        threading.Event().wait(0.5)  # time for the second call to reach the lock
        seen["second_got_the_lock_early"] = "second_saw" in seen
        first_may_commit.set()

    run_threads(first, second, release_first)

    assert seen["second_got_the_lock_early"] is False
    assert seen["second_saw"] == [event(20)]  # the first call's committed spend, read under the lock
    refused = seen["second_refused"]
    assert refused.epsilon_now == pytest.approx(seen["first"]) and refused.budget == budget_eps
    final = reopen(path, eps=budget_eps)
    assert [e.round for e in final.entries] == [1] and final.reservations == []
    assert not state_file.lock_path(path).exists()


# ----------------------------------------------------------------------------- a call that dies


CRASHING_CALL = """
import sys, time
from pathlib import Path
from shared.privacy.budget import PrivacyState
from shared.privacy.events import MechanismEvent
with PrivacyState.locked(Path(sys.argv[1]), merchant_id="m1", target_epsilon=50.0, target_delta=1e-5) as state:
    state.check(MechanismEvent(noise_multiplier=1.0, sample_rate=0.05, steps=40, max_grad_norm=1.0))
    print("reserved", flush=True)
    time.sleep(600)  # training, until killed
"""


def test_a_call_killed_between_reserve_and_commit_stays_counted(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "privacy-state.json"
    new_state(path, eps=50.0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", CRASHING_CALL, str(path)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "reserved"
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # the process dies holding the lock, mid-"training"
        assert proc.wait(timeout=60) == -signal.SIGKILL

    assert reopen(path).events == [event(40)]  # a reader counts it
    with caplog.at_level(logging.WARNING, logger="shared.privacy.budget"):
        with PrivacyState.locked(path, merchant_id="m1", target_epsilon=50.0, target_delta=DELTA) as state:
            # The kernel released the dead process's lock: this call gets it at once.
            assert state.epsilon() == pytest.approx(reference_epsilon([event(40)]), rel=1e-6)
            after = state.check(event(10))
            assert after == pytest.approx(reference_epsilon([event(40), event(10)]), rel=1e-6)
            state.commit(event(10), unit_count=N, round=2, model_version=1)
    assert f"pid {proc.pid}" in caplog.text and "counts as spent" in caplog.text
    raw = json.loads(path.read_text())
    assert len(raw["reservations"]) == 1 and len(raw["entries"]) == 1  # the dead call's stays, counted
    assert not state_file.lock_path(path).exists()


# ----------------------------------------------------------------------------- finding 8: no reset


@pytest.fixture
def global_params() -> dict[str, np.ndarray]:
    return dict(get_trainable(build_model(ModelSpec.from_config(CONFIG))))


def test_a_deployed_node_without_a_privacy_state_refuses_to_train(tmp_path: Path,
                                                                   global_params: dict[str, np.ndarray]) -> None:
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1)
    node = resolve_node({"data-dir": str(merchant_dir), "merchant-id": "shop-a"}, CONFIG)
    path = merchant_dir / ".fedshop" / "privacy-state.json"
    assert node.state_path == path and not node.creates_privacy_state

    with pytest.raises(PrivacyStateError) as info:
        Merchant(node, CONFIG).train(global_params, server_round=1, model_version=0)
    assert str(path) in str(info.value) and "refusing to train" in str(info.value)
    assert not path.exists()

    # Created explicitly (what `fedshop deploy add-merchant` does), the node trains and spends it.
    assert PrivacyState.create(path, merchant_id="shop-a", target_epsilon=8.0, target_delta=CONFIG.target_delta)
    reply = Merchant(node, CONFIG).train(global_params, server_round=1, model_version=0)
    assert reply.params is not None and reply.facts.epsilon > 0
    raw = json.loads(path.read_text())
    assert [e["round"] for e in raw["entries"]] == [1] and raw["reservations"] == []


def test_state_paths_simulation_keeps_the_state_with_the_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_merchants(data, ["shop-a", "shop-b"])
    config = CONFIG.replace(data_dir=str(data), run_dir=str(tmp_path / "run"))

    sim = resolve_node({"partition-id": 1}, config)
    assert sim.merchant_id == "shop-b" and sim.creates_privacy_state
    assert sim.state_path == data / "shop-b" / ".fedshop" / "privacy-state.json"
    assert sim.state_dir == tmp_path / "run" / "nodes" / "shop-b"  # caches stay in the run folder
    assert Merchant(sim, config).feature_cache.is_relative_to(tmp_path / "run")

    synthetic = resolve_node({"partition-id": 0}, config.replace(data_dir="synthetic:3"))
    assert synthetic.state_path == tmp_path / "run" / "nodes" / synthetic.merchant_id / "privacy-state.json"

    deployed = resolve_node({"data-dir": str(data / "shop-a"), "state-dir": str(tmp_path / "kit" / "state")}, config)
    assert deployed.state_path == tmp_path / "kit" / "state" / "privacy-state.json"
    assert not deployed.creates_privacy_state


def test_a_simulation_creates_missing_states_once_and_moves_a_run_folders_state(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    write_merchants(data, ["shop-a", "shop-b"])
    run_dir = tmp_path / "run"
    config = CONFIG.replace(data_dir=str(data), run_dir=str(run_dir))
    # A run folder of an earlier fedshop, being resumed: shop-a's spend so far is there.
    legacy = run_dir / "nodes" / "shop-a" / "privacy-state.json"
    earlier = PrivacyState.open(legacy, merchant_id="shop-a", target_epsilon=8.0, target_delta=DELTA)
    earlier.commit(event(10), unit_count=N, round=1, model_version=0, run_id="r0")

    with caplog.at_level(logging.INFO):
        created = engine.prepare_privacy_states(config, num_merchants=2)

    a, b = (data / m / ".fedshop" / "privacy-state.json" for m in ("shop-a", "shop-b"))
    assert created == [b]
    assert "created the privacy state of 1 merchant" in caplog.text and str(b) in caplog.text
    assert "moved to" in caplog.text and str(legacy) in caplog.text
    assert PrivacyState.open(a, merchant_id="shop-a", target_epsilon=8.0, target_delta=DELTA).events == [event(10)]
    assert json.loads(b.read_text())["entries"] == [] and json.loads(b.read_text())["target_epsilon"] == 8.0

    before = (a.read_bytes(), b.read_bytes())
    assert engine.prepare_privacy_states(config, num_merchants=2) == []  # a second run continues them
    assert (a.read_bytes(), b.read_bytes()) == before
    assert engine.prepare_privacy_states(config.replace(data_dir="synthetic:2"), num_merchants=2) == []
    assert engine.prepare_privacy_states(config.replace(dp=False), num_merchants=2) == []


def test_train_local_spends_the_merchants_own_budget(tmp_path: Path) -> None:
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1)
    path = merchant_dir / ".fedshop" / "privacy-state.json"
    # Spend of an earlier federated run, in the merchant's state.
    fed = PrivacyState.open(path, merchant_id="shop-a", target_epsilon=8.0, target_delta=CONFIG.target_delta)
    fed_eps = fed.commit(event(10), unit_count=N, round=1, model_version=0, run_id="a-federated-run")

    result = local.train_local([merchant_dir], CONFIG, out_dir=tmp_path / "out", epochs_progress=False)

    state = PrivacyState.open(path, merchant_id="shop-a", target_epsilon=8.0, target_delta=CONFIG.target_delta)
    assert [e.run_id for e in state.entries][0] == "a-federated-run"
    assert state.entries[1].run_id.startswith("train-local-") and state.reservations == []
    assert state.entries[1].event.mechanism == result.train.mechanism
    assert result.train.epsilon == pytest.approx(state.epsilon()) and result.train.epsilon > fed_eps
    assert not (tmp_path / "out" / "privacy-state.json").exists()  # no budget of its own any more

    other = write_merchant(tmp_path / "data", "shop-b", seed=2)
    with pytest.raises(ConfigError, match="several merchant folders"):
        local.train_local([merchant_dir, other], CONFIG, out_dir=tmp_path / "pooled")


def test_adding_a_merchant_to_a_deployment_creates_its_state_where_its_node_looks(tmp_path: Path) -> None:
    from server.deploy import kit

    dep = kit.init_deployment(tmp_path / "fed", names=[], addresses=["127.0.0.1"], insecure=True)
    data = write_merchant(tmp_path / "data", "shop-a", seed=1)
    merchant = kit.add_merchant(dep, "shop-a", data_dir=data, budget=3.0, delta=1e-6)
    assert merchant.privacy_state == merchant.dir / "state" / "privacy-state.json"  # travels with the folder
    raw = json.loads(merchant.privacy_state.read_text())
    assert (raw["merchant_id"], raw["target_epsilon"], raw["target_delta"], raw["entries"]) == ("shop-a", 3.0, 1e-6, [])

    # A --state-dir on the merchant's own machine (its data folder is not here): left to the merchant.
    remote = kit.add_merchant(dep, "shop-b", data_dir=tmp_path / "elsewhere" / "shop-b", budget=3.0, delta=1e-6,
                              state_dir=tmp_path / "elsewhere" / "state")
    assert not remote.privacy_state.exists() and not (tmp_path / "elsewhere").exists()
