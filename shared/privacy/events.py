"""What happened: one privacy spend of a merchant, in Opacus / dp_accounting vocabulary.

A ``MechanismEvent`` is what an accountant composes: ``steps`` DP-SGD steps with Poisson
sampling at ``sample_rate``, Gaussian noise ``noise_multiplier`` and clipping norm
``max_grad_norm``. A ``SpendEvent`` is one release as a whole: that mechanism, the δ it is
accounted at, what was released (``release``), with respect to which unit (``unit``, and how
many of them the merchant trained on: ``unit_count``), and where its noise came from.

``SpendEvent`` is the one shape of a spend: the merchant's state entry, the train reply's
privacy facts, the server's ledger row and the audit's row each carry it as their ``event``
field and serialise it with its ``to_dict`` / ``from_dict`` (flat keys: the state file's
``event``, the wire's keys and the ledger's columns are ``SPEND_KEYS``). How spends are
*accounted* (PLD, for replace-one neighbours: ``neighbours``) is ``shared.privacy.accounting``'s
concern; any accountant can recompute ε from the mechanisms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# Recorded with every private call's spend (``SpendEvent.noise``), by the merchant and on the
# wire, so the server's ledger keeps it: private calls draw their noise and batches from fresh
# generators (``client.dp.private_generators``). Spend recorded without it was made by an
# earlier version whose noise repeated across calls (its reported ε does not hold); both
# audits say so.
NOISE_SOURCE = "fresh-per-call"

# What a neighbouring dataset differs by (the run config's ``privacy-unit``): one record, or all of
# one user's records (one query's judgments) under user-level DP-SGD.
UNIT_RECORD = "record"
UNIT_USER = "user"
UNITS: frozenset[str] = frozenset({UNIT_RECORD, UNIT_USER})
# What left the merchant: a model update (DP-SGD), or evaluation metrics released through a
# Gaussian mechanism on clipped per-unit sums (``client.release``: sample_rate 1, steps 1).
RELEASE_UPDATE = "update"
RELEASE_EVALUATION = "evaluation"
RELEASES: frozenset[str] = frozenset({RELEASE_UPDATE, RELEASE_EVALUATION})
# Which neighbouring datasets an ε is accounted for (docs/privacy.md, "N is public"). Every
# reply states N (``unit_count``) exactly, and q, steps and the planned σ are functions of it,
# so a neighbour with one unit more or fewer is told apart by N alone: only datasets of the
# same size, one unit *replaced*, are neighbours whose guarantee holds. ``REPLACE_ONE`` is what
# fedshop accounts; ``ADD_REMOVE`` names what spend recorded before it was kept was accounted for
# (its ε understates the guarantee's cost, and the audit fails it).
NEIGHBOURS_REPLACE_ONE = "replace-one"
NEIGHBOURS_ADD_REMOVE = "add-remove"
NEIGHBOURS: frozenset[str] = frozenset({NEIGHBOURS_REPLACE_ONE, NEIGHBOURS_ADD_REMOVE})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MechanismEvent:
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float

    def validate(self) -> None:
        """The mechanism of a private call: every field must make it accountable."""
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier = {self.noise_multiplier!r}: must be a finite number > 0")
        if not (0.0 < self.sample_rate <= 1.0):
            raise ValueError(f"sample_rate = {self.sample_rate!r}: must lie in (0, 1]")
        if self.steps < 0:
            raise ValueError(f"steps = {self.steps!r}: must be >= 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm = {self.max_grad_norm!r}: must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, validate: bool = True) -> MechanismEvent:
        """Read the four fields (other keys are ignored); ``validate=False`` also reads the
        mechanism of a call that drew no noise (refused, non-private), which is not accountable."""
        event = cls(
            noise_multiplier=float(raw["noise_multiplier"]),
            sample_rate=float(raw["sample_rate"]),
            steps=int(raw["steps"]),
            max_grad_norm=float(raw["max_grad_norm"]),
        )
        if validate:
            event.validate()
        return event


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpendEvent:
    """One release of one merchant: what left, and the mechanism that protected it.

    A call that released nothing (refused) or released without DP keeps the same shape:
    ``steps = 0`` (refused), ``noise_multiplier = sample_rate = 0`` (non-private; refused
    calls have ``sample_rate = 0``), ``noise = ""``.
    """

    mechanism: MechanismEvent
    delta: float  # the δ the merchant accounts at (0 for a non-private call)
    unit: str = UNIT_RECORD
    # Units the call trained on (N, declared public); 0 when the call trained on none
    # (refused) or the spend was recorded before N was kept.
    unit_count: int
    # Expected Poisson batch, sample_rate · N (= N / ceil(N / batch_size)); 0 when nothing was
    # sampled under DP (refused, non-private) or the spend was recorded before it was kept.
    expected_batch: float
    release: str = RELEASE_UPDATE
    noise: str = ""  # NOISE_SOURCE for a private call that drew noise; "" otherwise or unrecorded
    neighbours: str = NEIGHBOURS_REPLACE_ONE  # the relation its ε was accounted for

    @classmethod
    def of(cls, mechanism: MechanismEvent, *, unit_count: int, delta: float, noise: str,
           unit: str = UNIT_RECORD, release: str = RELEASE_UPDATE) -> SpendEvent:
        """The spend of a call that sampled ``unit_count`` units at ``mechanism.sample_rate``,
        accounted for replace-one neighbours (the only relation fedshop accounts)."""
        return cls(mechanism=mechanism, delta=delta, unit=unit, unit_count=unit_count,
                   expected_batch=mechanism.sample_rate * unit_count, release=release, noise=noise,
                   neighbours=NEIGHBOURS_REPLACE_ONE)

    def validate(self) -> None:
        """What any spend must satisfy (the ledger's CHECKs); a private call's mechanism is
        checked further by ``MechanismEvent.validate``."""
        m = self.mechanism
        for name, value in (("noise_multiplier", m.noise_multiplier), ("sample_rate", m.sample_rate),
                            ("max_grad_norm", m.max_grad_norm), ("delta", self.delta),
                            ("expected_batch", self.expected_batch)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if m.sample_rate > 1:
            raise ValueError(f"sample_rate must be <= 1, got {m.sample_rate}")
        if self.delta >= 1:
            raise ValueError(f"delta must be < 1, got {self.delta}")
        if m.steps < 0:
            raise ValueError(f"steps must be >= 0, got {m.steps}")
        if self.unit_count < 0:
            raise ValueError(f"unit_count must be >= 0, got {self.unit_count}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {sorted(UNITS)}, got {self.unit!r}")
        if self.release not in RELEASES:
            raise ValueError(f"release must be one of {sorted(RELEASES)}, got {self.release!r}")
        if self.neighbours not in NEIGHBOURS:
            raise ValueError(f"neighbours must be one of {sorted(NEIGHBOURS)}, got {self.neighbours!r}")

    def to_dict(self) -> dict[str, Any]:
        """Flat: the mechanism's four fields next to the spend's own (``KEYS``, in order)."""
        return {**self.mechanism.to_dict(), "delta": self.delta, "unit": self.unit, "unit_count": self.unit_count,
                "expected_batch": self.expected_batch, "release": self.release, "noise": self.noise,
                "neighbours": self.neighbours}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SpendEvent:
        """Read ``to_dict``'s keys (``noise`` may be absent: unmarked; ``neighbours`` may be
        absent: recorded before it was kept, when ε was accounted for add/remove neighbours); a
        missing key raises ``KeyError`` naming it. Not validated: a reader of records (the
        audit) must see them as they are; writers call ``validate``."""
        return cls(mechanism=MechanismEvent.from_dict(raw, validate=False), delta=float(raw["delta"]),
                   unit=str(raw["unit"]), unit_count=int(raw["unit_count"]),
                   expected_batch=float(raw["expected_batch"]), release=str(raw["release"]),
                   noise=str(raw.get("noise", "")), neighbours=str(raw.get("neighbours", NEIGHBOURS_ADD_REMOVE)))


# The keys of ``SpendEvent.to_dict``: the ledger's spend columns, the wire's spend keys.
SPEND_KEYS: tuple[str, ...] = (*(f.name for f in dataclasses.fields(MechanismEvent)), "delta", "unit",
                               "unit_count", "expected_batch", "release", "noise", "neighbours")

