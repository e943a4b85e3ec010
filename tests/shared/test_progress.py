"""``shared.progress``: the one progress display, and the CLI's quiet default output."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest

from shared import progress
from simulations import cli


@pytest.fixture(autouse=True)
def _own_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV_VAR, raising=False)  # restored after each test


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def test_off_unless_enabled(clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    with progress.Progress("encoding records", 10, unit="records") as shown:
        for _ in range(10):
            clock.now += 10
            shown.update()
    assert capsys.readouterr().err == ""


def test_off_the_terminal_whole_lines_at_most_one_per_interval(clock: Clock,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """What a ClientApp in a Ray worker prints: complete lines (Ray forwards lines), the first
    only once the step has run ``AFTER_S``, then at most one per ``AFTER_S``."""
    progress.enable(True)
    with progress.Progress("encoding records", 100, unit="records") as shown:
        for _ in range(4):  # a quick step: silent
            clock.now += 1
            shown.update(10)
        assert capsys.readouterr().err == ""
        clock.now += 1.5  # 5.5 s in
        shown.update(10)
        for _ in range(5):  # 0.5 s apart: no new line
            clock.now += 0.5
            shown.update(10)
    err = capsys.readouterr().err
    assert err == "encoding records: 50/100 records (6 s)\n"
    assert list(progress.progress(range(3), desc="evaluating", total=3, unit="examples")) == [0, 1, 2]


def test_on_a_terminal_a_bar_that_waits_before_it_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    progress.enable(True)
    with progress.Progress("training", 3, unit="steps") as shown:
        shown.update(3)
    assert terminal.getvalue().strip() == ""  # done within AFTER_S: nothing drawn, nothing left behind
    from tqdm import tqdm

    with progress.Progress("training", 3, unit="steps") as shown:
        assert isinstance(shown._bar, tqdm) and shown._bar.delay == progress.AFTER_S and not shown._bar.leave


def test_the_cli_turns_it_off_with_quiet_and_off_a_terminal(tmp_path: Path) -> None:
    assert cli.main(["-q", "data", "synth", "--merchants", "2", "--out", str(tmp_path / "a"), "--limit", "1"]) == 0
    assert not progress.enabled()
    progress.enable(True)
    # pytest's captured stderr is not a terminal: off, whatever was set before
    assert cli.main(["data", "synth", "--merchants", "2", "--out", str(tmp_path / "b"), "--limit", "1"]) == 0
    assert not progress.enabled()


def test_only_rays_accelerator_notice_is_filtered() -> None:
    """The FutureWarning ``ray.init`` prints in every simulation goes; any other warning, from
    Ray too, still shows."""
    ray_notice = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var "
                  "if num_gpus=0 or num_gpus=None (default). To enable this behavior and turn off this error "
                  "message, set RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli._quiet_third_party_warnings()
        for message, category, module in [(ray_notice, FutureWarning, "ray._private.worker"),
                                          ("something else", FutureWarning, "ray._private.worker"),
                                          (ray_notice, DeprecationWarning, "ray._private.worker"),
                                          (ray_notice, FutureWarning, "client.trainer")]:
            warnings.warn_explicit(message, category, "worker.py", 1, module=module)
    shown = [(str(w.message)[:14], w.category.__name__) for w in seen]
    assert shown == [("something else", "FutureWarning"), ("Tip: In future", "DeprecationWarning"),
                     ("Tip: In future", "FutureWarning")]
