"""A real federation on loopback: ``fedshop deploy``, a TLS SuperLink with node authentication,
three merchants' SuperNodes, runs submitted with ``flwr run``, and the faults a deployment meets.

Each SuperNode runs with ``--isolation process`` beside fedshop's warm ClientApp launcher (its
start script; ``client/warm.py``): the imports are paid once per node, and the node's messages
are served by one process forked from the launcher. Starting a federation still takes a while,
so one (the module-scoped ``federation`` fixture) serves every slow test here, and its main run
of three rounds covers most of it:

- round 1: the three merchants train; ledger rows for all three;
- round 2: shop-c's SuperNode is SIGKILLed as its training message arrives; the round ends
  in bounded time (``round-timeout-s``, or sooner when the SuperLink declares the node
  unavailable as its heartbeat lapses) with shop-a and shop-b, shop-c counted as failed;
  shop-c's start script is run again at once (same key, same state folder) and gets back in
  once the SuperLink lets go of the dead process;
- round 3: the restarted shop-c trains again and its ε continues from its state file; shop-b
  refuses, because the run config asks for ε = 1000 but shop-b's own node config allows only
  two training calls (the merchant's budget decides).

While round 2 waits for the dead node: three nodes that must not get in (a key pair nobody
registered, a node without the federation's CA, a node speaking plain HTTP with
``--insecure``); a merchant's credentials (its ``ca.crt``) at the Control API, where ``flwr
ls``, ``flwr run``, ``flwr stop`` of the main run and ``flwr supernode register`` must all be
refused on the public port (nginx passes only the Fleet API) while the operator's own ``flwr``
on the SuperLink's loopback port works; and a second run that needs a fourth merchant, which
must fail after its ``node-wait-timeout-s`` instead of waiting forever. After the main run, the same SuperNodes
get a run that asks for ``dp = false``: each refuses it (the kit pins ``dp = true``).

The first tests check what ``fedshop deploy`` writes, without starting anything (fast).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography import x509

from client import release, warm
from client.merchant import Merchant, NodeIdentity
from client.trainer import planned_steps
from server import checkpoint as ckpt
from server import deploy
from server.ledger import PrivacyLedger
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, get_trainable
from shared.privacy.accounting import epsilon
from shared.privacy.events import MechanismEvent
from shared.run_files import LEDGER_FILE, METRICS_FILE, SUMMARY_FILE
from simulations import cli
from tests.helpers import deployment as dh
from tests.helpers import proc
from tests.helpers.merchants import write_merchants

MERCHANTS = ["shop-a", "shop-b", "shop-c"]
# A healthy training phase takes well under 30 s here (over 60 s when the machine is busy with
# other work); a SIGKILLed node is dropped by
# the SuperLink once its heartbeat lapses (<= 20 s: the kits declare 10 s, client.supernode), which
# ends the round before the timeout.
ROUND_TIMEOUT_S = 90.0
RUN_CONFIG = {
    "encoder": "tiny", "trainable": "lora", "num-server-rounds": 3, "merchants-per-round": 3,
    # Round 3 waits (bounded) for the restarted node instead of starting without it.
    "min-available-nodes": 3, "node-wait-timeout-s": 120.0,
    "max-local-steps": 2, "batch-size": 16, "max-seq-len": 32, "eval-max-examples": 16,
    "round-timeout-s": ROUND_TIMEOUT_S,
    "target-epsilon": 1000.0,  # the run asks for far more than any merchant allows
    # Training calls alone decide the budgets below (evaluation is accounted spend too, and
    # tests/privacy/test_release_evaluation.py covers it).
    "evaluate": False,
}


def fedshop(*args: str) -> list[str]:
    return proc.fedshop_command(*args)


def epsilon_after_calls(data_dir: Path, calls: tuple[int, ...]) -> list[float]:
    """ε of each number of training calls of one merchant under RUN_CONFIG (what its node will account)."""
    config = RunConfig.from_mapping(RUN_CONFIG)
    identity = NodeIdentity(merchant_id=data_dir.name, data_dir=data_dir, synthetic_index=None,
                            state_dir=data_dir / ".unused", target_epsilon=1.0, target_delta=config.target_delta,
                            device="cpu")
    train = Merchant(identity, config).split().train
    # units (the privacy unit, here the user), not records or task examples
    sample_rate, steps = planned_steps(release.unit_count(train, unit=config.privacy_unit), config)
    event = MechanismEvent(noise_multiplier=config.noise_multiplier, sample_rate=sample_rate, steps=steps,
                           max_grad_norm=config.max_grad_norm)
    return [epsilon([event] * k, config.target_delta) for k in calls]


def write_run_config(path: Path, values: dict) -> Path:
    lines = [f"{k} = {json.dumps(v) if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) else repr(v)}"
             for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def state(merchant_dir: Path) -> dict:
    return json.loads((merchant_dir / "state" / "privacy-state.json").read_text())


def state_epsilon(raw: dict) -> float:
    return epsilon([MechanismEvent.from_dict(e["event"]) for e in raw["entries"]], raw["target_delta"])


# --------------------------------------------------------------------------- fast: files only
def nginx_check(dep: deploy.Deployment) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on the deployment's generated configuration (Debian's nginx, from .ci/setup)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    (dep.superlink_dir / deploy.PROXY_DIR / "tmp").mkdir(parents=True, exist_ok=True)
    return subprocess.run([nginx, "-t", "-q", "-e", "stderr", "-p", str(dep.superlink_dir / deploy.PROXY_DIR),
                           "-c", str(dep.superlink_dir / deploy.PROXY_CONFIG)], capture_output=True, text=True)


def operator_files_rewritten(dep: deploy.Deployment) -> str:
    """``fedshop deploy scripts`` after the start script and nginx.conf were lost: what it writes back."""
    for name in (deploy.SUPERLINK_SCRIPT, deploy.PROXY_CONFIG):
        (dep.superlink_dir / name).unlink()
    assert cli.main(["deploy", "scripts", "--dir", str(dep.root)]) == 0
    return "\n".join((dep.superlink_dir / name).read_text() for name in (deploy.SUPERLINK_SCRIPT, deploy.PROXY_CONFIG))


def test_init_writes_a_ca_a_server_certificate_and_a_tls_superlink_script(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    assert cli.main(["deploy", "init", str(root), "--name", "fl.example.org", "shop-hub.local",
                     "--address", "192.0.2.7", "2001:db8::7", "--port", "40123"]) == 0
    dep = deploy.Deployment.load(root)
    # merchants dial the first address; a non-loopback deployment listens on all interfaces
    assert dep.superlink_address == "192.0.2.7:40123" and dep.bind_host == "0.0.0.0"
    ca = x509.load_pem_x509_certificate(dep.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate((dep.superlink_dir / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "shop-hub.local", "localhost"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"192.0.2.7", "2001:db8::7",
                                                                             "127.0.0.1", "::1"}
    for secret in (root / "ca" / "ca.key", dep.superlink_dir / "server.key"):
        assert secret.stat().st_mode & 0o077 == 0, secret
    cmd = deploy.superlink_command(dep)
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--database"):
        assert flag in cmd
    # the SuperLink itself (Control API included) listens on loopback only, on the next port
    assert dep.control_port == 40124
    assert "--insecure" not in cmd and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "40124"
    script = (dep.superlink_dir / deploy.SUPERLINK_SCRIPT).read_text()
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in script and "FLWR_TELEMETRY_ENABLED=0" in script
    subprocess.run(["sh", "-n", str(dep.superlink_dir / deploy.SUPERLINK_SCRIPT)], check=True)
    # the public port is nginx's: TLS with the SuperLink's certificate, the Fleet API only
    conf = (dep.superlink_dir / deploy.PROXY_CONFIG).read_text()
    assert "listen 0.0.0.0:40123 ssl;" in conf and "server 127.0.0.1:40124;" in conf
    assert "listen [::]:40123 ssl;" in conf  # its certificate names an IPv6 address: merchants may dial it
    assert f'ssl_certificate "{dep.superlink_dir / "server.crt"}";' in conf and "proxy_ssl_verify on;" in conf
    assert re.findall(r"location (.*) \{", conf) == ["~ ^/v1/fleet/[a-z][a-z-]*$", "/"]
    assert nginx_check(dep).returncode == 0, nginx_check(dep).stderr
    assert f"{script}\n{conf}" == operator_files_rewritten(dep)
    connection = tomllib.loads((dep.flwr_home / "config.toml").read_text())["superlink"]
    assert connection["default"] == deploy.CONNECTION
    assert connection[deploy.CONNECTION] == {"address": "127.0.0.1:40124", "root-certificates": str(dep.ca_cert)}
    with pytest.raises(deploy.DeployError, match="control-port"):
        deploy.init_deployment(tmp_path / "same-port", names=[], addresses=["127.0.0.1"], port=9100, control_port=9100)
    # a deployment.json from before the proxy says what to do
    legacy = json.loads((root / deploy.DEPLOYMENT_FILE).read_text())
    del legacy["control_port"]
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / deploy.DEPLOYMENT_FILE).write_text(json.dumps(legacy))
    with pytest.raises(deploy.DeployError, match="control_port.*fedshop deploy scripts"):
        deploy.Deployment.load(tmp_path / "legacy")
    with pytest.raises(FileExistsError):  # a second CA would lock every merchant out
        deploy.init_deployment(root, names=["x.org"], addresses=[])
    with pytest.raises(deploy.DeployError):
        deploy.init_deployment(tmp_path / "bad", names=[], addresses=["not-an-ip"])


def test_a_merchant_may_dial_the_deployments_ipv6_address(tmp_path: Path) -> None:
    """nginx listens on every address family the deployment's certificate names. A loopback
    deployment on ``::1`` listens there beside 127.0.0.1, and a merchant dialing [::1]
    completes the TLS handshake with the federation's CA (real nginx); one on 127.0.0.1 alone
    listens on IPv4 only."""
    port, control, port4, control4 = dh.free_ports(4)
    dep = deploy.init_deployment(tmp_path / "fed", names=[], addresses=["::1"], port=port, control_port=control)
    assert dep.bind_host == "127.0.0.1" and dep.superlink_address == f"[::1]:{port}"
    conf_path = dep.superlink_dir / deploy.PROXY_CONFIG
    conf = conf_path.read_text()
    assert f"listen 127.0.0.1:{port} ssl;" in conf and f"listen [::1]:{port} ssl;" in conf
    assert nginx_check(dep).returncode == 0, nginx_check(dep).stderr
    ipv4 = deploy.init_deployment(tmp_path / "v4", names=[], addresses=["127.0.0.1"], port=port4,
                                  control_port=control4)
    assert "listen [" not in (ipv4.superlink_dir / deploy.PROXY_CONFIG).read_text()

    prefix = dep.superlink_dir / deploy.PROXY_DIR
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proxy = subprocess.Popen([nginx, "-e", "stderr", "-p", str(prefix), "-c", str(conf_path)],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                raw = socket.create_connection(("::1", port), timeout=2)
                break
            except OSError:
                assert proxy.poll() is None, proxy.communicate()[1]
                assert time.monotonic() < deadline, "nginx never listened on [::1]"
                time.sleep(0.1)
        context = ssl.create_default_context(cafile=str(dep.ca_cert))
        with context.wrap_socket(raw, server_hostname="::1") as tls:  # verifies the chain and the name
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        proxy.terminate()
        proxy.communicate(timeout=30)


def test_add_merchant_writes_its_key_node_config_and_start_script(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.common.config import parse_config_args

    dep = deploy.init_deployment(tmp_path / "fed", names=["localhost"], addresses=["127.0.0.1"], port=40124)
    assert dep.bind_host == "127.0.0.1"
    data = tmp_path / "data dir" / "shop-a"  # a space in a path is fine
    assert cli.main(["deploy", "add-merchant", "shop-a", "--dir", str(dep.root), "--data-dir", str(data),
                     "--budget", "3.5", "--delta", "1e-6", "--device", "cuda", "--no-register"]) == 0
    a = deploy.MerchantKit.load(dep.merchants_dir / "shop-a")
    key = load_ssh_private_key((a.dir / deploy.NODE_KEY).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert (a.dir / deploy.NODE_KEY).stat().st_mode & 0o077 == 0
    registered = load_ssh_public_key(a.public_key.read_bytes())
    assert isinstance(registered, ec.EllipticCurvePublicKey)
    assert registered.public_numbers() == key.public_key().public_numbers()
    assert (a.dir / "ca.crt").read_bytes() == dep.ca_cert.read_bytes()
    cmd = deploy.supernode_command(a)
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:40124"
    assert cmd[cmd.index("--root-certificates") + 1] == "ca.crt"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == deploy.NODE_KEY
    assert cmd[cmd.index("--port") + 1] == str(deploy.FIRST_SUPERNODE_PORT)
    # the node config is what flower-supernode parses and client/merchant.py resolve_node reads
    assert parse_config_args([cmd[cmd.index("--node-config") + 1]]) == {
        "merchant-id": "shop-a", "data-dir": str(data), "state-dir": str(a.dir / "state"),
        "target-epsilon": 3.5, "target-delta": 1e-6, "device": "cuda", "dp": "true"}
    # the node launches no ClientApp itself: the script's warm ClientApp processes serve its port
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert deploy.clientapp_command(a)[1:] == ["-m", "client.warm", "--runtime-api-address",
                                               f"127.0.0.1:{deploy.FIRST_SUPERNODE_PORT}",
                                               "--superexec-auth-secret-file", deploy.SUPEREXEC_SECRET]
    # the node and its launcher share a secret (Flower's SuperExec authentication of each task claim)
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == deploy.SUPEREXEC_SECRET
    script = a.dir / deploy.SUPERNODE_SCRIPT
    subprocess.run(["sh", "-n", str(script)], check=True)
    assert (f'"$python" -m client.warm --runtime-api-address 127.0.0.1:{a.port} --superexec-auth-secret-file '
            f'{deploy.SUPEREXEC_SECRET} --parent-pid "$$" &') in script.read_text()
    assert not (a.dir / deploy.SUPEREXEC_SECRET).exists()  # made on the merchant's machine, at its first start
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in script.read_text()
    # the folder can be moved to the merchant's machine: its state lives wherever the script runs
    assert "state-dir='$PWD/state'" in script.read_text() and a.privacy_state == a.dir / "state" / "privacy-state.json"

    # a second merchant on the same host gets its own Runtime API port
    b = deploy.add_merchant(dep, "shop-b", data_dir=tmp_path / "b", budget=8, delta=1e-5)
    assert b.port != a.port
    with pytest.raises(FileExistsError):
        deploy.add_merchant(dep, "shop-b", data_dir=tmp_path / "b", budget=8, delta=1e-5)
    for taken in (a.port, dep.port, dep.control_port):
        with pytest.raises(deploy.DeployError, match="already used"):
            deploy.add_merchant(dep, "shop-c", data_dir=tmp_path / "c", budget=8, delta=1e-5, port=taken)
    with pytest.raises(deploy.DeployError, match="single quote"):
        deploy.add_merchant(dep, "shop-d", data_dir=tmp_path / "it's", budget=8, delta=1e-5)
    for budget, delta, device in ((0.0, 1e-5, "cpu"), (float("inf"), 1e-5, "cpu"), (8.0, 1.0, "cpu"),
                                  (8.0, 1e-5, "tpu")):
        with pytest.raises(deploy.DeployError):
            deploy.add_merchant(dep, "shop-e", data_dir=tmp_path / "e", budget=budget, delta=delta, device=device)
    with pytest.raises(deploy.DeployError, match="merchant name"):
        deploy.add_merchant(dep, "../escape", data_dir=tmp_path / "e", budget=8, delta=1e-5)

    # a merchant that keeps its private key sends only the public half
    _, public = deploy.make_node_key()
    (tmp_path / "theirs.pub").write_bytes(public)
    f = deploy.add_merchant(dep, "shop-f", data_dir=tmp_path / "f", budget=8, delta=1e-5,
                            public_key=tmp_path / "theirs.pub")
    assert not (f.dir / deploy.NODE_KEY).exists() and f.public_key.read_bytes() == public
    (tmp_path / "rsa.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC0 x\n")
    with pytest.raises(deploy.DeployError):
        deploy.add_merchant(dep, "shop-g", data_dir=tmp_path / "g", budget=8, delta=1e-5,
                            public_key=tmp_path / "rsa.pub")


def test_insecure_mode_needs_the_flag_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "fed"
    assert cli.main(["deploy", "init", str(root), "--address", "127.0.0.1", "--insecure"]) == 0
    assert "NOT encrypted" in capsys.readouterr().err
    dep = deploy.Deployment.load(root)
    cmd = deploy.superlink_command(dep)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd and "--ssl-certfile" not in cmd
    assert deploy.INSECURE_WARNING in (dep.superlink_dir / deploy.SUPERLINK_SCRIPT).read_text()
    conf = (dep.superlink_dir / deploy.PROXY_CONFIG).read_text()  # still only the Fleet API on the public port
    assert "ssl" not in conf and "proxy_pass http://superlink$uri;" in conf and nginx_check(dep).returncode == 0
    assert cli.main(["deploy", "add-merchant", "shop-a", "--dir", str(root), "--data-dir", str(tmp_path),
                     "--budget", "8", "--delta", "1e-5"]) == 0  # nothing to register without node auth
    assert "NOT encrypted" in capsys.readouterr().err
    node = deploy.supernode_command(deploy.MerchantKit.load(dep.merchants_dir / "shop-a"))
    assert "--insecure" in node and "--root-certificates" not in node
    # and without --insecure there is no way to get an unencrypted SuperLink
    secure = deploy.init_deployment(tmp_path / "secure", names=[], addresses=["127.0.0.1"])
    assert "--insecure" not in deploy.superlink_command(secure)


# --------------------------------------------------------------------------- slow: real processes
@dataclasses.dataclass
class Federation:
    """The module's one deployment, left running (SuperLink and SuperNodes) for its tests."""

    tmp: Path
    env: dict[str, str]
    dep: deploy.Deployment
    merchants: dict[str, deploy.MerchantKit]
    budgets: dict[str, float]
    eps_shop_b: list[float]  # shop-b's ε after 1, 2 and 3 training calls
    group: dh.Services
    superlink: dh.Service
    nodes: dict[str, dh.Service]  # the SuperNodes now running (shop-c: the restarted one)
    run_dir: Path  # the main run's
    run_exit: int | None
    shop_c_before_kill: dict  # shop-c's privacy state as it was killed
    states_after: dict[str, dict]  # every merchant's privacy state after the main run
    rogues: dict[str, tuple[dh.Service, int | None]]  # intruder -> (its process, its exit code)
    starved: dh.Service
    starved_dir: Path
    timings: dict[str, float]
    main_run_id: int | None  # as its `flwr run` reported it
    operator_ls: proc.Run | None  # that `flwr ls`, on the SuperLink's loopback port
    as_merchant: dict[str, proc.Run]  # flwr ls / stop / run / supernode register with a merchant's ca.crt
    probes: dict[tuple[str, str], tuple[tuple[int, str], tuple[int, str]]]  # (public port, loopback) answers

    def submit(self, name: str, values: dict) -> dh.Service:
        """``flwr run`` of this project with ``values`` as its run config, against the operator's connection."""
        config = write_run_config(self.tmp / f"{name}.toml", values)
        cmd = [str(dh.VENV_BIN / "flwr"), "run", str(proc.REPO), deploy.CONNECTION, "--stream", "--run-config",
               str(config)]
        return self.group.start(name, cmd, env={**self.env, "FLWR_HOME": str(self.dep.flwr_home)})


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Set up the deployment, run the main run with its faults, keep the processes for the tests.

    Only what the next step depends on is asserted here; the tests check the rest."""
    tmp_path = tmp_path_factory.mktemp("deploy")
    t_start = time.monotonic()
    data = tmp_path / "data"
    write_merchants(data, MERCHANTS)
    root = tmp_path / "fed"
    logs = tmp_path / "logs"
    superlink_port, *node_ports = dh.free_ports(7)
    # FEDSHOP_RESTART_DELAY_S: the merchant's script retries a failed (re)start every 5 s (the restarted
    # node is let back in once its old heartbeat lapses; a shorter retry finds that moment sooner).
    env = dh.deploy_env({"FLWR_HOME": str(tmp_path / "nobody-home"), "FEDSHOP_RESTART_DELAY_S": "5"})

    # ---- operator: CA, server certificate, SuperLink script ------------------------------
    init = dh.run_cli(fedshop("deploy", "init", str(root), "--name", "localhost", "--address", "127.0.0.1",
                              "--port", str(superlink_port)), log_dir=logs / "init", env=env)
    assert init.returncode == 0, init.describe()
    dep = deploy.Deployment.load(root)

    # shop-b's own budget allows two training calls, not three (ε from its own data and the
    # mechanism the run will use); shop-a and shop-c allow plenty.
    eps = epsilon_after_calls(data / "shop-b", (1, 2, 3))
    budgets = {"shop-a": 50.0, "shop-b": (eps[1] + eps[2]) / 2, "shop-c": 50.0}

    with dh.services(logs, env) as group:
        superlink = group.start("superlink", ["sh", str(dep.superlink_dir / deploy.SUPERLINK_SCRIPT)])
        superlink.wait_for(r"Uvicorn running on https://127\.0\.0\.1", timeout_s=60)

        # ---- merchants: key pairs, node configs, registration with the running SuperLink --
        adds = [group.start(f"add-{m}", fedshop("deploy", "add-merchant", m, "--dir", str(root), "--data-dir",
                                                str(data / m), "--budget", repr(budgets[m]), "--delta", "1e-5",
                                                "--device", "cpu", "--port", str(port)))
                for m, port in zip(MERCHANTS, node_ports, strict=False)]
        for add in adds:
            assert add.wait_exit(120) == 0, add.tail()
        merchants = {m.name: m for m in dep.merchants()}
        assert sorted(merchants) == MERCHANTS
        for m in merchants.values():
            assert m.node_id, f"{m.name} was not registered"

        nodes = {name: group.start(name, ["sh", str(merchants[name].dir / deploy.SUPERNODE_SCRIPT)])
                 for name in MERCHANTS}
        for name, node in nodes.items():
            node.wait_for(rf"SuperNode ID: {merchants[name].node_id}\b", timeout_s=90)
            node.wait_for(re.escape(warm.READY), timeout_s=120)  # its ClientApp launcher has imported

        fed = Federation(tmp=tmp_path, env=env, dep=dep, merchants=merchants, budgets=budgets, eps_shop_b=eps,
                         group=group, superlink=superlink, nodes=nodes, run_dir=tmp_path / "run", run_exit=None,
                         shop_c_before_kill={}, states_after={}, rogues={}, starved=superlink,
                         starved_dir=tmp_path / "run-starved", timings={}, main_run_id=None, operator_ls=None,
                         as_merchant={}, probes={})

        # ---- the run: `flwr run` against the operator's connection ------------------------
        t_submit = time.monotonic()
        run = fed.submit("flwr-run", {**RUN_CONFIG, "run-dir": str(fed.run_dir)})

        # Round 2 reaches shop-c: kill its whole SuperNode (script, node, ClientApp processes) as the
        # training message arrives, i.e. mid-round, before it could train or spend anything.
        nodes["shop-c"].wait_for(r"Receiving: train message", count=2, timeout_s=240)
        t_kill = time.monotonic()
        nodes["shop-c"].kill()
        fed.shop_c_before_kill = state(merchants["shop-c"].dir)
        restarted = group.start("shop-c-restarted", ["sh", str(merchants["shop-c"].dir / deploy.SUPERNODE_SCRIPT)])
        nodes["shop-c"] = restarted

        # While the round waits for the dead node, the machine is idle enough for the rest:
        # ---- intruders: none of them may get a node id -----------------------------------
        rogue_dir = tmp_path / "rogue"
        rogue_dir.mkdir()
        private, rogue_public = deploy.make_node_key()
        deploy.write_secret(rogue_dir / "key", private)
        rogue_config = f"merchant-id='rogue' data-dir='{data / 'shop-a'}' state-dir='{rogue_dir / 'state'}'"
        base = ["flower-supernode", "--superlink", dep.superlink_address, "--node-config", rogue_config]
        rogues = {
            "rogue-unregistered": group.start("rogue-unregistered", [
                *base, "--root-certificates", str(dep.ca_cert), "--auth-supernode-private-key",
                str(rogue_dir / "key"), "--port", str(node_ports[3])]),
            "rogue-no-ca": group.start("rogue-no-ca", [*base, "--port", str(node_ports[4])]),
            "rogue-plain-http": group.start("rogue-plain-http", [*base, "--insecure", "--max-retries", "3",
                                                                 "--port", str(node_ports[5])]),
        }
        # ---- a second run that needs a fourth merchant gives up after its bounded wait ----
        t_starved = time.monotonic()
        fed.starved = fed.submit("flwr-run-starved", {
            **RUN_CONFIG, "num-server-rounds": 1, "min-available-nodes": 4, "node-wait-timeout-s": 10.0,
            "run-dir": str(fed.starved_dir)})

        # ---- a merchant's credentials at the Control API: refused on the public port -------
        flwr = str(dh.VENV_BIN / "flwr")
        fed.operator_ls = dh.run_cli([flwr, "ls", deploy.CONNECTION, "--format", "json"], log_dir=logs / "operator-ls",
                                     env={**env, "FLWR_HOME": str(dep.flwr_home)})
        started = re.search(r"Successfully started run (\d+)", run.text())
        assert started, run.tail()
        fed.main_run_id = int(started.group(1))
        merchant_home = dh.flwr_home(tmp_path / "merchant-home", address=dep.superlink_address,
                                     root_certificates=merchants["shop-a"].dir / "ca.crt")
        (rogue_dir / "key.pub").write_bytes(rogue_public)
        attempts = {
            "ls": [flwr, "ls", deploy.CONNECTION],
            "stop": [flwr, "stop", str(fed.main_run_id), deploy.CONNECTION],
            "supernode-register": [flwr, "supernode", "register", str(rogue_dir / "key.pub"), deploy.CONNECTION],
            "run": [flwr, "run", str(proc.REPO), deploy.CONNECTION, "--run-config", str(write_run_config(
                tmp_path / "merchant-run.toml", {**RUN_CONFIG, "run-dir": str(tmp_path / "run-merchant")}))],
        }
        fed.as_merchant = {name: dh.run_cli(cmd, log_dir=logs / f"merchant-{name}",
                                            env={**env, "FLWR_HOME": str(merchant_home)})
                           for name, cmd in attempts.items()}
        fed.probes = {(method, path): (dh.probe(dep.superlink_address, method, path, ca=dep.ca_cert),
                                       dh.probe(dep.control_address, method, path, ca=dep.ca_cert))
                      for method, path in dh.OFF_LIMITS}
        # The SuperLink refuses the same key while the dead process still counts as online
        # (until its heartbeat lapses); the script keeps trying until it is let back in.
        rejoined = re.compile(rf"SuperNode ID: {merchants['shop-c'].node_id}\b")
        t_back = t_starved_done = None
        while t_back is None or t_starved_done is None:
            now = time.monotonic()
            if t_back is None and rejoined.search(restarted.text()):
                t_back = now
            if t_starved_done is None and not fed.starved.alive():
                t_starved_done = now
            assert now - t_kill < 150, f"restarted shop-c rejoined: {t_back is not None}; the run short of " \
                f"nodes ended: {t_starved_done is not None}\n{restarted.tail()}\n{fed.starved.tail()}"
            time.sleep(0.2)

        fed.run_exit = run.wait_exit(300)
        t_done = time.monotonic()
        # The intruders gave up (or were turned away) long before the run ended.
        fed.rogues = {name: (rogue, rogue.wait_exit(60)) for name, rogue in rogues.items()}
        fed.states_after = {m: state(merchants[m].dir) for m in MERCHANTS}
        fed.timings = {
            "setup_s": t_submit - t_start,
            "run_s": t_done - t_submit,
            "starved_run_failed_after_s": t_starved_done - t_starved,
            "kill_to_done_s": t_done - t_kill,
            "kill_to_rejoined_s": t_back - t_kill,
        }
        yield fed


@pytest.mark.slow
def test_deployment_tls_auth_faults_and_budgets(federation: Federation) -> None:
    fed = federation
    dep, merchants, budgets, eps = fed.dep, fed.merchants, fed.budgets, fed.eps_shop_b
    assert fed.run_exit == 0, fed.group.logs()

    # ---- what `fedshop deploy init` wrote for the operator ----------------------------------
    assert dep.bind_host == "127.0.0.1" and dep.superlink_address.startswith("127.0.0.1:")
    ca = x509.load_pem_x509_certificate(dep.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate((dep.superlink_dir / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert (dep.root / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    script = (dep.superlink_dir / deploy.SUPERLINK_SCRIPT).read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1", "FLWR_TELEMETRY_ENABLED=0"):
        assert flag in script
    assert "--insecure" not in script

    # ---- what `fedshop deploy add-merchant` wrote for each merchant --------------------------
    assert eps[0] < eps[1] < eps[2]
    for m in merchants.values():
        assert (m.dir / deploy.NODE_KEY).stat().st_mode & 0o077 == 0
        text = (m.dir / deploy.SUPERNODE_SCRIPT).read_text()
        assert "--root-certificates ca.crt" in text and "--auth-supernode-private-key node-key" in text
        assert f"merchant-id='{m.name}'" in text and f"target-epsilon={budgets[m.name]!r}" in text

    # ---- the ledger and the run's record ----------------------------------------------------
    run_dir = fed.run_dir
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        rows = ledger.rows()
    outcome = {(r.round, r.merchant_id): r for r in rows}
    metrics = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert json.loads((run_dir / SUMMARY_FILE).read_text())

    # round 1: everyone trained
    assert {m: outcome[(1, m)].status for m in MERCHANTS} == dict.fromkeys(MERCHANTS, "accepted")
    # round 2: shop-c died mid-round; the round completed with the other two, in bounded time
    assert sorted(metrics[1]["accepted"]) == ["shop-a", "shop-b"]
    assert list(metrics[1]["failed"]) == ["shop-c"]
    assert (2, "shop-c") not in outcome
    assert metrics[1]["wall_s"] < ROUND_TIMEOUT_S + 15
    # round 3: shop-b's own budget refuses what the run asked for; shop-c is back
    refused = outcome[(3, "shop-b")]
    assert refused.status == "refused" and "budget" in refused.reason
    assert refused.epsilon_budget == pytest.approx(budgets["shop-b"])  # the node's ε, not the run's 1000
    assert refused.epsilon_reported == pytest.approx(eps[1], rel=1e-6)
    assert fed.states_after["shop-b"]["target_epsilon"] == pytest.approx(budgets["shop-b"])
    assert outcome[(3, "shop-a")].status == "accepted" and outcome[(3, "shop-c")].status == "accepted"

    # the restarted node's ε continued from its state file: same history plus one call
    before, after = fed.shop_c_before_kill, fed.states_after["shop-c"]
    assert len(before["entries"]) == 1
    assert after["entries"][: len(before["entries"])] == before["entries"]
    assert len(after["entries"]) == len(before["entries"]) + 1
    eps_before, eps_after = state_epsilon(before), state_epsilon(after)
    assert eps_after > eps_before + 0.1
    assert outcome[(3, "shop-c")].epsilon_reported == pytest.approx(eps_after, rel=1e-6)

    # a merchant audits its own record
    audit = dh.run_cli(fedshop("audit", "--node-state", str(merchants["shop-c"].privacy_state), str(run_dir)),
                       log_dir=fed.tmp / "logs" / "audit", env=fed.env)
    assert audit.returncode == 0, audit.describe()

    durations = {**{k: round(v, 1) for k, v in fed.timings.items()},
                 "round_wall_s": [round(m["wall_s"], 1) for m in metrics],
                 "slowest_train_s": [round(m.get("slowest_train_s", 0.0), 1) for m in metrics]}
    print(f"\ndeployment timings: {json.dumps(durations)}", file=sys.stderr)


@pytest.mark.slow
def test_every_message_was_served_by_a_warm_clientapp_process(federation: Federation) -> None:
    """Issue #24: the nodes run ``--isolation process`` beside fedshop's warm ClientApp launcher
    (client/warm.py): it imported the ClientApp's libraries once, before any task, and one
    long-lived process forked from it served every message the node received, keeping the
    node's caches between them; the node launched no ``flwr-clientapp``."""
    for name in ("shop-a", "shop-b"):  # never killed: one log from start to end
        text = federation.nodes[name].text()
        received = re.findall(r"Receiving: (\w+) message", text)
        assert len(received) >= 3, text[-4000:]
        assert text.count(warm.READY) == 1, text[-4000:]  # one warm-up for all of them
        assert text.index(warm.READY) < text.index("Receiving:")
        took = re.findall(re.escape(warm.TOOK_TASK) + r" \d+ \(process (\d+);", text)
        assert len(took) == len(received) and len(set(took)) == 1, text[-4000:]
        assert re.findall(re.escape(warm.SERVING) + r" in process (\d+)", text) == took[:1], text[-4000:]
        assert "Start `flwr-clientapp` process" not in text and "flower-superexec" not in text


