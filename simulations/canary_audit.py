"""Empirical privacy audit in one training run: canaries, K calls, two lower bounds, a verdict.

"Privacy Auditing with One (1) Training Run" (Steinke, Nasr & Jagielski, NeurIPS 2023,
arXiv:2305.08846) turns ordinary training into a statistical test of the ε the accountant
claims:

1. make ``m`` canary records; include each one in the merchant's training data
   independently with probability 1/2 (a seeded coin per canary);
2. train exactly as fedshop trains (``client.trainer.train``; DP-SGD when ``noise``), and
   not once but ``calls`` consecutive calls of the same merchant on the same data, each
   with its own fresh noise and batches, each checked and committed through the merchant's
   ``PrivacyState`` as in a federation. The canaries go in once, before the first call;
3. score every canary on the final model, guess "included" for the ``k_plus`` highest
   scores and "excluded" for the ``k_minus`` lowest (ranked within each label, see below),
   abstain on the rest;
4. turn ``v`` right guesses out of ``r`` into ε lower bounds (``shared.privacy.auditing``):
   Steinke et al.'s for any (ε, δ)-DP training, and Mahloujifar, Melis & Chaudhuri's
   (2024, f-DP in one run) for the Gaussian trade-off curve at that (ε, δ), which refutes far
   larger claims from the same guesses (≈ 9.9 against ≈ 5.1 for 500 right out of 1,000).

The claim is the ε of the ``calls`` calls composed for add/remove neighbours (``claim``: each
canary is in the training set or left out; the merchant state reports the larger replace-one
ε of the same calls), so the leakage of K real calls is held against the accounting of K calls. A lower bound above
the claim means the implementation leaks more than it says (noise not added or too small,
sampling not Poisson, an accountant that does not compose, ...); the audit then *fails*.
What scoring the final model cannot show is noise *reused* from call to call: reused noise
adds up coherently in the final model (more noise there, not less), while the harm is in
the noise-free difference of two released updates. (Tried on the tiny encoder, σ = 2, two
calls, one noise draw for both: final-model scores and per-call-difference scores were both
at chance.) That needs a test on the released updates themselves.

A bound below the claim is what a correct implementation shows, but it is only
evidence if the audit could have failed, so three settings are refused up front
(``AuditPowerError``, ``check_canary_signal``):

* a claim at or above the largest ε that ``r`` guesses among ``m`` canaries can ever prove
  (every guess right): no outcome could refute it; more canaries can;
* a training that samples too few of the canaries: an inserted canary that no batch ever
  drew leaves the model exactly as if it had been left out, so even a perfect attack gets
  only the expected right guesses of ``auditing.best_expected_correct``; if those cannot
  refute the claim, neither can the audit (the case of few steps over many records);
* a trainable set without the token embeddings (anything but ``trainable = "full"``):
  the canaries' signal lives in their own embedding rows (below).

``noise=False`` trains non-privately on the same data for the same steps and claims what the
DP configuration would have claimed: that audit must fail, and is the control showing it can.

Canary design (what makes the audit able to fail): each canary is a ``ctr`` record whose
product text is 3-4 random whole-word vocabulary tokens used by no other canary and by no
ordinary record, with a random 0/1 label. With the token embeddings trainable
(``trainable = "full"``), a canary's own embedding rows receive gradient only when the
canary is in the data, so without noise its label becomes more likely only if it was
included; with DP noise that signal is drowned, as the guarantee says it must be. Labels
are random because with one label for all, the shared layers could fit every canary by
learning "canary-looking text -> that label", lifting excluded canaries with included ones.

The score of a canary is how much training raised the log-odds of its own label,
ln P(label) / P(other label), from the initial model (same seed, before training) to the
trained one: a log-likelihood gain (loss reduction) without the saturation of a loss, which
cannot fall below 0. On the tiny encoder the model soon calls every unseen canary-like
text "clicked"; the loss gain of an included label-1 canary is then capped at about ln 2
and ties with an excluded one's, while its log-odds keep growing. Canaries are ranked within their label, each label
taking its share of the guesses: which label that drift favours changes from seed to seed,
and it lifts every excluded canary of that label, but within one label it is common to all.

The audit trains on the merchant's real records too: the trained model is discarded, but
the audit's output is still a function of that training, so audit on data whose privacy
budget may be spent (synthetic or test data), or count the spend (each DP call is committed
to ``out_dir/canary-privacy-state.json``, which accumulates over audits).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from client import trainer
from shared import atomic
from shared.config import ConfigError, RunConfig
from shared.model import ModelSpec, build_model, choose_device, load_tokenizer
from shared.privacy import accounting, auditing
from shared.privacy.budget import PrivacyState
from shared.privacy.events import NEIGHBOURS_ADD_REMOVE, MechanismEvent
from shared.tasks import Example, count_records
from simulations.canaries import guesses, label_log_odds, make_canaries
from simulations.local import load_examples

log = logging.getLogger(__name__)

RESULT_FILE = "canary_audit.json"
STATE_FILE = "canary-privacy-state.json"
DEFAULT_CALLS = 2


class AuditPowerError(ValueError):
    """The audit could not fail whatever the training did; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class CanaryAuditResult:
    """One audit: the guesses, both ε lower bounds, what the audit could show, and the claim."""

    m: int  # canaries made (each included with probability 1/2)
    k_plus: int  # guesses "included" (highest scores)
    k_minus: int  # guesses "excluded" (lowest scores)
    r: int  # guesses made: k_plus + k_minus
    v: int  # correct guesses
    epsilon_lower_bound: float  # the larger of the two bounds below: what the verdict compares
    epsilon_lower_bound_steinke: float  # Steinke, Nasr & Jagielski 2023, any (ε, δ)-DP training
    epsilon_lower_bound_fdp: float  # Mahloujifar, Melis & Chaudhuri 2024, the Gaussian curve at (ε, δ)
    power_steinke: float  # the most each bound could show: all r guesses right
    power_fdp: float
    power_expected: float  # the most an attack could expect to show, given the canaries sampled
    epsilon_claimed: float  # ε of the ``calls`` calls composed (the DP config's, when noise was off)
    delta: float
    dp: bool  # whether the training added noise (noise=True) or was non-private
    noise_multiplier: float  # σ of the DP configuration (claimed; applied only when dp)
    calls: int  # consecutive training calls of the merchant, canaries inserted once before them
    steps: int  # steps over all calls
    sample_rate: float  # q of each call (what the claim accounts)
    seen: float  # chance that an inserted canary is drawn into at least one batch of the DP training
    confidence: float
    epsilon_state: float  # the audit state's cumulative ε after the calls (all audits in out_dir; 0 if no noise)
    mechanisms: list[dict[str, Any]]  # each call's mechanism as claimed (σ, q, steps, C)
    passed: bool  # epsilon_lower_bound <= epsilon_claimed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- power
