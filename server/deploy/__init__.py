"""Operator tooling for a real federation (``fedshop deploy``): one SuperLink, one SuperNode per merchant.

    fedshop deploy init DIR --name HOST [HOST ...] --address IP [IP ...] [--port 9092] [--control-port 9093]
                        [--insecure]
    fedshop deploy add-merchant NAME --dir DIR --data-dir PATH --budget EPS --delta D
                                [--device auto] [--port P] [--state-dir PATH] [--public-key FILE]
    fedshop deploy register NAME --dir DIR
    fedshop deploy scripts --dir DIR

``init`` makes a certificate authority and a server certificate whose subject alternative
names are the given host names and IP addresses (plus loopback, which the SuperLink's own
ServerApp process uses), the SuperLink's start script (TLS on every API, SuperNode
authentication on, runtime dependency installation and telemetry off, a database file so
registered merchants survive a restart), and a ``flwr`` connection for the operator. The
SuperLink listens on 127.0.0.1:``--control-port`` only, because it authenticates no Control API
caller; the start script also runs nginx on the public ``--port``, which passes only the Fleet
API to it (``proxy``). The operator's ``flwr`` dials the loopback port.

``add-merchant`` makes one merchant's folder (hand it to the merchant): its node key pair
(ECDSA P-384, OpenSSH encoding, as ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register`` expect), the CA certificate, its node config (merchant id, data
and state folders, its own privacy budget, device) and its start script (the SuperNode with
``--isolation process`` beside warm ClientApp processes, ``client.warm``); then it registers
the public key with the running SuperLink through its Control API (``flwr supernode
register``). With ``--public-key`` the merchant keeps its private key and only the public
half is registered. ``register`` retries the registration later (SuperLink not yet up). ``scripts`` rewrites the
operator's generated files (start script, nginx.conf, flwr connection) from deployment.json.

Layout of DIR (the operator's machine)::

    deployment.json                 what init was asked for
    ca/ca.crt, ca/ca.key            the CA (keep ca.key offline once merchants are set up)
    superlink/server.crt, server.key, start-superlink.sh, state.db
    superlink/nginx.conf, proxy/    the public port: Fleet API only (proxy/access.log)
    flwr-home/config.toml           FLWR_HOME for the operator's ``flwr`` (connection "fedshop")
    merchants/NAME/                 one folder per merchant, see add_merchant

Insecure mode (no TLS, no node authentication: anyone who reaches the port can join) exists
only behind an explicit ``--insecure`` and says so loudly; it is for isolated test networks.

The rooms: ``pki`` (keys and certificates), ``folders`` (the deployment's and merchants'
folders as data), ``proxy`` (nginx's configuration for the public port), ``kit`` (making
them: start scripts, init, add-merchant), ``registration``
(node keys onto the running SuperLink). The ``fedshop deploy`` command line is
``simulations.deploy_cli``. This package re-exports their public names.
"""

from server.deploy.folders import (
    CONNECTION,
    DEFAULT_SUPERLINK_PORT,
    DEPLOYMENT_FILE,
    FIRST_SUPERNODE_PORT,
    HERE,
    INSECURE_WARNING,
    MERCHANT_FILE,
    NODE_KEY,
    PROCESS_ENV,
    SUPEREXEC_SECRET,
    SUPERLINK_SCRIPT,
    SUPERNODE_SCRIPT,
    Deployment,
    MerchantKit,
)
from server.deploy.kit import (
    add_merchant,
    clientapp_command,
    init_deployment,
    process_env,
    shell_join,
    superlink_command,
    supernode_command,
    write_flwr_config,
    write_operator_files,
)
from server.deploy.pki import (
    DeployError,
    check_public_key,
    make_ca,
    make_node_key,
    make_server_certificate,
    write_secret,
)
from server.deploy.proxy import ACCESS_LOG, PROXY_CONFIG, PROXY_DIR, REFUSAL, nginx_config
from server.deploy.registration import flwr_executable, register_merchant

__all__ = [
    "CONNECTION", "DEFAULT_SUPERLINK_PORT", "DEPLOYMENT_FILE", "FIRST_SUPERNODE_PORT", "HERE", "INSECURE_WARNING",
    "MERCHANT_FILE", "NODE_KEY", "PROCESS_ENV", "SUPEREXEC_SECRET", "SUPERLINK_SCRIPT", "SUPERNODE_SCRIPT",
    "DeployError", "Deployment",
    "MerchantKit", "add_merchant", "check_public_key", "clientapp_command", "flwr_executable", "init_deployment",
    "make_ca", "make_node_key", "make_server_certificate", "write_secret", "process_env", "register_merchant",
    "shell_join", "superlink_command", "supernode_command", "write_flwr_config", "write_operator_files",
    "ACCESS_LOG", "PROXY_CONFIG", "PROXY_DIR", "REFUSAL", "nginx_config",
]