def test_only_the_nodes_own_launcher_can_claim_its_tasks(federation: Federation,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Each start script made its node's SuperExec secret (32 random bytes, owner-only), and its
    node requires Flower's SuperExec authentication of every task claim: a claim without the
    signature, or signed with another secret, is refused; the launcher's own signed claim is not."""
    secrets = set()
    for kit in federation.merchants.values():
        path = kit.dir / deploy.SUPEREXEC_SECRET
        assert path.stat().st_size == 32 and path.stat().st_mode & 0o077 == 0, path
        secrets.add(path.read_bytes())
    assert len(secrets) == len(federation.merchants)  # one per node
    kit = federation.merchants["shop-a"]
    address = f"127.0.0.1:{kit.port}"
    for source in (warm.TaskSource(address), warm.TaskSource(address, b"not the node's secret")):
        with pytest.raises(httpx.HTTPStatusError, match="401 Unauthorized"):
            source.client.AcquireTask(source.request)
    own = warm.TaskSource(address, (kit.dir / deploy.SUPEREXEC_SECRET).read_bytes())
    assert not own.client.AcquireTask(own.request).HasField("task")  # accepted; no task is pending
    # A launcher whose claims are refused says so (once a minute), rather than wait in silence.
    stranger = warm.TaskSource(address, b"not the node's secret")
    with caplog.at_level(logging.WARNING, logger="client.warm"):
        assert stranger.next() is None and stranger.next() is None
    assert [r.getMessage() for r in caplog.records if r.name == "client.warm"] == [
        f"the node at {address} refuses this launcher's task claims (401): start both with the same "
        "--superexec-auth-secret-file (the merchant's start script does)"]


def _unboxed(text: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.slow
def test_a_merchants_credentials_cannot_list_submit_or_stop_runs(federation: Federation) -> None:
    """Issue #24: Flower 1.42 serves the Control API on the SuperLink's one port and authenticates
    no caller there (outside Flower Enterprise its account plugin is a no-op). So the SuperLink
    listens on loopback and nginx holds the public port, passing only the Fleet API: with a
    merchant's ``ca.crt``, ``flwr ls``, ``flwr stop`` of the running main run, ``flwr run`` and
    ``flwr supernode register`` are refused there, while the operator's ``flwr`` on the loopback
    port listed the runs and every SuperNode trained through the public port."""
    fed = federation
    dep = fed.dep
    sl_log = fed.superlink.text()
    assert f"Uvicorn running on https://127.0.0.1:{dep.control_port}" in sl_log
    assert dep.port != dep.control_port and dep.superlink_address.endswith(f":{dep.port}")

    # the operator's path: the SuperLink's own port, which listed the main run while it ran
    assert fed.operator_ls is not None and fed.operator_ls.returncode == 0, fed.operator_ls
    runs = {int(r["run-id"]): r["status"] for r in json.loads(fed.operator_ls.stdout)["runs"]}
    assert fed.main_run_id is not None and runs[fed.main_run_id] == "running", runs

    # a merchant's: each Control API call answered by the proxy, never by the SuperLink
    assert sorted(fed.as_merchant) == ["ls", "run", "stop", "supernode-register"]
    for name, attempt in fed.as_merchant.items():
        assert attempt.returncode not in (None, 0), f"{name}: {attempt.describe()}"
        assert deploy.REFUSAL in _unboxed(attempt.output), f"{name}: {attempt.describe()}"
    assert not (fed.tmp / "run-merchant").exists()  # its `flwr run` started no ServerApp
    # the merchant's `flwr stop` stopped nothing: the main run went on to its last round
    assert [json.loads(line)["round"] for line in (fed.run_dir / METRICS_FILE).read_text().splitlines()] == [1, 2, 3]
    assert (fed.run_dir / SUMMARY_FILE).is_file()

    # the same requests, as sent: refused on the public port, served on the loopback one (so a
    # public port that forwarded them would be caught here); dot segments do not get past nginx
    for (method, path), (public, _) in fed.probes.items():
        assert public[0] == 403 and json.loads(public[1]) == {"detail": deploy.REFUSAL}, (method, path, public)
    for served in (("POST", "/v1/control/list-runs"), ("GET", "/openapi.json")):
        assert fed.probes[served][1][0] == 200, (served, fed.probes[served][1])

    # everything nginx answered with success was a Fleet route; the nodes' traffic went through it
    access = (dep.superlink_dir / deploy.PROXY_DIR / deploy.ACCESS_LOG).read_text().splitlines()
    served_paths = [m.groups() for m in (re.search(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3}) ', line) for line in access)
                    if m and m.group(3).startswith("2")]
    assert {(method, path) for method, path, _ in served_paths} >= {
        ("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/push-messages"), ("POST", "/v1/fleet/activate-node")}
    assert all(method == "POST" and re.fullmatch(r"/v1/fleet/[a-z-]+", path) for method, path, _ in served_paths)


@pytest.mark.slow
def test_intruders_get_no_node_id(federation: Federation) -> None:
    """A key pair nobody registered, a node without the federation's CA, a node speaking plain HTTP."""
    for name, (rogue, code) in federation.rogues.items():
        assert code not in (None, 0), f"{name} was not refused\n{rogue.tail()}"
        assert "SuperNode ID" not in rogue.text(), rogue.tail()
    assert "No SuperNode found with the given public key" in federation.superlink.text()
    assert "CERTIFICATE_VERIFY_FAILED" in federation.rogues["rogue-no-ca"][0].text()


@pytest.mark.slow
def test_a_run_short_of_nodes_gives_up_after_its_bounded_wait(federation: Federation) -> None:
    starved = federation.starved
    assert not starved.alive()
    assert re.search(r"NotEnoughNodesError: only \d node\(s\) connected after waiting 10 s", starved.text()), \
        starved.tail()
    assert not (federation.starved_dir / METRICS_FILE).exists()


@pytest.mark.slow
def test_a_running_supernode_pinning_dp_refuses_a_non_private_run_and_the_ledger_shows_it(
        federation: Federation) -> None:
    """Issue #21: the merchants' kits pin ``dp = true`` in their SuperNodes' node config; a run
    submitted to the same SuperLink asking for ``dp = false`` is refused by every node: each
    ledger row is a refusal naming the pin, nobody trains or spends, and the model stays as
    it started."""
    fed = federation
    run_dir = fed.tmp / "run-dp-off"
    asked = {**RUN_CONFIG, "dp": False, "num-server-rounds": 1, "run-dir": str(run_dir)}
    run = fed.submit("flwr-run-dp-off", asked)
    assert run.wait_exit(300) == 0, fed.group.logs()

    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        rows = ledger.rows()
    assert sorted(r.merchant_id for r in rows) == MERCHANTS  # one row per merchant, all of them sampled
    for r in rows:
        assert (r.round, r.status) == (1, "refused"), r
        assert "pins dp = true" in r.reason and "dp = false" in r.reason, r.reason
        assert r.node_id == fed.merchants[r.merchant_id].node_id  # the reply came from the merchant's SuperNode
        assert r.event.mechanism.steps == 0 and r.event.unit_count == 0  # nothing released
    (round_1,) = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert round_1["accepted"] == [] and sorted(round_1["refused"]) == MERCHANTS
    assert round_1["failed"] == {} and round_1["rejected"] == {}

    # No merchant trained: nothing spent, nothing reserved, in any merchant's own state.
    for m in MERCHANTS:
        assert state(fed.merchants[m].dir) == fed.states_after[m], m
    # The refusing nodes are still up (a refusal is a reply, not a crash).
    assert all(node.alive() for node in fed.nodes.values()), fed.group.logs()

    # The run's model did not change: its checkpoint holds the initial parameters, bit for bit.
    checkpoint = ckpt.load_latest(run_dir)
    assert checkpoint is not None and checkpoint.round == 1
    start = dict(get_trainable(build_model(ModelSpec.from_config(RunConfig.from_mapping(asked)))))
    assert sorted(checkpoint.parameters) == sorted(start)
    changed = [k for k in start if not np.array_equal(checkpoint.parameters[k], start[k])]
    assert changed == [], changed


@pytest.mark.slow
def test_a_secure_aggregation_run_on_the_deployed_nodes(federation: Federation) -> None:
    """Issue #25: ``aggregation = secagg+`` on the deployment (TLS, node auth, warm ClientApps):
    each SuperNode runs Flower's SecAgg+ exchanges through fedshop's mod, and the context that
    carries a node's keys from one exchange to the next survives its ClientApp processes.
    shop-b's own budget is spent: it refuses, sending zeros at weight 0, and the round
    aggregates the other two."""
    fed = federation
    run_dir = fed.tmp / "run-secagg"
    asked = {**RUN_CONFIG, "num-server-rounds": 1, "aggregation": "secagg+", "run-dir": str(run_dir)}
    trains_before = fed.nodes["shop-a"].text().count("Receiving: train message")
    run = fed.submit("flwr-run-secagg", asked)
    assert run.wait_exit(300) == 0, fed.group.logs()

    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        rows = {r.merchant_id: r for r in ledger.rows()}
    assert {m: r.status for m, r in rows.items()} == {"shop-a": "accepted", "shop-b": "refused", "shop-c": "accepted"}
    assert "budget" in rows["shop-b"].reason
    (round_1,) = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert round_1["aggregated"] and round_1["failed"] == {} and round_1["bytes_received"] > 0
    for m in ("shop-a", "shop-c"):  # one more training call each, in their own records
        assert len(state(fed.merchants[m].dir)["entries"]) == len(fed.states_after[m]["entries"]) + 1, m
    assert state(fed.merchants["shop-b"].dir) == fed.states_after["shop-b"]
    # Every node answered the protocol's four exchanges of the round (then the evaluation).
    node_log = fed.nodes["shop-a"].text()
    assert node_log.count("Receiving: train message") == trains_before + 4, node_log[-3000:]
    checkpoint = ckpt.load_latest(run_dir)
    assert checkpoint is not None
    start = dict(get_trainable(build_model(ModelSpec.from_config(RunConfig.from_mapping(asked)))))
    assert any(not np.array_equal(checkpoint.parameters[k], start[k]) for k in start)
    audit = dh.run_cli(fedshop("audit", str(run_dir)), log_dir=fed.tmp / "logs" / "audit-secagg", env=fed.env)
    assert audit.returncode == 0, audit.describe()
