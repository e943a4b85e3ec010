"""Run ``fedshop`` in its own session and make sure nothing it started outlives the test.

Each run gets ``start_new_session=True``, so the command, the Ray head it starts (GCS,
raylet, workers, dashboard) and every ClientApp actor share one session id and process
group; the session id is how leftovers are found, by PID, in ``/proc``. Output goes to
files, not pipes: a lingering Ray process holding a pipe open would block reading it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fedshop_command(*args: str) -> list[str]:
    """The ``fedshop`` CLI, run with this interpreter (the project's venv)."""
    return [sys.executable, "-m", "simulations.cli", *args]


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a run: the repository on PYTHONPATH (Ray workers import
    ``tests.helpers`` modules from it), no network, few threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update({
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def session_members(sid: int) -> list[int]:
    """PIDs of live (non-zombie) processes whose session id or process group is ``sid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if state not in ("Z", "X") and sid in (pgrp, session):
            members.append(int(entry.name))
    return sorted(members)


def kill_session(sid: int, *, timeout_s: float = 30.0) -> list[int]:
    """SIGKILL the process group ``sid``, then by PID anything still in that session.

    Returns the PIDs that were still alive and had to be killed (empty when the run had
    already cleaned up after itself). Raises if something survives ``timeout_s``.
    """
    killed = session_members(sid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while True:
        left = session_members(sid)
        if not left:
            return killed
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of session {sid} survived SIGKILL: {left}")
        for pid in left:  # e.g. a process that changed its process group but not its session
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@dataclasses.dataclass
class Run:
    """A finished (or killed) command: exit code and its output."""

    returncode: int | None
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self, tail: int = 6000) -> str:
        return f"exit code {self.returncode}\n--- output (tail) ---\n{self.output[-tail:]}"


def _default_sigint() -> None:
    """In the child: SIGINT as in a terminal's foreground job. A test run started as a
    background job of a non-interactive shell (``pytest &``) has SIGINT ignored, children
    inherit that, and Python then leaves it ignored: Ctrl-C tests would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def session(cmd: Sequence[str], *, log_dir: Path, env: Mapping[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in a new session; on leaving, kill whatever of that session is left."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "stdout.txt").open("wb") as out, (log_dir / "stderr.txt").open("wb") as err:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=dict(env or subprocess_env()), stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_default_sigint)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        kill_session(proc.pid)


def read_output(log_dir: Path, returncode: int | None) -> Run:
    return Run(returncode=returncode,
               stdout=(log_dir / "stdout.txt").read_text(errors="replace"),
               stderr=(log_dir / "stderr.txt").read_text(errors="replace"))


def run(cmd: Sequence[str], *, log_dir: Path, timeout_s: float, env: Mapping[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion (or ``timeout_s``, then kill its whole session)."""
    with session(cmd, log_dir=log_dir, env=env) as proc:
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
    result = read_output(log_dir, returncode)
    if returncode is None:
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout_s:.0f} s; killed.\n"
                             + result.describe())
    return result
