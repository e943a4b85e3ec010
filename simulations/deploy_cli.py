"""``fedshop deploy``: argument parsing and printing over ``server.deploy.kit``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from server.deploy import (
    CONNECTION,
    DEFAULT_SUPERLINK_PORT,
    INSECURE_WARNING,
    MERCHANT_FILE,
    NODE_KEY,
    PROXY_CONFIG,
    SUPERLINK_SCRIPT,
    SUPERNODE_SCRIPT,
    DeployError,
    Deployment,
    MerchantKit,
    add_merchant,
    clientapp_command,
    init_deployment,
    register_merchant,
    shell_join,
    superlink_command,
    supernode_command,
    write_operator_files,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fedshop deploy`` subcommands (wired into simulations/cli.py)."""
    sub = parser.add_subparsers(dest="deploy_command", required=True)
    init = sub.add_parser("init", help="create the CA, the SuperLink certificate and start script")
    init.add_argument("dir", type=Path, help="new deployment folder")
    init.add_argument("--name", nargs="+", default=[], metavar="HOST", help="DNS names merchants dial")
    init.add_argument("--address", nargs="+", default=[], metavar="IP", help="IP addresses merchants dial")
    init.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT,
                      help="the public port merchants dial (HTTPS; nginx, Fleet API only)")
    init.add_argument("--control-port", type=int, help="the SuperLink's own port, on 127.0.0.1 only: the "
                      "operator's flwr (Control API) and its ServerApps (default: --port + 1)")
    init.add_argument("--bind", help="interface the public port listens on (default: 127.0.0.1 for "
                      "loopback-only deployments, else 0.0.0.0)")
    init.add_argument("--public-address", help="host merchants dial (default: first --address, else first --name)")
    init.add_argument("--days", type=int, default=825, help="server certificate validity")
    init.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (test networks only)")

    add = sub.add_parser("add-merchant", help="create a merchant's SuperNode folder and register its key")
    add.add_argument("name", help="merchant id (also its folder name)")
    add.add_argument("--dir", type=Path, default=Path("."), help="deployment folder (default: .)")
    add.add_argument("--data-dir", type=Path, required=True, help="the merchant's data folder (on its machine)")
    add.add_argument("--budget", type=float, required=True, help="the merchant's total ε budget (a hard stop)")
    add.add_argument("--delta", type=float, required=True, help="the merchant's δ")
    add.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add.add_argument("--port", type=int, help="its SuperNode's Runtime API port (default: next free from 9094)")
    add.add_argument("--state-dir", type=Path, help="where its privacy state lives (default: merchants/NAME/state)")
    add.add_argument("--public-key", type=Path, help="the merchant's own OpenSSH ECDSA public key (it keeps the "
                     "private key); default: generate a key pair into the folder")
    add.add_argument("--no-register", action="store_true", help="do not contact the SuperLink now")

    scripts = sub.add_parser("scripts", help="rewrite the SuperLink's start script, nginx.conf and the operator's "
                             "flwr connection from deployment.json (keys and certificates stay)")
    scripts.add_argument("--dir", type=Path, default=Path("."), help="deployment folder (default: .)")

    reg = sub.add_parser("register", help="register a merchant's public key with the running SuperLink")
    reg.add_argument("name", nargs="+")
    reg.add_argument("--dir", type=Path, default=Path("."), help="deployment folder (default: .)")


def main(args: argparse.Namespace) -> int:
    if args.deploy_command == "init":
        return _cmd_init(args)
    dep = Deployment.load(args.dir)
    if args.deploy_command == "add-merchant":
        return _cmd_add_merchant(dep, args)
    if args.deploy_command == "scripts":
        write_operator_files(dep)
        _print_superlink(dep)
        return 0
    for name in args.name:
        directory = dep.merchants_dir / name
        if not (directory / MERCHANT_FILE).is_file():
            raise DeployError(f"no merchant {name!r} in {dep.root} (add it with `fedshop deploy add-merchant`)")
        print(f"merchant {name}: registered, node id {register_merchant(dep, MerchantKit.load(directory))}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    dep = init_deployment(args.dir, names=args.name, addresses=args.address, port=args.port,
                          control_port=args.control_port, bind_host=args.bind, public_address=args.public_address,
                          insecure=args.insecure, days=args.days)
    print(f"deployment in {dep.root}")
    if not dep.insecure:
        print(f"  CA certificate  {dep.ca_cert}  (merchants get a copy; keep ca/ca.key offline)")
        print(f"  server cert     {dep.superlink_dir / 'server.crt'}  (SANs: "
              f"{', '.join(dict.fromkeys([*dep.names, 'localhost', *dep.addresses, '127.0.0.1', '::1']))})")
    _print_superlink(dep)
    print("then add merchants:  fedshop deploy add-merchant NAME --dir "
          f"{shlex.quote(str(dep.root))} --data-dir PATH --budget EPS --delta D")
    print("and submit a run:    FLWR_HOME=" + shlex.quote(str(dep.flwr_home))
          + f" flwr run PATH/TO/fedshop {CONNECTION} --run-config \"run-dir='/abs/run/dir' ...\" --stream")
    return 0


def _print_superlink(dep: Deployment) -> None:
    print("start the SuperLink and its public port (needs nginx: apt-get install nginx):")
    print(f"  {dep.superlink_dir / SUPERLINK_SCRIPT}")
    print(f"  # nginx on {dep.bind_host}:{dep.port} (merchants dial {dep.superlink_address}) passes only the "
          f"Fleet API, as {dep.superlink_dir / PROXY_CONFIG} says, to")
    print("  # " + shell_join(superlink_command(dep)))
    print(f"  # on 127.0.0.1:{dep.control_port} only: your flwr (FLWR_HOME={dep.flwr_home}) and its ServerApps")


def _cmd_add_merchant(dep: Deployment, args: argparse.Namespace) -> int:
    if dep.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    merchant = add_merchant(dep, args.name, data_dir=args.data_dir, budget=args.budget, delta=args.delta,
                            device=args.device, port=args.port, state_dir=args.state_dir,
                            public_key=args.public_key)
    print(f"merchant {merchant.name}: folder {merchant.dir}")
    print(f"  budget ε = {merchant.target_epsilon:g} at δ = {merchant.target_delta:g}; device {merchant.device}; "
          f"privacy state {merchant.privacy_state}")
    if not merchant.has_private_key and not dep.insecure:
        print(f"  the merchant keeps its private key: it goes into {merchant.dir / NODE_KEY} on its machine")
    print(f"  start its SuperNode (on the merchant's machine): {merchant.dir / SUPERNODE_SCRIPT}")
    print("  # = (cd " + shlex.quote(str(merchant.dir)) + " && " + shell_join(supernode_command(merchant)) + ")")
    print("  #   beside its warm ClientApp launcher (a fork per task): "
          + shell_join(clientapp_command(merchant)))
    if dep.insecure or args.no_register:
        if not dep.insecure:
            print(f"  not registered yet: fedshop deploy register {merchant.name} --dir {shlex.quote(str(dep.root))}")
        return 0
    node_id = register_merchant(dep, merchant)
    print(f"  registered with the SuperLink: node id {node_id}")
    return 0
