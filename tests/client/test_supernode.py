"""The SuperNode launcher (client.supernode) and the shorter object-pull retries (shared.flower_pulls).

Both change how often Flower's own loops ask, nothing else; both refuse a Flower that no longer
has what they replace. The deployment tests (tests/simulations/test_deploy.py, test_soak.py) run
the merchants' start scripts, which start every SuperNode through client.supernode."""

from __future__ import annotations

import importlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from client import supernode
from server import deploy
from shared import flower_pulls


def _module(tmp_path: Path, name: str, source: str):
    (tmp_path / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_the_installed_flower_has_the_sleeps_and_pulls_it_replaces() -> None:
    supernode.check_flower()  # raises otherwise
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    for module, name in ((start_client_internal, "pull_objects"), (run_clientapp, "pull_and_inflate_object_from_tree"),
                         (http_grid, "pull_objects")):
        assert callable(getattr(module, name))


def test_the_poll_clock_shortens_only_the_two_fixed_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = supernode._PollClock(0.4)
    for seconds in (3, 3.0, 0.5, 1.0, 0.01):
        clock.sleep(seconds)
    assert slept == pytest.approx([0.4, 0.4, 0.04, 1.0, 0.01])
    assert clock.monotonic is time.monotonic  # everything else is time's


def test_after_serving_a_message_the_node_polls_briskly_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    now = [100.0]
    clock = supernode._PollClock(0.5)
    clock.schedule._now = lambda: now[0]
    clock.sleep(3)  # idle, nothing served yet
    clock.sleep(0.5)  # a reply check: a message is being served
    now[0] += supernode.ACTIVE_WINDOW_S - 1
    clock.sleep(3)
    now[0] += 1
    clock.sleep(3)  # the window has passed: idle again
    assert slept == pytest.approx([0.5, 0.05, supernode.DEFAULT_ACTIVE_POLL_INTERVAL_S, 0.5])
    # Never brisker than asked: an idle poll under the default active one is kept for both.
    assert supernode._PollClock(0.05).schedule.active_s == 0.05
    with pytest.raises(ValueError, match=r"active poll interval must be in \(0, 0.5\] seconds.*got 0.8"):
        supernode._PollClock(0.5, 0.8)


def test_install_patches_the_supernode_loop_and_its_pulls(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(loop, "pull_objects", inflatable_utils.pull_objects)
    for module in (heartbeat, fleet_http_connection):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    _flowers_own_retry_waits(monkeypatch)
    assert supernode.install(0.25) is loop
    assert _longest_waits() == (supernode.RETRY_CAP_S, supernode.RETRY_CAP_S)
    # the interval the node declares at activation and in each heartbeat, and its sender's
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 10.0
    for bad in (5.0, 3600.0):
        with pytest.raises(ValueError, match=r"heartbeat interval must be in \[10, 1800\]"):
            supernode.set_heartbeat_interval(bad)
    assert isinstance(loop.time, supernode._PollClock) and loop.time.poll_interval_s == 0.25
    assert loop.pull_objects.func is inflatable_utils.pull_objects
    assert loop.pull_objects.keywords == {"initial_backoff": flower_pulls.INITIAL_BACKOFF_S,
                                          "backoff_cap": flower_pulls.BACKOFF_CAP_S}
    with pytest.raises(supernode.FlowerChangedError):  # a second install finds no plain time
        supernode.install(0.25)
    for bad in (0.0, -1.0, 3.5):
        with pytest.raises(ValueError, match="poll-interval-s"):
            supernode.install(bad)


def _flowers_own_retry_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore import heartbeat
    from flwr.supercore.retry import http_retry, retry_invoker

    monkeypatch.setattr(http_retry, "MAX_RETRY_DELAY", MAX_RETRY_DELAY)
    monkeypatch.setattr(heartbeat, "exponential", retry_invoker.exponential)


def _longest_waits(tries: int = 12) -> tuple[float, float]:
    """The longest wait before a retry over ``tries`` failures: of a SuperLink request, of a heartbeat."""
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.retry.http_retry import make_simple_http_retry_invoker

    def longest(waits: Iterator[float]) -> float:
        return max(next(waits) for _ in range(tries))

    return (longest(make_simple_http_retry_invoker().wait_gen_factory()),
            longest(HeartbeatSender(lambda: True)._retry_invoker.wait_gen_factory()))


def test_a_node_retries_its_superlink_within_seconds_not_twenty(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a SuperLink restart a node waited up to 20 s between tries (Flower 1.42's cap), and
    the restarted SuperLink gave up on it (two 10 s heartbeat intervals) in the round it sent it
    a message. client.supernode caps the waits of its requests and of its heartbeats."""
    _flowers_own_retry_waits(monkeypatch)
    assert _longest_waits() == (20, 20)  # Flower's own, as found
    supernode.cap_retries(2.0)
    assert _longest_waits() == (2.0, 2.0)
    supernode.cap_retries(2.0)  # again: idempotent
    assert _longest_waits() == (2.0, 2.0)


def test_a_changed_flower_is_refused_by_name(tmp_path: Path) -> None:
    no_sleep = _module(tmp_path, "loop_without_sleep", "import time\ndef loop():\n    time.sleep(2)\n")
    with pytest.raises(supernode.FlowerChangedError, match=r"loop_without_sleep\.py.*time\.sleep\(3\)"):
        supernode.check_flower(no_sleep)
    old_pull = _module(tmp_path, "old_pull", "def pull_objects(ids, fn, *, max_time=None):\n    return {}\n")
    with pytest.raises(flower_pulls.FlowerChangedError, match=r"old_pull\.py.*pull_objects.*backoff"):
        flower_pulls.bind_backoff(old_pull, "pull_objects")
    with pytest.raises(flower_pulls.FlowerChangedError, match="no pull_and_inflate"):
        flower_pulls.bind_backoff(old_pull, "pull_and_inflate_object_from_tree")


def test_bound_pulls_still_retry_until_the_object_arrives(tmp_path: Path) -> None:
    host = _module(tmp_path, "pull_host", "from flwr.supercore.inflatable.inflatable_utils import pull_objects\n")
    flower_pulls.bind_backoff(host, "pull_objects")
    flower_pulls.bind_backoff(host, "pull_objects")  # idempotent: one partial over Flower's function
    assert host.pull_objects.func is inflatable_utils.pull_objects
    misses = {"a": 2, "b": 0}

    def pull(object_id: str) -> bytes:
        if misses[object_id]:
            misses[object_id] -= 1
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    assert host.pull_objects(["a", "b"], pull) == {"a": b"a", "b": b"b"}
    assert misses == {"a": 0, "b": 0}


def test_bad_poll_intervals_are_refused_with_their_value(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        supernode.main(["--poll-interval-s", "soon", "--insecure"])
    assert exc.value.code == 2 and "'soon'" in capsys.readouterr().err
    monkeypatch.setenv(supernode.POLL_ENV, "0")
    with pytest.raises(SystemExit) as exc:
        supernode.main(["--insecure"])
    assert exc.value.code == 2 and "got 0.0" in capsys.readouterr().err
    monkeypatch.setenv(supernode.POLL_ENV, "fast")
    with pytest.raises(SystemExit) as exc:
        supernode.main(["--insecure"])
    assert exc.value.code == 2 and f"{supernode.POLL_ENV}: not a number of seconds: 'fast'" in capsys.readouterr().err
    monkeypatch.delenv(supernode.POLL_ENV)
    monkeypatch.setenv(supernode.ACTIVE_POLL_ENV, "2")  # brisker than idle, or it means nothing
    with pytest.raises(SystemExit) as exc:
        supernode.main(["--insecure"])
    assert exc.value.code == 2 and "active poll interval must be in (0, 0.5] seconds (the idle one), got 2.0" \
        in capsys.readouterr().err


def test_the_merchants_script_starts_its_node_through_the_launcher(tmp_path: Path) -> None:
    dep = deploy.init_deployment(tmp_path / "fed", names=["localhost"], addresses=["127.0.0.1"], port=40224)
    kit = deploy.add_merchant(dep, "shop-a", data_dir=tmp_path / "a", budget=8, delta=1e-5)
    assert deploy.supernode_command(kit)[:3] == ["python3", "-m", "client.supernode"]
    text = (kit.dir / deploy.SUPERNODE_SCRIPT).read_text()
    assert re.search(rf'"\$python" -m client\.supernode \\\n\s+--superlink {re.escape(kit.superlink_address)} ', text)
    assert '--isolation "$isolation"' in text and "import client.supernode, client.warm" in text


def test_the_warm_launcher_fills_the_caches_its_forks_would_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """client.warm prepares transformers' checkpoint-conversion table in the parent (pure
    Python), so a serving process forked from it (the first, or one replacing a dead one) does
    not spend ~0.3 s of its first model build rebuilding it."""
    from transformers import conversion_mapping

    from client import warm

    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    warm._warm_library_caches()
    assert conversion_mapping._checkpoint_conversion_mapping_cache  # built, and kept for the forks
