"""Merchant-level (client-level) DP of a secure-aggregation run: the noise plan and its ε.

Record-level DP (every other module of this package) bounds what one *customer* changes in
one merchant's update. Merchant-level DP bounds what one *merchant* changes in the model: its
whole update is clipped to L2 norm C_m (``merchant-clip-norm``), and the sum of a round's
updates carries Gaussian noise N(0, σ_m² C_m²) per coordinate. Neighbouring federations have
the same merchants, one merchant's data replaced (the round's count of merchants is public,
as N is for records), so one round is a Gaussian mechanism of sensitivity 2·C_m, accounted
with the same PLD accountant as every other spend (``shared.privacy.accounting``; a round is
one step at sampling rate 1: the merchants of a round are chosen by the server, and no
amplification by that choice is claimed).

Distributed noise. With secure aggregation no party may see the sum before its noise is in
it, so each merchant adds a share, N(0, σ_m² C_m² / t), to its clipped update before masking,
where t is the round's SecAgg+ reconstruction threshold. The server unmasks a round only when
at least t merchants sent an update (``server.secure_aggregation``): the sum then carries at
least the planned variance σ_m² C_m², whoever dropped out. The server never adds noise and
never sees a less-noised sum; the assumption is the one SecAgg+ already makes, that merchants
follow the protocol (a merchant that adds no noise weakens the others' guarantee by its share).

σ_m is planned once per run from ``merchant-epsilon`` over its ``num-server-rounds`` rounds at
``merchant-delta`` (``noise_multiplier``); merchants and server compute it from the same run
config, and the server records, per unmasked round, the ε composed so far (``server.ledger``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

from shared.config import RunConfig
from shared.privacy.accounting import epsilon_pld, noise_for_budget
from shared.privacy.events import NEIGHBOURS_REPLACE_ONE, MechanismEvent

# The least σ_m a plan may give: below it the noise would be a rounding error of the updates.
NOISE_FLOOR = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class MerchantLevelRound:
    """One unmasked secure round under merchant-level DP, as the ledger keeps it."""

    run_id: str
    round: int
    contributors: int  # merchants whose (clipped, noised) update the sum held
    noise_multiplier: float  # σ_m
    clip_norm: float  # C_m
    delta: float
    epsilon: float  # the run's merchant-level ε after this round
    neighbours: str = NEIGHBOURS_REPLACE_ONE

    @property
    def mechanism(self) -> MechanismEvent:
        # One Gaussian release of the sum (sampling rate 1, one step): composed as every spend is.
        return MechanismEvent(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=1,
                              max_grad_norm=self.clip_norm)


@functools.lru_cache(maxsize=64)
def _plan(target: float, delta: float, rounds: int, clip_norm: float) -> float:
    return noise_for_budget(target, delta, sample_rate=1.0, steps=1, calls=rounds, max_grad_norm=clip_norm,
                            floor=NOISE_FLOOR)


def noise_multiplier(config: RunConfig) -> float:
    """σ_m: the least noise multiplier at which the run's rounds fit ``merchant-epsilon`` (0 when
    merchant-level DP is off). A pure function of the run config: every merchant and the
    server get the same value."""
    if config.merchant_epsilon <= 0:
        return 0.0
    return _plan(config.merchant_epsilon, config.merchant_delta, config.num_server_rounds, config.merchant_clip_norm)


def epsilon(rounds: Iterable[MerchantLevelRound], delta: float) -> float:
    """The merchant-level ε of the unmasked rounds, at ``delta`` (replace-one, PLD)."""
    return epsilon_pld([r.mechanism for r in rounds], delta, neighbours=NEIGHBOURS_REPLACE_ONE)
