"""The deployment's folders as data: the operator's ``Deployment`` (deployment.json) and each
merchant's ``MerchantKit`` (merchant.json, its node config), with the names both use."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from server.deploy.pki import (
    DeployError,
)

DEPLOYMENT_FILE = "deployment.json"
MERCHANT_FILE = "merchant.json"
CONNECTION = "fedshop"  # the operator's SuperLink connection name in flwr-home/config.toml
DEFAULT_SUPERLINK_PORT = 9092  # the public port (nginx, Fleet API only); the SuperLink's own is the next one
FIRST_SUPERNODE_PORT = 9094  # Flower's default SuperNode Runtime API port; one more per merchant
NODE_KEY = "node-key"
# The shared secret between a merchant's SuperNode and its warm ClientApp launcher: Flower's
# SuperExec authentication (``--superexec-auth-secret-file``) signs each AcquireTask, so no other
# process on the merchant's machine can claim the node's tasks. Made by the start script on the
# merchant's machine at its first start (the operator never sees it).
SUPEREXEC_SECRET = "superexec-secret"
HERE = "@@FEDSHOP_MERCHANT_DIR@@"  # in a generated script: the folder it runs from ($PWD)
SUPERLINK_SCRIPT = "start-superlink.sh"
SUPERNODE_SCRIPT = "start-supernode.sh"
INSECURE_WARNING = (
    "WARNING: --insecure: traffic between merchants and the SuperLink is NOT encrypted and "
    "SuperNode authentication is OFF, so any process that can reach the SuperLink's port can "
    "join the federation, read the global model and send updates. Use it only on an isolated "
    "test network."
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Environment of every deployed Flower process. Runtime dependency installation would `uv
# sync` the app (and pull a multi-GB CUDA torch) on each run; telemetry and update checks
# need a network a merchant may not want to talk to; models load from local folders only.
PROCESS_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# --------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True, kw_only=True)
class Deployment:
    """The operator's folder. Merchants dial ``port`` on ``bind_host``, where nginx passes only
    the Fleet API (``server.deploy.proxy``); the SuperLink itself listens on 127.0.0.1 at
    ``control_port``, where the operator's ``flwr`` (Control API) and the SuperLink's own
    ServerApp processes (Runtime API) reach it."""

    root: Path
    port: int
    control_port: int
    bind_host: str
    public_address: str  # what SuperNodes dial (host, no port)
    names: tuple[str, ...]
    addresses: tuple[str, ...]
    insecure: bool = False

    @property
    def superlink_address(self) -> str:
        host = f"[{self.public_address}]" if ":" in self.public_address else self.public_address
        return f"{host}:{self.port}"

    @property
    def control_address(self) -> str:
        """The SuperLink's own address, loopback only: the operator's ``flwr`` connection."""
        return f"127.0.0.1:{self.control_port}"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def merchants_dir(self) -> Path:
        return self.root / "merchants"

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "control_port": self.control_port, "bind_host": self.bind_host,
                "public_address": self.public_address,
                "names": list(self.names), "addresses": list(self.addresses), "insecure": self.insecure}

    @classmethod
    def load(cls, root: Path) -> Deployment:
        root = Path(root).expanduser().resolve()
        path = root / DEPLOYMENT_FILE
        if not path.is_file():
            raise DeployError(f"{root}: not a fedshop deployment folder (no {DEPLOYMENT_FILE}); "
                              "create one with `fedshop deploy init DIR ...`")
        raw = json.loads(path.read_text(encoding="utf-8"))
        if "control_port" not in raw:
            raise DeployError(f"{path} was made before the SuperLink moved behind its proxy (no control_port): "
                              "add \"control_port\": <a free port> to it, then rewrite its start script with "
                              "`fedshop deploy scripts --dir DIR`")
        return cls(root=root, port=int(raw["port"]), control_port=int(raw["control_port"]),
                   bind_host=str(raw["bind_host"]),
                   public_address=str(raw["public_address"]), names=tuple(raw["names"]),
                   addresses=tuple(raw["addresses"]), insecure=bool(raw.get("insecure", False)))

    def merchants(self) -> list[MerchantKit]:
        if not self.merchants_dir.is_dir():
            return []
        return [MerchantKit.load(p) for p in sorted(self.merchants_dir.iterdir()) if (p / MERCHANT_FILE).is_file()]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MerchantKit:
    """One merchant's folder: identity, own budget and device, and how its SuperNode starts."""

    name: str
    dir: Path
    data_dir: Path
    state_dir: Path | None  # None: "state/" inside the merchant's folder, wherever it is moved
    target_epsilon: float
    target_delta: float
    device: str
    port: int  # the SuperNode's Runtime API port (its ClientApp processes talk to it)
    superlink_address: str
    insecure: bool = False
    has_private_key: bool = True
    node_id: int | None = None

    @property
    def public_key(self) -> Path:
        return self.dir / f"{NODE_KEY}.pub"

    @property
    def privacy_state(self) -> Path:
        return (self.state_dir or self.dir / "state") / "privacy-state.json"

    def node_config(self, here: str | None = None) -> str:
        """The ``--node-config`` value: what client/merchant.py ``resolve_node`` reads.

        ``here`` stands for the merchant's folder in the default state path (the start script
        passes ``HERE``, which becomes the folder it runs from).
        """
        state_dir = str(self.state_dir) if self.state_dir else f"{here or self.dir}/state"
        values: dict[str, str | float] = {
            "merchant-id": self.name, "data-dir": str(self.data_dir), "state-dir": state_dir,
            "target-epsilon": float(self.target_epsilon), "target-delta": float(self.target_delta),
            "device": self.device,
            # The merchant's kit pins DP on: a run that asks this node for non-private training is
            # refused (client/policy.py); the merchant may pin more (a noise floor, its split, ...).
            "dp": "true",
        }
        return " ".join(f"{k}={_toml_scalar(v)}" for k, v in values.items())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "data_dir": str(self.data_dir),
                "state_dir": str(self.state_dir) if self.state_dir else None,
                "target_epsilon": self.target_epsilon, "target_delta": self.target_delta, "device": self.device,
                "port": self.port, "superlink_address": self.superlink_address, "insecure": self.insecure,
                "has_private_key": self.has_private_key, "node_id": self.node_id}

    def save(self) -> None:
        (self.dir / MERCHANT_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> MerchantKit:
        raw = json.loads((directory / MERCHANT_FILE).read_text(encoding="utf-8"))
        return cls(name=str(raw["name"]), dir=directory.resolve(), data_dir=Path(raw["data_dir"]),
                   state_dir=Path(raw["state_dir"]) if raw.get("state_dir") else None,
                   target_epsilon=float(raw["target_epsilon"]),
                   target_delta=float(raw["target_delta"]), device=str(raw["device"]), port=int(raw["port"]),
                   superlink_address=str(raw["superlink_address"]), insecure=bool(raw.get("insecure", False)),
                   has_private_key=bool(raw.get("has_private_key", True)),
                   node_id=int(raw["node_id"]) if raw.get("node_id") is not None else None)


def _toml_scalar(value: str | float) -> str:
    if isinstance(value, float):
        return repr(value)
    if "'" in value.replace(HERE, "") or "\n" in value:
        raise DeployError(f"node-config value {value!r} may not contain a single quote or a newline")
    return f"'{value}'"  # a TOML literal string: backslashes and spaces stay as they are
