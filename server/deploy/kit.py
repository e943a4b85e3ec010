"""The operator's deployment folder and each merchant's kit: node config, start scripts,
registration with the SuperLink (see ``server.deploy`` for the layout)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.deploy.folders import (
    _NAME,
    CONNECTION,
    DEFAULT_SUPERLINK_PORT,
    DEPLOYMENT_FILE,
    FIRST_SUPERNODE_PORT,
    HERE,
    INSECURE_WARNING,
    NODE_KEY,
    PROCESS_ENV,
    SUPEREXEC_SECRET,
    SUPERLINK_SCRIPT,
    SUPERNODE_SCRIPT,
    Deployment,
    MerchantKit,
)
from server.deploy.pki import (
    DeployError,
    _private_pem,
    check_public_key,
    make_ca,
    make_node_key,
    make_server_certificate,
    write_secret,
)
from server.deploy.proxy import PROXY_CONFIG, PROXY_DIR, nginx_config
from shared.privacy.budget import PrivacyState


# --------------------------------------------------------------------------- commands
def superlink_command(dep: Deployment) -> list[str]:
    """``flower-superlink`` for this deployment (absolute paths; run it on the operator's machine).

    It listens on loopback only: merchants reach its Fleet API through nginx on the public port."""
    cmd = ["flower-superlink"]
    if dep.insecure:
        cmd.append("--insecure")
    else:
        sl = dep.superlink_dir
        cmd += ["--ssl-ca-certfile", str(dep.ca_cert), "--ssl-certfile", str(sl / "server.crt"),
                "--ssl-keyfile", str(sl / "server.key"), "--enable-supernode-auth"]
    cmd += ["--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(dep.control_port),
            "--database", str(dep.superlink_dir / "state.db")]
    return cmd


def supernode_command(merchant: MerchantKit, *, here: str | None = None, python: str = "python3") -> list[str]:
    """Flower's SuperNode for one merchant (``client.supernode``: ``flower-supernode``'s own entry
    point, polling the SuperLink every ``FEDSHOP_POLL_INTERVAL_S`` instead of Flower's fixed 3 s);
    run it with the merchant's folder as working directory."""
    cmd = [python, "-m", "client.supernode", "--superlink", merchant.superlink_address]
    if merchant.insecure:
        cmd.append("--insecure")
    else:
        # With --public-key the merchant made the pair and puts its private key here itself.
        cmd += ["--root-certificates", "ca.crt", "--auth-supernode-private-key", NODE_KEY]
    # One Runtime API port per SuperNode: several merchants' nodes on one host must differ.
    # --isolation process: the node launches no ClientApp itself; the start script's warm
    # ClientApp launcher (clientapp_command) claims its tasks on that port.
    cmd += ["--isolation", "process", "--host", "127.0.0.1", "--port", str(merchant.port),
            "--superexec-auth-secret-file", SUPEREXEC_SECRET, "--node-config", merchant.node_config(here)]
    return cmd


def clientapp_command(merchant: MerchantKit, *, python: str = "python3") -> list[str]:
    """The warm ClientApp launcher (``client.warm``) for the merchant's SuperNode: it imports the
    ClientApp's libraries once and forks one long-lived process that serves the node's tasks in
    turn with the pieces of Flower's ``run_clientapp``. The start script runs it with
    ``$FEDSHOP_PYTHON``, else python3."""
    return [python, "-m", "client.warm", "--runtime-api-address", f"127.0.0.1:{merchant.port}",
            "--superexec-auth-secret-file", SUPEREXEC_SECRET]


def process_env(*, flwr_home: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(PROCESS_ENV)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _shell_quote(arg: str) -> str:
    """shlex.quote, but a value holding single quotes (a node config) goes in double quotes,
    where ``HERE`` becomes ``$PWD`` (the start script runs in the merchant's folder)."""
    if "'" in arg or HERE in arg:
        escaped = re.sub(r'([\\"`$])', r"\\\1", arg)
        return '"' + escaped.replace(HERE, "$PWD") + '"'
    return shlex.quote(arg)


def shell_join(cmd: Sequence[str]) -> str:
    return " ".join(_shell_quote(a) for a in cmd)


def _command_lines(cmd: Sequence[str], indent: str) -> str:
    parts: list[str] = [_shell_quote(cmd[0])]  # one "--flag value" per line, for a reader
    for arg in cmd[1:]:
        if arg.startswith("--") or not parts[-1].startswith("--") or len(parts) == 1:
            parts.append(_shell_quote(arg))
        else:
            parts[-1] += " " + _shell_quote(arg)
    return f" \\\n{indent}    ".join(parts)


# The merchant's script runs the SuperNode (``--isolation process``) and, beside it, the warm
# ClientApp launcher (client/warm.py): it imports torch, transformers, Opacus and Flower once,
# then forks one long-lived process that serves the node's tasks in turn, so a message never
# waits for imports and the model and data stay loaded between messages. A loop starts the
# launcher again if it ever stops.
# A SuperNode exits when it cannot (re)join, most often right after a crash: the SuperLink
# counts the dead process as online until its heartbeat lapses (up to 60 s) and refuses a
# second activation of the same key until then. So the script starts it again, as a service
# manager would (the launcher keeps asking the node's port for tasks meanwhile); signals stop
# the script, the node and the ClientApp processes.
_RESTART_LOOP = """\
delay="${FEDSHOP_RESTART_DELAY_S:-30}"
python="${FEDSHOP_PYTHON:-python3}"
warm_clientapps() {
    app=""
    trap 'if [ -n "$app" ]; then kill -TERM "$app" 2>/dev/null; wait "$app"; fi; exit 143' INT TERM
    while :; do
        "$python" %(clientapp)s --parent-pid "$$" &
        app=$!
        wait "$app"
        app=""
        echo "fedshop: the warm ClientApp launcher stopped; starting it again in 1 s" >&2
        sleep 1
    done
}
apps=""
if ! "$python" -c 'import client.supernode, client.warm'; then
    echo "fedshop: $python cannot import fedshop's client.supernode: activate fedshop's virtual" \\
        "environment (or FEDSHOP_PYTHON=/path/to/its/python)" >&2
    exit 1
fi
# The node's and its ClientApp launcher's shared secret (Flower's SuperExec authentication): made
# here, on the merchant's machine, once; only this folder's owner can read it.
if [ ! -s %(secret)s ]; then
    (umask 077 && head -c 32 /dev/urandom > %(secret)s.tmp && mv %(secret)s.tmp %(secret)s) || exit 1
fi
isolation=subprocess  # FEDSHOP_WARM_CLIENTAPP=no: Flower's default, a fresh flwr-clientapp per message
if [ "${FEDSHOP_WARM_CLIENTAPP:-yes}" != no ]; then
    isolation=process
    warm_clientapps &
    apps=$!
fi
child=""
trap 'kill -TERM $apps $child 2>/dev/null; wait; exit 143' INT TERM
while :; do
    %(supernode)s &
    child=$!
    wait "$child"
    status=$?
    child=""
    if [ "$status" -eq 0 ] || [ "${FEDSHOP_RESTART:-yes}" = no ]; then
        kill -TERM $apps 2>/dev/null
        wait
        exit "$status"
    fi
    echo "fedshop: the SuperNode stopped (exit $status); starting it again in $delay s" \\
        "(FEDSHOP_RESTART=no: do not; Ctrl-C: stop)" >&2
    sleep "$delay" &
    child=$!
    wait "$child"
    child=""
done
"""


# The operator's script runs nginx (the public port, Fleet API only: ``server.deploy.proxy``)
# beside the SuperLink (loopback only), both in the foreground: when either stops, it stops
# the other, so the public port never outlives the SuperLink nor the other way round.
_WITH_PROXY = """\
nginx="${FEDSHOP_NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
mkdir -p %(prefix)s/tmp
if ! "$nginx" -t -q -e stderr -p "$PWD/%(prefix)s" -c "$PWD/%(config)s"; then
    echo "fedshop: nginx ($nginx) is missing or refuses %(config)s; it serves the public port" \\
        "(Debian/Ubuntu: apt-get install nginx; another binary: FEDSHOP_NGINX=/path/to/nginx)" >&2
    exit 1
fi
"$nginx" -e stderr -p "$PWD/%(prefix)s" -c "$PWD/%(config)s" &
proxy=$!
%(superlink)s &
link=$!
trap 'kill -TERM "$link" "$proxy" 2>/dev/null; wait; exit 143' INT TERM
while kill -0 "$link" 2>/dev/null && kill -0 "$proxy" 2>/dev/null; do
    sleep 1
done
if ! kill -0 "$proxy" 2>/dev/null; then
    echo "fedshop: nginx (the public port) stopped; stopping the SuperLink too" >&2
fi
kill -TERM "$link" "$proxy" 2>/dev/null
wait "$link"
status=$?
wait "$proxy"
exit "$status"
"""


def _script(lines: Sequence[str], cmd: Sequence[str], *, flwr_home: str, clientapp: Sequence[str] = (),
            proxy: bool = False) -> str:
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in PROCESS_ENV.items())
    head = ("#!/bin/sh\n" + "".join(f"# {line}\n" for line in lines) + "set -u\n" + 'cd "$(dirname "$0")"\n'
            + exports + "\n" + f'export FLWR_HOME="{flwr_home}"\n')
    if clientapp:
        # cmd = python -m client.supernode FLAGS...: the script's own "$python" runs it.
        supernode = ('"$python" -m ' + _command_lines(cmd[2:], "    ")).replace(
            "--isolation process", '--isolation "$isolation"', 1)
        return head + _RESTART_LOOP % {"supernode": supernode, "clientapp": shell_join(clientapp[1:]),
                                       "secret": shlex.quote(SUPEREXEC_SECRET)}
    if proxy:
        return head + _WITH_PROXY % {"prefix": PROXY_DIR, "config": PROXY_CONFIG,
                                     "superlink": _command_lines(cmd, "")}
    return head + f"exec {_command_lines(cmd, '')}\n"


def _write_script(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


def write_flwr_config(dep: Deployment) -> Path:
    """The operator's ``flwr`` connection (FLWR_HOME=DIR/flwr-home): ``flwr run APP fedshop``."""
    dep.flwr_home.mkdir(parents=True, exist_ok=True)
    path = dep.flwr_home / "config.toml"
    tls = "insecure = true\n" if dep.insecure else f"root-certificates = {json.dumps(str(dep.ca_cert))}\n"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "{dep.control_address}"\n' + tls, encoding="utf-8")
    return path


def _check_addresses(names: Sequence[str], addresses: Sequence[str]) -> None:
    if not names and not addresses:
        raise DeployError("give at least one --name or --address: merchants dial the SuperLink by it")
    for a in addresses:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise DeployError(f"--address {a!r} is not an IP address (host names go to --name)") from None
    for n in names:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", n):
            raise DeployError(f"--name {n!r} is not a DNS name")


def init_deployment(root: Path, *, names: Sequence[str], addresses: Sequence[str],
                    port: int = DEFAULT_SUPERLINK_PORT, control_port: int | None = None, bind_host: str | None = None,
                    public_address: str | None = None, insecure: bool = False, days: int = 825) -> Deployment:
    """Create DIR with the CA, the SuperLink certificate, start script and flwr connection."""
    root = Path(root).expanduser().resolve()
    if (root / DEPLOYMENT_FILE).exists():
        raise FileExistsError(f"{root} already holds a deployment; a new CA would lock out every merchant "
                              "set up with it. Choose another DIR.")
    _check_addresses(names, addresses)
    control_port = port + 1 if control_port is None else control_port
    for flag, value in (("--port", port), ("--control-port", control_port)):
        if not 1 <= value <= 65535:
            raise DeployError(f"{flag} {value}: not a TCP port")
    if control_port == port:
        raise DeployError(f"--control-port {control_port}: the public port is {port}; the SuperLink needs another")
    public = public_address or (addresses[0] if addresses else names[0])
    if bind_host is None:  # listen on loopback only when nobody else is meant to dial in
        loopback = all(ipaddress.ip_address(a).is_loopback for a in addresses) and set(names) <= {"localhost"}
        bind_host = "127.0.0.1" if loopback else "0.0.0.0"
    dep = Deployment(root=root, port=port, control_port=control_port, bind_host=bind_host, public_address=public,
                     names=tuple(names), addresses=tuple(addresses), insecure=insecure)
    nginx_config(dep)  # refuse a folder nginx cannot name before writing anything
    dep.superlink_dir.mkdir(parents=True, exist_ok=True)
    dep.merchants_dir.mkdir(parents=True, exist_ok=True)
    if not insecure:
        from cryptography.hazmat.primitives import serialization

        ca_key, ca_cert = make_ca("fedshop federation CA", days=max(days, 3650))
        key, cert = make_server_certificate(ca_key, ca_cert, names=names, addresses=addresses, days=days)
        dep.ca_cert.parent.mkdir(parents=True, exist_ok=True)
        write_secret(dep.root / "ca" / "ca.key", _private_pem(ca_key))
        dep.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        write_secret(dep.superlink_dir / "server.key", _private_pem(key))
        (dep.superlink_dir / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / DEPLOYMENT_FILE).write_text(json.dumps(dep.to_dict(), indent=1) + "\n", encoding="utf-8")
    write_operator_files(dep)
    return dep


def write_operator_files(dep: Deployment) -> None:
    """The SuperLink's start script and nginx.conf, and the operator's ``flwr`` connection, from
    deployment.json (``fedshop deploy scripts`` rewrites them; keys and certificates stay)."""
    header = ["fedshop SuperLink, generated by `fedshop deploy init`: runs the ServerApp for each `flwr run`.",
              f"Merchants' SuperNodes connect to port {dep.port} on {dep.bind_host}, where nginx ({PROXY_CONFIG})",
              "passes only the Fleet API; the SuperLink itself (Control API for the operator's flwr,",
              f"Runtime API for its ServerApps) listens on 127.0.0.1:{dep.control_port} only."]
    if dep.insecure:
        header.append(INSECURE_WARNING)
    (dep.superlink_dir / PROXY_DIR).mkdir(parents=True, exist_ok=True)
    (dep.superlink_dir / PROXY_CONFIG).write_text(nginx_config(dep), encoding="utf-8")
    _write_script(dep.superlink_dir / SUPERLINK_SCRIPT,
                  _script(header, superlink_command(dep), flwr_home=str(dep.superlink_dir / "flwr-home"),
                          proxy=True))
    write_flwr_config(dep)


def _next_port(dep: Deployment) -> int:
    used = {m.port for m in dep.merchants()} | {dep.port, dep.control_port}
    port = FIRST_SUPERNODE_PORT
    while port in used:
        port += 1
    return port


def add_merchant(dep: Deployment, name: str, *, data_dir: Path, budget: float, delta: float,
                 device: str = "auto", port: int | None = None, state_dir: Path | None = None,
                 public_key: Path | None = None) -> MerchantKit:
    """Create ``merchants/NAME``: key pair (or the merchant's public key), CA, node config, start script."""
    if not _NAME.fullmatch(name):
        raise DeployError(f"merchant name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    if not (budget > 0 and budget == budget and budget != float("inf")):
        raise DeployError(f"--budget {budget}: must be a finite ε > 0")
    if not 0 < delta < 1:
        raise DeployError(f"--delta {delta}: must lie strictly between 0 and 1")
    if device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise DeployError(f"--device {device!r}: one of auto, cpu, cuda, cuda:N, mps")
    directory = dep.merchants_dir / name
    if directory.exists():
        raise FileExistsError(f"{directory} exists: merchant {name!r} was added before")
    taken = {m.port: m.name for m in dep.merchants()}
    port = _next_port(dep) if port is None else port
    if port in taken or port in (dep.port, dep.control_port):
        raise DeployError(f"--port {port} is already used by {taken.get(port, 'the SuperLink')} in this deployment")
    data_dir = Path(data_dir).expanduser().resolve()
    state_dir = Path(state_dir).expanduser().resolve() if state_dir else None
    pub = check_public_key(public_key) if public_key else None
    merchant = MerchantKit(name=name, dir=directory, data_dir=data_dir, state_dir=state_dir,
                        target_epsilon=float(budget), target_delta=float(delta), device=device, port=port,
                        superlink_address=dep.superlink_address, insecure=dep.insecure,
                        has_private_key=pub is None)
    merchant.node_config()  # refuse quotes in paths before writing anything
    directory.mkdir(parents=True)
    if not dep.insecure:
        shutil.copyfile(dep.ca_cert, directory / "ca.crt")
        if pub is None:
            private, pub = make_node_key()
            write_secret(directory / NODE_KEY, private)
        merchant.public_key.write_bytes(pub)
    header = [f"fedshop SuperNode of merchant {name!r}, generated by `fedshop deploy add-merchant`.",
              f"Its privacy budget: ε = {budget:g} at δ = {delta:g} (node config target-epsilon/target-delta).",
              "What leaves this machine: trainable parameters, privacy facts, evaluation metrics."]
    if dep.insecure:
        header.append(INSECURE_WARNING)
    _write_script(directory / SUPERNODE_SCRIPT,
                  _script(header, supernode_command(merchant, here=HERE), flwr_home="$PWD/flwr-home",
                          clientapp=clientapp_command(merchant)))
    merchant.save()
    # The merchant's budget starts here, explicitly: its node refuses to train without a
    # privacy state (a lost file is not a new budget). Written where the node will look when
    # that is on this machine: in this folder by default (it travels with it), or at
    # --state-dir if the data folder is here too; otherwise the merchant creates it there
    # (``python -m shared.privacy.budget create``, named in the node's refusal).
    if state_dir is None or data_dir.is_dir():
        PrivacyState.create(merchant.privacy_state, merchant_id=name, target_epsilon=float(budget),
                            target_delta=float(delta))
    return merchant
