"""Registering a merchant's node key with the running SuperLink (``flwr supernode register``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from server.deploy.folders import CONNECTION, SUPERLINK_SCRIPT, Deployment, MerchantKit
from server.deploy.kit import process_env
from server.deploy.pki import (  # noqa: E501
    DeployError,
)


def flwr_executable(name: str = "flwr") -> str:
    """A Flower CLI from this interpreter's environment, else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name!r} not found: install fedshop (it brings flwr) or activate its environment")
    return found


def register_merchant(dep: Deployment, merchant: MerchantKit, *, timeout_s: float = 60.0) -> int:
    """Register the merchant's public key with the running SuperLink; returns its node id."""
    if dep.insecure:
        raise DeployError("an --insecure deployment has no SuperNode authentication: nothing to register")
    cmd = [flwr_executable(), "supernode", "register", str(merchant.public_key), CONNECTION,
           "--name", merchant.name, "--format", "json"]
    try:
        proc = subprocess.run(cmd, env=process_env(flwr_home=dep.flwr_home), capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeployError(f"registering {merchant.name!r}: no answer from the SuperLink at "
                          f"{dep.superlink_address} within {timeout_s:.0f} s") from None
    payload = _last_json(proc.stdout)
    if proc.returncode == 0 and payload.get("success") and payload.get("node-id"):
        node_id = int(payload["node-id"])
        dataclasses.replace(merchant, node_id=node_id).save()
        return node_id
    why = payload.get("error-message") or (proc.stderr or proc.stdout).strip()[-1000:]
    raise DeployError(f"registering merchant {merchant.name!r} with the SuperLink at {dep.superlink_address} "
                      f"failed: {why}\n(is the SuperLink running? start {dep.superlink_dir / SUPERLINK_SCRIPT}, "
                      f"then: fedshop deploy register {merchant.name} --dir {dep.root})")


def _last_json(text: str) -> dict[str, Any]:
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else {}
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return {}