def check_canary_signal(config: RunConfig) -> None:
    """Refuse a trainable set in which the canaries cannot leave a trace of their own.

    A canary's signal is its unique tokens' embedding rows, trained only when it is in a
    batch. ``heads``, ``lora`` and ``top-k`` freeze the token embeddings, so inserted and
    left-out canaries differ only through layers every record shares, and the no-noise
    control cannot refute anything: the audit would pass whatever the noise.
    """
    if config.trainable != "full":
        raise ConfigError(
            f"run-config key 'trainable' = {config.trainable!r}: the canary audit needs trainable = 'full' "
            "(its canaries are told apart by their own token-embedding rows, which only 'full' trains); "
            "run it with --set trainable=full"
        )


def _check_embeddings_train(model: nn.Module) -> None:
    """The model-level fact ``check_canary_signal`` relies on, checked on the built model."""
    encoder = getattr(model, "encoder", None)
    embeddings = encoder.get_input_embeddings() if encoder is not None else None
    if embeddings is None or not embeddings.weight.requires_grad:
        raise ConfigError("the model's token embeddings do not train, so canaries cannot carry signal: "
                          "the canary audit needs run-config key 'trainable' = 'full'")


@dataclasses.dataclass(frozen=True)
class AuditPlan:
    """What one audit claims and the most it could show, known before any training."""

    calls: int
    mechanism: MechanismEvent  # one call, as the DP configuration plans it
    epsilon_claimed: float  # ``calls`` such calls composed
    seen: float  # chance that an inserted canary reaches at least one batch over all calls
    power: auditing.Bounds  # every guess right
    power_expected: float  # what the best attack's expected right guesses prove, given ``seen``


def claim(mechanisms: list[MechanismEvent], delta: float) -> float:
    """The ε the canaries test: the calls' mechanisms composed for *add/remove* neighbours.

    Each canary is in the training set or left out (the set's size varies), so what the
    one-run bound refutes is an add/remove claim. It is the smaller of the two: a merchant's
    reported replace-one ε (``shared.privacy.accounting``) is larger, so testing the add/remove
    one is the stricter audit — a bound above it refutes the mechanism's own guarantee."""
    return accounting.epsilon_pld(mechanisms, delta, neighbours=NEIGHBOURS_ADD_REMOVE)


