"""Real Flower deployment processes on loopback: start them, watch their logs, kill them.

A SuperLink starts its ServerApp launcher (``flower-superexec``) in a session of its own, and
a merchant's start script runs its SuperNode beside a warm ClientApp launcher that forks a
process per message: killing a process group is not enough. ``kill_tree`` stops the whole descendant
tree (SIGSTOP first, so nothing forks while it is being collected), then SIGKILLs every PID it
found. Output goes to files, never pipes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.helpers import proc

VENV_BIN = Path(sys.executable).parent


# Below Linux's ephemeral range (32768-60999 by default), which the kernel hands out to outgoing
# connections too: a port it chose as free could be taken by some process's connect() before the
# SuperLink bound it (seen once: "address already in use" at start-up). Ports here are only
# ever taken by a bind.
PORT_RANGE = (20000, 32000)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1, drawn from ``PORT_RANGE``."""
    rng = random.SystemRandom()
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", rng.randrange(*PORT_RANGE)))
            except OSError:  # taken: draw again
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def deploy_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's CLIs: this venv first on PATH (the SuperLink starts
    ``flower-superexec``, a merchant's script ``python3 -m client.warm``, from PATH), one torch
    thread per ClientApp process (three nodes share two cores), no network, no dependency install."""
    env = proc.subprocess_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.update(extra or {})
    return env


def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            if fields[0] not in ("Z", "X"):
                out[int(entry.name)] = int(fields[1])
    return out


def descendants(roots: Sequence[int]) -> set[int]:
    """Live processes in the trees under ``roots`` (roots included)."""
    parents = _ppid_map()
    found = {r for r in roots if r in parents}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def kill_tree(pid: int, *, timeout_s: float = 20.0) -> None:
    """SIGKILL ``pid`` (started with its own session) and every descendant, wherever their
    session or group went, plus orphans left in its session (a SuperExec whose SuperNode has
    already exited lingers until it notices its parent is gone)."""
    stopped: set[int] = set()
    for _ in range(20):  # freeze the tree so no new child escapes, until it stops growing
        tree = descendants([pid, *proc.session_members(pid), *stopped])
        new = tree - stopped
        if not new:
            break
        for p in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGSTOP)
        stopped |= new
    for p in stopped | {pid}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(proc.is_alive(p) for p in stopped):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes survived SIGKILL: {[p for p in stopped if proc.is_alive(p)]}")
        time.sleep(0.1)


@dataclasses.dataclass
class Service:
    """A long-running process in its own session, its output in ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 4000) -> str:
        return f"--- {self.name} (pid {self.popen.pid}, exit {self.popen.poll()}) ---\n{self.text()[-n:]}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, pattern: str, *, timeout_s: float, count: int = 1, allow_exit: bool = False) -> None:
        """Until ``pattern`` (a regex) occurs ``count`` times in the log; fails early if the process exits."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            if len(regex.findall(self.text())) >= count:
                return
            if not allow_exit and not self.alive():
                raise AssertionError(f"{self.name} exited before logging {pattern!r}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} (x{count}) within {timeout_s:.0f} s\n{self.tail()}")
            time.sleep(0.2)

    def wait_exit(self, timeout_s: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        kill_tree(self.popen.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


class Services:
    """Every process a test starts; all of them are killed when the ``with`` block ends."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.started: list[Service] = []

    def start(self, name: str, cmd: Sequence[str], *, cwd: Path | None = None,
              env: Mapping[str, str] | None = None) -> Service:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(list(cmd), cwd=cwd or proc.REPO, env=dict(env or self.env), stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        service = Service(name=name, popen=popen, log=log)
        self.started.append(service)
        return service

    def logs(self) -> str:
        return "\n".join(s.tail() for s in self.started)

    def stop_all(self) -> None:
        errors = []
        for service in reversed(self.started):
            try:
                service.kill()
            except AssertionError as exc:  # keep killing the others
                errors.append(str(exc))
        if errors:
            raise AssertionError("; ".join(errors))

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


@contextlib.contextmanager
def services(log_dir: Path, env: Mapping[str, str]) -> Iterator[Services]:
    with Services(log_dir, env) as group:
        yield group


def run_cli(args: Sequence[str], *, log_dir: Path, env: Mapping[str, str], timeout_s: float = 120.0) -> proc.Run:
    """A short command to completion in its own session (killed with its tree on timeout)."""
    return proc.run(list(args), log_dir=log_dir, timeout_s=timeout_s, env=env)


# --------------------------------------------------------------------------- the Control API from outside
def flwr_home(path: Path, *, address: str, root_certificates: Path) -> Path:
    """A ``FLWR_HOME`` whose default connection ``fedshop`` dials ``address`` trusting
    ``root_certificates``: what anyone holding a merchant's ``ca.crt`` can write."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(f'[superlink]\ndefault = "fedshop"\n\n[superlink.fedshop]\n'
                                      f'address = "{address}"\nroot-certificates = "{root_certificates}"\n')
    return path


# Control and Runtime routes of Flower 1.42 (flwr/superlink/routers/control/router.py,
# flwr/supercore/routers/runtime/router.py), the API's own pages, and dot-segment spellings
# of a Control route under the Fleet prefix: none may be served on the public port.
OFF_LIMITS = [
    ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"), ("POST", "/v1/control/stop-run"),
    ("POST", "/v1/control/register-node"), ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/fleet/../control/list-runs"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet/get-run/..%2f..%2fcontrol/list-runs"),
    ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
]


def probe(address: str, method: str, path: str, *, ca: Path, timeout_s: float = 10.0) -> tuple[int, str]:
    """One HTTPS request with ``path`` exactly as given (http.client normalises nothing; httpx
    would resolve ``..``), an empty protobuf body: (status, body)."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(host.strip("[]"), int(port), timeout=timeout_s,
                                       context=ssl.create_default_context(cafile=str(ca)))
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"content-type": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()
