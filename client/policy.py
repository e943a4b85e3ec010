"""The merchant's own privacy settings, and a run's request checked against them.

A run config comes from the server; the settings that decide what a merchant's data is
exposed to are the merchant's. In deployment the merchant pins them in its node config
(``flower-supernode --node-config "dp=true noise-multiplier=0.8 ..."``, written by
``fedshop deploy add-merchant`` and edited by the merchant); in simulation the operator is
every merchant, so the run config speaks for them and nothing is pinned.

Two kinds of pinned setting:

- **Guards** (``dp``, ``noise-multiplier`` as a floor, ``aggregation = secagg+``,
  ``merchant-epsilon`` as a ceiling): a run asking for less — no DP, less noise than the
  merchant's floor, its update in the clear, no merchant-level DP or a larger merchant-level
  ε — is refused. The merchant replies "refused" with the
  reason, trains nothing, spends nothing, and the server's ledger records the refusal.
- **The merchant's own values** (C, the unit, the split, history, caches, a public corpus,
  whether to report timings): the pinned value replaces the run's. A run cannot move a record
  across the split, widen the unit's reach, point the node at a file of its choosing (a
  deployed node takes no path from the run: corpus and cache are its node config's, or none)
  or have it send its wall times (a deployed node reports them only when its node config says
  ``report-timings = true``); a difference is logged.

Budgets (``target-epsilon``, ``target-delta``) are the merchant's too; ``client.merchant``
applies them (the smaller ε wins) and ``shared.privacy.budget`` enforces them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from shared.config import RunConfig

log = logging.getLogger(__name__)

# node-config key -> RunConfig field whose value the merchant's pin replaces
OWN_VALUES: dict[str, str] = {
    "max-grad-norm": "max_grad_norm",
    "privacy-unit": "privacy_unit",
    "max-records-per-unit": "max_records_per_unit",
    "test-fraction": "test_fraction",
    "test-offset": "test_offset",
    "split-seed": "split_seed",
    "history-length": "history_length",
    "precondition-corpus": "precondition_corpus",
    "feature-cache-dir": "feature_cache_dir",
    "eval-max-examples": "eval_max_examples",
    "report-timings": "report_timings",
}
GUARDS = ("dp", "noise-multiplier", "aggregation", "merchant-epsilon")
PATHS = ("precondition-corpus", "feature-cache-dir")  # files on the merchant's machine
# What a deployed node releases beyond the protected update only when its own node config
# says so, whatever the run asks: the call's wall times, a side channel nothing accounts for.
RELEASES_OFF = {"report-timings": False}


class PolicyError(ValueError):
    """A pinned node-config value cannot be read; the message names the key and value."""


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise PolicyError(f"node config {key} = {value!r}: expected true or false")


def _positive(node_config: Mapping[str, Any], key: str, meaning: str) -> float | None:
    """A pinned number > 0, or None when ``key`` is not pinned."""
    if key not in node_config:
        return None
    try:
        value = float(node_config[key])
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise PolicyError(f"node config {key} = {node_config[key]!r}: expected a number > 0 ({meaning})")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class MerchantPolicy:
    """What this merchant pinned (None / empty = not pinned: the run's value stands)."""

    dp: bool | None = None
    noise_floor: float | None = None
    secure_aggregation: bool = False  # aggregation = secagg+ pinned: no update leaves in the clear
    merchant_epsilon: float | None = None  # the largest merchant-level ε this merchant joins a run at
    own: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # RunConfig field -> pinned value

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> MerchantPolicy:
        dp = _flag("dp", node_config["dp"]) if "dp" in node_config else None
        floor = _positive(node_config, "noise-multiplier", "the least noise this merchant accepts")
        secure = False
        if "aggregation" in node_config:
            if str(node_config["aggregation"]) not in ("secagg+", "plain"):
                raise PolicyError(f"node config aggregation = {node_config['aggregation']!r}: expected 'secagg+' "
                                  "(or 'plain', which pins nothing)")
            secure = str(node_config["aggregation"]) == "secagg+"
        ceiling = _positive(node_config, "merchant-epsilon", "the largest merchant-level ε this merchant accepts")
        own = {field: node_config[key] for key, field in OWN_VALUES.items() if key in node_config}
        if "data-dir" in node_config:
            # A deployed node reads no file and writes no cache the server names: paths on the
            # merchant's machine are the merchant's to give (none unless its node config says).
            for key in PATHS:
                own.setdefault(OWN_VALUES[key], str(node_config.get(key, "")))
            for key, off in RELEASES_OFF.items():
                own.setdefault(OWN_VALUES[key], off)
        return cls(dp=dp, noise_floor=floor, secure_aggregation=secure, merchant_epsilon=ceiling, own=own)

    def refusal(self, config: RunConfig) -> str:
        """Why this run's request is weaker than the merchant allows ("" = it is not)."""
        if self.dp and not config.dp:
            return "the merchant pins dp = true; the run asks for dp = false (non-private training)"
        if self.noise_floor is not None and config.dp and config.noise_multiplier < self.noise_floor:
            return (f"the merchant's noise floor is noise-multiplier = {self.noise_floor:g}; the run asks for "
                    f"{config.noise_multiplier:g}")
        if (self.secure_aggregation or self.merchant_epsilon is not None) and config.aggregation != "secagg+":
            return (f"the merchant pins aggregation = secagg+; the run asks for {config.aggregation} aggregation "
                    "(its update in the clear)")
        if self.merchant_epsilon is not None and not 0 < config.merchant_epsilon <= self.merchant_epsilon:
            asked = f"{config.merchant_epsilon:g}" if config.merchant_epsilon > 0 else "none (merchant-epsilon = 0)"
            return (f"the merchant pins merchant-epsilon ≤ {self.merchant_epsilon:g}; the run asks for {asked}")
        return ""

    def apply(self, config: RunConfig) -> RunConfig:
        """``config`` with the merchant's own values in place of the run's (validated again)."""
        if not self.own:
            return config
        mapping = config.to_mapping()
        changed = {}
        for field, pinned in self.own.items():
            key = field.replace("_", "-")
            if str(mapping.get(key)) != str(pinned):
                changed[key] = (mapping.get(key), pinned)
            mapping[key] = pinned
        for key, (asked, pinned) in changed.items():
            log.info("the run asks %s = %r; this merchant's own %r applies", key, asked, pinned)
        return RunConfig.from_mapping(mapping)


def delta_refusal(delta: float, units: int) -> str:
    """δ must be small next to one over the number of units: δ·N is about the chance that some
    unit's data is exposed outright, so a δ near 1/N protects nobody (refused above 1/(10·N))."""
    if units > 0 and delta > 1.0 / (10 * units):
        return (f"δ = {delta:g} is too large for {units} privacy units: it must be at most 1/(10·N) = "
                f"{1.0 / (10 * units):.3g}")
    return ""
