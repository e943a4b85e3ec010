"""client.warm: the long-lived serving process loads a run's ClientApp from its FAB once, and the
app of another FAB (another run's code) instead of the one already imported; its launcher
replaces a serving process that died."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from client import warm
from tests.helpers import deployment as dh
from tests.helpers import proc

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: loading an app drops fedshop's own modules from sys.modules.
LOAD_TWO_FABS = textwrap.dedent('''
    import hashlib
    import sys
    from pathlib import Path

    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

    from client import warm

    def fab(name):
        app = Path(sys.argv[1]) / name
        (app / "client").mkdir(parents=True)
        (app / "client" / "__init__.py").write_text("")
        (app / "client" / "app.py").write_text(
            "from flwr.clientapp import ClientApp\\napp = ClientApp()\\napp.code = %r\\n" % name)
        (app / "pyproject.toml").write_text(
            '[project]\\nname = "probe"\\nversion = "1.0.0"\\n'
            '[tool.flwr.app]\\npublisher = "fedshop"\\n'
            '[tool.flwr.app.components]\\nserverapp = "client.app:app"\\nclientapp = "client.app:app"\\n'
            '[tool.flwr.app.config]\\nx = 1\\n')
        content = build_fab_from_disk(app)
        return Fab(hashlib.sha256(content).hexdigest(), content, {})

    def run(f):
        return Run(
            run_id=1, fab_id="fedshop/probe", fab_version="1.0.0", fab_hash=f.hash_str, override_config={},
            pending_at="", starting_at="", running_at="", finished_at="", status=None, flwr_aid="",
            federation_id="", primary_task_id=None, bytes_sent=0, bytes_recv=0, clientapp_runtime=0.0)

    one, two = fab("one"), fab("two")
    loaded = warm.LoadedApp()
    first = loaded.get(run(one), one)
    again = loaded.get(run(one), one)
    second = loaded.get(run(two), two)
    back = loaded.get(run(one), one)
    print("codes", first.code, again.code, second.code, back.code)
    print("same", first is again, first is back)
    print("client from", sys.modules["client.app"].__file__)
''')


def test_a_serving_process_loads_each_fab_once_and_another_fabs_own_code(tmp_path: Path) -> None:
    script = tmp_path / "load.py"
    script.write_text(LOAD_TWO_FABS)
    env = proc.subprocess_env({"FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONPATH": str(ROOT)})
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "apps")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    # the same FAB is not loaded again (its module's caches live on); another FAB's code replaces it
    assert "codes one one two one" in out, out
    assert "same True False" in out, out
    assert str(tmp_path / "flwr-home") in out.split("client from", 1)[1], out


def _launcher_lines(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for(path: Path, pattern: str, count: int, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.findall(pattern, _launcher_lines(path))
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{count} x {pattern!r} not in {path} after {timeout_s} s:\n{_launcher_lines(path)[-3000:]}")


@pytest.mark.slow
def test_the_launcher_replaces_a_serving_process_that_died(tmp_path: Path) -> None:
    """The launcher imports once; a serving process killed outright is forked again from that
    warm state (no second warm-up), and stopping the launcher stops the serving process too."""
    log_path = tmp_path / "launcher.log"
    port = dh.free_ports(1)[0]  # no node listens there: the serving process finds no task
    with log_path.open("w") as log_file:
        launcher = subprocess.Popen([sys.executable, "-m", "client.warm", "--runtime-api-address",
                                     f"127.0.0.1:{port}"], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=proc.subprocess_env({"OMP_NUM_THREADS": "1"}))
    try:
        serving = rf"{re.escape(warm.SERVING)} in process (\d+)"
        first = int(_wait_for(log_path, serving, 1, 180)[0])
        os.kill(first, signal.SIGKILL)
        pids = [int(p) for p in _wait_for(log_path, serving, 2, 30)]
        assert pids[0] == first and pids[1] != first
        assert "serving process ended with status -9" in _launcher_lines(log_path)
        assert _launcher_lines(log_path).count(warm.READY) == 1  # imported once, forked twice
        os.kill(pids[1], 0)  # the new one is alive
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pids[1]):
            time.sleep(0.1)
        assert not _alive(pids[1]), "the serving process outlived its launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] not in "ZX"


def test_a_task_past_its_messages_expiry_is_abandoned_and_one_in_time_is_not() -> None:
    """client.warm.expiry_guard: a task still running grace_s after its message's time to live
    ran out ends the serving process (here: the callback), so a hung task cannot hold the
    node's later messages."""
    fired = threading.Event()
    with warm.expiry_guard(time.time() - 1.0, grace_s=0.05, on_overrun=fired.set):
        assert fired.wait(5.0)  # the block overran: the guard went off while it ran
    fired.clear()
    with warm.expiry_guard(time.time() + 0.1, grace_s=0.05, on_overrun=fired.set):
        pass  # done long before its expiry
    time.sleep(0.3)
    assert not fired.is_set()  # and the guard is disarmed on the way out


def test_the_launcher_freezes_its_objects_before_forking(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving process's garbage collections leave the launcher's imported objects alone."""
    monkeypatch.setattr(os, "fork", lambda: 4242)  # the launcher's side of the fork only
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        assert warm._fork_worker("127.0.0.1:1", 0.2) == 4242
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_launcher_signs_the_calls_flowers_own_superexec_signs() -> None:
    """client.warm signs the Runtime API calls flower-superexec signs under SuperExec
    authentication (a Flower that protected more would refuse the launcher's other calls)."""
    from flwr.supercore.superexec import run_superexec

    assert warm.AUTHENTICATED_METHODS == run_superexec._SUPEREXEC_AUTH_METHODS
