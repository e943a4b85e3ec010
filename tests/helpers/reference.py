"""Reference values the budget tests compare the merchant's accountant with."""

from __future__ import annotations

from shared.privacy.events import MechanismEvent


def reference_epsilon(calls: list[MechanismEvent], delta: float = 1e-5) -> float:
    """One live dp_accounting PLD accountant (replace-one neighbours) that saw every call in
    the order made, each composed as it came: not through ``shared.privacy.accounting``, which
    groups a persisted history by (σ, q) first."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    from shared.privacy.accounting import DISCRETIZATION  # the same grid; the path to it is dp_accounting's own

    accountant = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE,
                                                      value_discretization_interval=DISCRETIZATION)
    for call in calls:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            call.sample_rate, dp_accounting.GaussianDpEvent(call.noise_multiplier)), call.steps)
    return float(accountant.get_epsilon(delta))