def plan_audit(
    num_records: int, config: RunConfig, *, calls: int, m: int, k_plus: int, k_minus: int, confidence: float
) -> AuditPlan:
    """The claim and power of an audit training ``calls`` calls on ``num_records`` records
    (canaries included); raises ``AuditPowerError`` when no outcome could refute the claim."""
    sample_rate, steps = trainer.planned_steps(num_records, config)
    mechanism = MechanismEvent(noise_multiplier=config.noise_multiplier, sample_rate=sample_rate, steps=steps,
                               max_grad_norm=config.max_grad_norm)
    claimed = claim([mechanism] * calls, config.target_delta)
    r = k_plus + k_minus
    best = auditing.power(m=m, r=r, delta=config.target_delta, confidence=confidence)
    if claimed >= best.largest:
        needed = auditing.canaries_to_prove(claimed, delta=config.target_delta, confidence=confidence,
                                            guess_fraction=r / m, start=2 * m)
        more = (f"about --canaries {needed} could (guessing on the same share of them; more records also move "
                "the claim)" if needed is not None else "no canary count this audit can make could")
        raise AuditPowerError(
            f"the claimed ε = {claimed:.3f} ({calls} call(s) of σ = {config.noise_multiplier:g}, "
            f"q = {sample_rate:.4g}, {steps} steps each, δ = {config.target_delta:g}) is beyond what this audit "
            f"can ever prove: {r} guesses among {m} canaries, all right, prove at most ε = {best.fdp:.3f} "
            f"(f-DP) / {best.steinke:.3f} (Steinke) at {confidence:.0%} confidence, so it could not fail; "
            f"{more}, or audit a smaller claim "
            "(more noise, fewer --calls)"
        )
    # Poisson sampling: a record is in each of the calls·steps batches independently with
    # probability q. The claim is about that (DP) training, so its sampling sets what any
    # attack on it could see, with or without noise.
    seen = -math.expm1(calls * steps * math.log1p(-sample_rate)) if sample_rate < 1.0 else 1.0
    expected_v = auditing.best_expected_correct(m=m, k_plus=k_plus, k_minus=k_minus, seen=seen)
    expected = auditing.lower_bounds(m=m, r=r, v=int(math.floor(expected_v)), delta=config.target_delta,
                                     confidence=confidence).largest
    if claimed >= expected:
        raise AuditPowerError(
            f"this training draws an inserted canary into any batch with probability only {seen:.1%} "
            f"(q = {sample_rate:.4g}, {calls} call(s) of {steps} steps): a canary never drawn leaves no trace, so "
            f"even an attack that spots every drawn one expects {expected_v:.0f} of {r} guesses right, which "
            f"proves at most ε = {expected:.3f}, below the claimed ε = {claimed:.3f}; the audit could not fail. "
            f"Raise run-config key 'local-epochs' (now {config.local_epochs:g}) or 'max-local-steps' "
            f"(now {config.max_local_steps}, 0 = no cap), or --calls, or audit on fewer records"
        )
    return AuditPlan(calls=calls, mechanism=mechanism, epsilon_claimed=claimed, seen=seen, power=best,
                     power_expected=expected)


