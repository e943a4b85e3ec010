"""The merchant's side of secure aggregation (run config ``aggregation = "secagg+"``).

Flower's ``secaggplus_mod`` runs the SecAgg+ protocol on the node: key agreement, Shamir
shares of its secrets, the masking of its vector and, at the end, the shares that let the
server remove the masks of the sum. This module only fits fedshop's train call to it:

- ``secure_aggregation_mod`` hands a message to Flower's mod only when it carries the
  protocol's records; every other message (plain runs, evaluation) reaches the ClientApp as
  it came.
- In the protocol's third stage the mod calls fedshop's own train handler and masks the
  ``FitRes`` it finds in the reply. ``as_fit_result`` builds that ``FitRes`` from fedshop's
  reply: the *update* (trained minus the global model the server sent, in the server's key
  order) with weight 1, or, when the merchant refused the call, zeros with weight 0, so
  its place in the protocol stays filled and its masks still cancel. The plain arrays are
  dropped from the reply here, before the mod masks: what leaves is the masked vector, the
  privacy facts and the public counts of the train reply (docs/privacy.md, "Secure
  aggregation").

Merchant-level DP (``merchant-epsilon`` > 0; ``shared.privacy.merchant_level``): before the
mod masks it, the update is clipped to L2 norm ``merchant-clip-norm`` and the merchant adds
its share of the round's Gaussian noise, σ_m² C_m² / t per coordinate, t the round's SecAgg+
threshold (which the mod's setup stage stored in the node's context). A refused call's zeros
get weight 0, which the mod multiplies into the vector, noise and all: only merchants that
trained add noise, and the server unmasks only when at least t of them did.

Quantisation clips every coordinate of the update to the run's ``secagg-clipping-range``
(Flower's ``quantize``), which is what bounds a merchant's influence on the mean when the
server can no longer screen updates one by one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from shared.config import RunConfig
from shared.privacy import merchant_level
from shared.wire import ARRAYS, PRIVACY, STATUS_OK, PrivacyFacts, record_to_params


def update_vector(global_params: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """``trained - global`` per array, in the global model's key order (the order the server
    reads the unmasked mean back in). The keys and shapes must be the global model's."""
    if list(trained) != list(global_params):
        raise ValueError(f"the trained arrays {sorted(trained)} are not the global model's {sorted(global_params)}")
    out = []
    for name, base in global_params.items():
        new = np.asarray(trained[name])
        if new.shape != base.shape:
            raise ValueError(f"array {name!r}: trained shape {new.shape} is not the global {base.shape}")
        out.append(new.astype(np.float64) - base.astype(np.float64))
    return out


@dataclasses.dataclass(frozen=True)
class MerchantNoise:
    """Merchant-level DP for one masked update: clip to ``clip_norm``, add N(0, ``sd``²) per
    coordinate (this merchant's share of the round's noise). ``clip_norm`` 0: off."""

    clip_norm: float = 0.0
    sd: float = 0.0

    @classmethod
    def for_round(cls, config: RunConfig, context: Context) -> MerchantNoise:
        sigma = merchant_level.noise_multiplier(config)
        if sigma <= 0:
            return cls()
        state = context.state.config_records.get(RECORD_KEY_STATE)
        threshold = int(state.get("threshold", 0)) if state is not None else 0  # type: ignore[arg-type]
        if threshold < 1:
            raise RuntimeError("merchant-level DP: the secure round's threshold is unknown (no setup stage seen)")
        return cls(clip_norm=config.merchant_clip_norm, sd=sigma * config.merchant_clip_norm / math.sqrt(threshold))

    def apply(self, update: list[np.ndarray]) -> list[np.ndarray]:
        if self.clip_norm <= 0:
            return update
        norm = math.sqrt(sum(float(np.sum(a * a)) for a in update))
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        rng = np.random.default_rng()  # fresh OS entropy: noise a merchant cannot be told to repeat
        return [a * scale + rng.normal(0.0, self.sd, size=a.shape) for a in update]


def as_fit_result(sent: Message, reply: Message, noise: MerchantNoise | None = None) -> Message:
    """fedshop's train ``reply`` to the message ``sent``, turned into what Flower's mod masks:
    the update as a legacy ``FitRes`` (weight 1, clipped and noised under merchant-level DP;
    zeros and weight 0 for a refused call), the privacy facts and counts kept, the plain
    arrays removed."""
    content = reply.content
    if reply.has_error():
        return reply
    facts = PrivacyFacts.from_record(content.config_records[PRIVACY])
    global_params = record_to_params(sent.content.array_records[ARRAYS])
    if facts.status == STATUS_OK:
        update = update_vector(global_params, record_to_params(content.array_records[ARRAYS]))
        update = (noise or MerchantNoise()).apply(update)
        weight = 1
    else:
        update = [np.zeros(v.shape, dtype=np.float64) for v in global_params.values()]
        weight = 0
    fit = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(update),
                 num_examples=weight, metrics={})
    out = RecordDict({name: record for name, record in content.items() if name != ARRAYS})
    for name, record in compat.fitres_to_recorddict(fit, keep_input=False).items():
        out[name] = record
    return Message(out, reply_to=sent)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for messages of the protocol; everything else passes."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_then_fit_result(inner: Message, ctx: Context) -> Message:
        noise = MerchantNoise.for_round(RunConfig.from_mapping(ctx.run_config), ctx)
        return as_fit_result(inner, call_next(inner, ctx), noise)

    return secaggplus_mod(msg, context, train_then_fit_result)