# --------------------------------------------------------------------------- the audit
def run_canary_audit(
    data_dirs: list[Path] | None,
    config: RunConfig,
    *,
    m: int = 1000,
    k_plus: int | None = None,
    k_minus: int | None = None,
    calls: int = DEFAULT_CALLS,
    noise: bool = True,
    seed: int = 0,
    out_dir: Path,
    base_examples: list[Example] | None = None,
    confidence: float = 0.95,
) -> CanaryAuditResult:
    """Audit ``calls`` consecutive training calls of one merchant (its ``data_dirs`` pooled, or
    ``base_examples``) with ``m`` canaries inserted once before the first.

    ``noise=True`` trains with DP-SGD as configured (each call its own fresh noise and
    batches, committed to the audit's ``PrivacyState``) and claims the ε of the calls
    composed; ``noise=False`` trains non-privately on the same data for the same steps and
    claims the ε the DP configuration would have reported: the audit is then expected to
    find a lower bound above that claim. ``seed`` draws the canaries and their coins;
    ``config.seed`` still draws the model (and, with ``noise=False``, the batches, call k
    from ``config.seed`` and round k; a private run draws its batches and noise afresh,
    ``client.dp.private_generators``). Raises ``ConfigError`` / ``AuditPowerError`` (before
    training) for a setting in which the audit could not fail. The result is also written to
    ``out_dir / canary_audit.json``.
    """
    if base_examples is None and not data_dirs:
        raise ValueError("give the merchant's data_dirs or base_examples")
    # The guess counts are fixed here, before any score exists. Choosing them after looking
    # at the scores (say, the cut that maximises the bound) would be a data-dependent test,
    # and the confidence level below would no longer hold.
    k_plus = m // 4 if k_plus is None else k_plus
    k_minus = m // 4 if k_minus is None else k_minus
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m or k_plus + k_minus == 0:
        raise ValueError(f"k_plus = {k_plus}, k_minus = {k_minus}: need both >= 0, a sum > 0 and <= m = {m}")
    if calls < 1:
        raise ValueError(f"calls = {calls!r}: need at least one training call")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence = {confidence!r}: must lie strictly between 0 and 1")
    if not (math.isfinite(config.noise_multiplier) and config.noise_multiplier > 0):
        raise ConfigError(f"run-config key 'noise-multiplier' = {config.noise_multiplier!r}: the audit "
                          "compares against the ε of a DP configuration, so it must be > 0")
    if not (0.0 < config.target_delta < 1.0):
        raise ConfigError(f"run-config key 'target-delta' = {config.target_delta!r}: the audit's bounds need "
                          "0 < δ < 1")
    check_canary_signal(config)
    if base_examples is None:
        assert data_dirs
        base_examples, _ = load_examples(list(data_dirs), config)
        if config.max_train_examples:
            base_examples = base_examples[: config.max_train_examples]
    train_config = config.replace(dp=noise)

    spec = ModelSpec.from_config(train_config)
    tokenizer = load_tokenizer(spec)
    device = choose_device(train_config.device)
    canaries = make_canaries(m, tokenizer, seed=seed, avoid=base_examples)
    coins = np.random.default_rng(np.random.SeedSequence([seed, 0xC011])).integers(0, 2, size=m).astype(bool)
    included = [c for c, inside in zip(canaries, coins, strict=True) if inside]
    examples = list(base_examples) + included
    # Before any training: a setting whose audit cannot fail is refused, not run.
    plan = plan_audit(count_records(examples), config, calls=calls, m=m, k_plus=k_plus, k_minus=k_minus,
                      confidence=confidence)

    model = build_model(spec)
    _check_embeddings_train(model)
    before = label_log_odds(model, canaries, tokenizer, train_config, device=device)
    # The audit trains on real records, so its spend is recorded durably like any other
    # (out_dir/canary-privacy-state.json accumulates every audit run there), each call
    # checked and committed as a merchant's would be. The *claim* tested is this audit's
    # calls composed, computed from their own mechanisms below.
    privacy = None
    if noise:
        out_dir.mkdir(parents=True, exist_ok=True)
        privacy = PrivacyState.open(out_dir / STATE_FILE, merchant_id="canary-audit",
                                    target_epsilon=math.inf, target_delta=train_config.target_delta)
    run_id = f"canary-audit-{uuid.uuid4().hex[:12]}"
    results = [trainer.train(model, examples, tokenizer, train_config, privacy=privacy, round=call,
                             model_version=call, run_id=run_id, device=device)
               for call in range(calls)]
    after = label_log_odds(model, canaries, tokenizer, train_config, device=device)
    scores = after - before  # how much more likely training made each canary's own label

    mechanisms: list[MechanismEvent]
    if noise:
        mechanisms = [result.mechanism for result in results if result.mechanism is not None]
        assert len(mechanisms) == calls, "a private call returned no mechanism"
        claimed = claim(mechanisms, train_config.target_delta)
        epsilon_state = results[-1].epsilon
    else:
        mechanisms = [plan.mechanism] * calls
        claimed = plan.epsilon_claimed
        epsilon_state = 0.0

    # Ranked within each label (public, fixed before training, so the counts per label are
    # fixed too): the shared layers' drift towards one label lifts every excluded canary of
    # that label alike, so within a label only memorisation ranks.
    labels = np.array([c.target for c in canaries])
    guess = guesses(scores, k_plus=k_plus, k_minus=k_minus, strata=labels)
    truth = np.where(coins, 1, -1)
    r = int(np.count_nonzero(guess))
    v = int(np.count_nonzero(guess == truth))
    bounds = auditing.lower_bounds(m=m, r=r, v=v, delta=config.target_delta, confidence=confidence)
    audit = CanaryAuditResult(
        m=m, k_plus=k_plus, k_minus=k_minus, r=r, v=v, epsilon_lower_bound=bounds.largest,
        epsilon_lower_bound_steinke=bounds.steinke, epsilon_lower_bound_fdp=bounds.fdp,
        power_steinke=plan.power.steinke, power_fdp=plan.power.fdp, power_expected=plan.power_expected,
        epsilon_claimed=float(claimed), delta=config.target_delta, dp=noise,
        noise_multiplier=config.noise_multiplier, calls=calls, steps=sum(result.steps for result in results),
        sample_rate=plan.mechanism.sample_rate, seen=plan.seen, confidence=confidence,
        epsilon_state=float(epsilon_state), mechanisms=[mechanism.to_dict() for mechanism in mechanisms],
        passed=bounds.largest <= claimed,
    )
    log.info("canary audit (%s, %d calls): %d/%d right guesses, ε lower bound %.3f (f-DP) / %.3f (Steinke) "
             "vs claimed %.3f", "DP" if noise else "no noise", calls, v, r, bounds.fdp, bounds.steinke, claimed)
    atomic.write_json(Path(out_dir) / RESULT_FILE, audit.to_dict(), indent=2)
    return audit
