"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

"Privacy Auditing with One (1) Training Run" (arXiv:2305.08846) turns one ordinary training
call into a statistical test of the ε the accountant claims:

1. make ``m`` canary records; include each one in the merchant's training data
   independently with probability 1/2 (a seeded coin per canary);
2. train exactly as fedshop trains (``client.trainer.train``; DP-SGD when ``noise``);
3. score every canary with the trained model, guess "included" for the ``k_plus`` highest
   scores and "excluded" for the ``k_minus`` lowest (ranked within each label, see below),
   abstain on the rest;
4. with ``r = k_plus + k_minus`` guesses of which ``v`` are right, an (ε, δ)-DP training
   cannot make ``v`` large: the paper's theorem for (ε, δ)-DP bounds the chance of ``v`` or
   more right guesses by

       P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2·m·δ · max_{i=1..v} P[v > Binomial(r, e^ε/(1+e^ε)) ≥ v−i] / i,

   so every ε for which that p-value is below β = 1 − confidence is rejected, and the
   largest such ε (``epsilon_lower_bound``) is an empirical lower bound on the training's
   true ε at that confidence.

A lower bound above the accountant's ε would mean the implementation leaks more than it
claims (a bug: noise not added, sampling not Poisson, a per-round accountant, ...). The
bound from one run is loose by design (r guesses, all right, prove at most about
ln(r / 3) at 95%), so a bound below the claim is what a correct implementation shows; to
see that the audit *can* fail, run it with ``noise=False``: then the bound must exceed the
ε the DP configuration claims.

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
budget may be spent (synthetic or test data), or count the spend.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import trainer
from shared.config import ConfigError, RunConfig
from shared.model import ModelSpec, build_model, choose_device, load_tokenizer
from shared.privacy import accounting
from shared.privacy.budget import PrivacyState
from shared.privacy.events import MechanismEvent
from shared.tasks import Example, count_records, task_of
from simulations.local import load_examples

log = logging.getLogger(__name__)

RESULT_FILE = "canary_audit.json"
CANARY_PREFIX = "canary-"
_BISECTION_STEPS = 60  # halves [0, ε_max] 60 times: far below any ε resolution that matters


@dataclasses.dataclass(frozen=True)
class CanaryAuditResult:
    """One audit: the guesses, the empirical ε lower bound and the ε the accountant claims."""

    m: int  # canaries made (each included with probability 1/2)
    k_plus: int  # guesses "included" (highest scores)
    k_minus: int  # guesses "excluded" (lowest scores)
    r: int  # guesses made: k_plus + k_minus
    v: int  # correct guesses
    epsilon_lower_bound: float  # at ``confidence``, for δ = ``delta``
    epsilon_claimed: float  # accountant's ε for this training (DP config's ε when noise was off)
    delta: float
    dp: bool  # whether the training added noise (noise=True) or was non-private
    noise_multiplier: float  # σ of the DP configuration (claimed; applied only when dp)
    steps: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the bound
def _p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Chance of ``v`` or more right guesses out of ``r`` if training were (ε, δ)-DP."""
    p = 1.0 / (1.0 + math.exp(-epsilon))  # e^ε / (1 + e^ε): ε-DP randomized response's accuracy
    tail = float(stats.binom.sf(v - 1, r, p))  # P[W >= v]
    if delta == 0.0 or v == 0:
        return min(1.0, tail)
    # P[v > W >= v - i] for i = 1..v is the running sum of pmf(v-1), pmf(v-2), ..., pmf(0).
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)
    band = np.cumsum(below) / np.arange(1, v + 1)
    return min(1.0, tail + 2.0 * m * delta * float(band.max()))


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that ``v`` right guesses out of ``r`` (``m`` canaries) reject at ``confidence``.

    Steinke, Nasr & Jagielski's bound for (ε, δ)-DP, found by bisection on ε (the p-value's
    binomial tail grows with ε): every ε below the returned value is rejected with
    confidence ``confidence``; 0 when nothing is (e.g. no better than chance, ``v <= r / 2``).
    """
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m; got m = {m!r}, r = {r!r}, v = {v!r}")
    if not (0.0 <= delta < 1.0):
        raise ValueError(f"delta = {delta!r}: must lie in [0, 1)")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence = {confidence!r}: must lie strictly between 0 and 1")
    beta = 1.0 - confidence

    def rejected(epsilon: float) -> bool:
        return _p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) < beta

    if r == 0 or not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # even v = r stops rejecting near ln(r / ln(1/β)): a few doublings
        low, high = high, 2.0 * high
        if high > 1e4:
            raise ArithmeticError(f"ε lower bound did not converge (m = {m}, r = {r}, v = {v})")
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


# --------------------------------------------------------------------------- canaries
def _whole_word_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Vocabulary words that tokenize to themselves as one token: candidate canary words.

    Plain ASCII letters only (no '##' continuation pieces, no special or unused tokens);
    ``make_canaries`` checks each drawn word by a tokenizer round trip as well, so a canary's
    text reaches the model as exactly its own tokens.
    """
    words: dict[str, int] = {}
    special = set(tokenizer.all_special_tokens)
    for token, index in tokenizer.get_vocab().items():
        if token in special or len(token) < 3 or not (token.isascii() and token.isalpha()):
            continue
        words[token] = index
    return words


def _used_ids(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> set[int]:
    used: set[int] = set()
    for example in examples:
        for text in (example.context, example.product):
            if text:
                used.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return used


def make_canaries(
    m: int, tokenizer: PreTrainedTokenizerBase, *, seed: int, avoid: Sequence[Example] = ()
) -> list[Example]:
    """``m`` ctr canaries of 3-4 words each, no word shared with another canary or with ``avoid``.

    Labels are random 0/1, so no shared parameter (a head bias, say) can fit every canary at
    once: a shift towards one label helps half of them and hurts the other half. Only a
    canary's own, unique embedding rows can fit its label.
    """
    if m < 1:
        raise ValueError(f"m = {m!r}: need at least one canary")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA7A]))
    used = _used_ids(avoid, tokenizer)
    candidates = sorted(word for word, index in _whole_word_ids(tokenizer).items() if index not in used)
    order = rng.permutation(len(candidates))
    sizes = rng.integers(3, 5, size=m)  # 3 or 4 words
    labels = rng.integers(0, 2, size=m)
    canaries: list[Example] = []
    position = 0
    for i in range(m):
        words: list[str] = []
        while len(words) < sizes[i]:
            if position >= len(order):
                raise ValueError(
                    f"m = {m}: the vocabulary has only {len(candidates)} usable whole words not used by "
                    "the training data; ask for fewer canaries"
                )
            word = candidates[order[position]]
            position += 1
            if tokenizer.tokenize(word) == [word]:  # the round trip; rejects nothing on BERT vocabularies
                words.append(word)
        name = f"{CANARY_PREFIX}{i}"
        canaries.append(Example(task="ctr", context="", product=" ".join(words), target=float(labels[i]),
                                group=name, product_id=name))
    return canaries


@torch.no_grad()
def label_log_odds(
    model: nn.Module,
    canaries: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    config: RunConfig,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    """Each canary's log-odds of its own label, ln P(label) / P(other label), in eval mode.

    For a ctr record that is the ctr head's logit, signed by the label. Unlike the loss
    (which cannot fall below 0), it does not saturate: once the model calls every unseen
    canary-like text "clicked", a memorised label-1 canary still gains log-odds over an
    unseen one, whereas its loss gain is capped at its initial loss, about ln 2.
    """
    dataset = trainer.encode(canaries, tokenizer, max_seq_len=config.max_seq_len)
    was_training = model.training
    model.to(device)
    model.eval()
    out: list[torch.Tensor] = []
    for input_ids, attention_mask, token_type_ids, packed in DataLoader(dataset, batch_size=batch_size):
        length = max(int(attention_mask.sum(1).max().item()), 1)  # drop all-padding columns
        scores = model(input_ids[:, :length].to(device), attention_mask[:, :length].to(device),
                       token_type_ids[:, :length].to(device))
        task = task_of(packed).unsqueeze(1)
        logit = scores.cpu().gather(1, task).squeeze(1)
        label = packed.gather(1, task).squeeze(1)
        out.append(torch.where(label >= 0.5, logit, -logit))
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.float64)


def _apportion(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainders, sum exact)."""
    whole = sum(sizes)
    exact = [total * n / whole for n in sizes]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def guesses(
    scores: np.ndarray, *, k_plus: int, k_minus: int, strata: np.ndarray | None = None
) -> np.ndarray:
    """+1 ("included") for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, else 0.

    With ``strata`` (one public key per canary, e.g. its label) the ranking is done within
    each stratum, each taking its share of ``k_plus`` and ``k_minus`` in proportion to its
    size; a shift common to a whole stratum then moves no guess. The shares depend only on
    the strata, never on the scores, so the counts stay fixed in advance.
    """
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"k_plus = {k_plus}, k_minus = {k_minus}: need both >= 0 and a sum <= m = {m}")
    keys = np.zeros(m, dtype=np.int64) if strata is None else np.unique(strata, return_inverse=True)[1]
    if len(keys) != m:
        raise ValueError(f"strata has {len(keys)} entries for {m} scores")
    members = [np.flatnonzero(keys == key) for key in range(int(keys.max()) + 1 if m else 0)]
    sizes = [len(idx) for idx in members]
    plus = _apportion(k_plus, sizes) if m else []
    minus = _apportion(k_minus, sizes) if m else []
    # Rounding can overfill a stratum by one when few or no canaries are left to abstain on;
    # move such a surplus "excluded" guess to a stratum with room (the totals stay the same).
    for i, size in enumerate(sizes):
        while plus[i] + minus[i] > size:
            minus[i] -= 1
            minus[next(j for j in range(len(sizes)) if plus[j] + minus[j] < sizes[j])] += 1
    guess = np.zeros(m, dtype=np.int64)
    for idx, k_up, k_down in zip(members, plus, minus, strict=True):
        order = idx[np.argsort(scores[idx], kind="stable")]
        guess[order[:k_down]] = -1
        guess[order[len(order) - k_up:]] = 1
    return guess


# --------------------------------------------------------------------------- the audit
def run_canary_audit(
    data_dirs: list[Path] | None,
    config: RunConfig,
    *,
    m: int = 1000,
    k_plus: int | None = None,
    k_minus: int | None = None,
    noise: bool = True,
    seed: int = 0,
    out_dir: Path,
    base_examples: list[Example] | None = None,
    confidence: float = 0.95,
) -> CanaryAuditResult:
    """Audit one merchant's training (its ``data_dirs`` pooled, or ``base_examples``) with ``m`` canaries.

    ``noise=True`` trains with DP-SGD as configured and claims the accountant's ε for that
    training; ``noise=False`` trains non-privately on the same data for the same number of
    steps and claims the ε the DP configuration would have reported: the audit is then
    expected to find a lower bound above that claim. ``seed`` draws the canaries and their
    coins; ``config.seed`` still draws the model (and, with ``noise=False``, the batches; a
    private run draws its batches and noise afresh, ``client.dp.private_generators``). The result is also
    written to ``out_dir / canary_audit.json``.
    """
    if base_examples is None:
        if not data_dirs:
            raise ValueError("give the merchant's data_dirs or base_examples")
        base_examples, _ = load_examples(list(data_dirs), config)
        if config.max_train_examples:
            base_examples = base_examples[: config.max_train_examples]
    # The guess counts are fixed here, before any score exists. Choosing them after looking
    # at the scores (say, the cut that maximises the bound) would be a data-dependent test,
    # and the confidence level below would no longer hold.
    k_plus = m // 4 if k_plus is None else k_plus
    k_minus = m // 4 if k_minus is None else k_minus
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"k_plus = {k_plus}, k_minus = {k_minus}: need both >= 0 and a sum <= m = {m}")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence = {confidence!r}: must lie strictly between 0 and 1")
    if not (math.isfinite(config.noise_multiplier) and config.noise_multiplier > 0):
        raise ConfigError(f"run-config key 'noise-multiplier' = {config.noise_multiplier!r}: the audit "
                          "compares against the ε of a DP configuration, so it must be > 0")
    train_config = config.replace(dp=noise)

    spec = ModelSpec.from_config(train_config)
    tokenizer = load_tokenizer(spec)
    device = choose_device(train_config.device)
    canaries = make_canaries(m, tokenizer, seed=seed, avoid=base_examples)
    coins = np.random.default_rng(np.random.SeedSequence([seed, 0xC011])).integers(0, 2, size=m).astype(bool)
    included = [c for c, inside in zip(canaries, coins, strict=True) if inside]
    examples = list(base_examples) + included

    model = build_model(spec)
    before = label_log_odds(model, canaries, tokenizer, train_config, device=device)
    # The audit trains on real records, so its spend is recorded durably like any other
    # (out_dir/canary-privacy-state.json accumulates every audit run there). The *claim*
    # tested is this training's ε alone, computed from its own mechanism below.
    privacy = None
    if noise:
        out_dir.mkdir(parents=True, exist_ok=True)
        privacy = PrivacyState.open(out_dir / "canary-privacy-state.json", merchant_id="canary-audit",
                                    target_epsilon=math.inf, target_delta=train_config.target_delta,
                                    accountant=train_config.accountant)
    result = trainer.train(model, examples, tokenizer, train_config, privacy=privacy, device=device)
    after = label_log_odds(model, canaries, tokenizer, train_config, device=device)
    scores = after - before  # how much more likely training made each canary's own label

    if noise:
        assert result.mechanism is not None
        claimed = accounting.epsilon([result.mechanism], train_config.target_delta, train_config.accountant)
    else:
        sample_rate, steps = trainer.planned_steps(count_records(examples), config)
        planned = MechanismEvent(noise_multiplier=config.noise_multiplier, sample_rate=sample_rate,
                                 steps=steps, max_grad_norm=config.max_grad_norm)
        claimed = accounting.epsilon([planned], config.target_delta, config.accountant)

    # Ranked within each label (public, fixed before training, so the counts per label are
    # fixed too): the shared layers' drift towards one label lifts every excluded canary of
    # that label alike, so within a label only memorisation ranks.
    labels = np.array([c.target for c in canaries])
    guess = guesses(scores, k_plus=k_plus, k_minus=k_minus, strata=labels)
    truth = np.where(coins, 1, -1)
    r = int(np.count_nonzero(guess))
    v = int(np.count_nonzero(guess == truth))
    bound = epsilon_lower_bound(m=m, r=r, v=v, delta=config.target_delta, confidence=confidence)
    audit = CanaryAuditResult(
        m=m, k_plus=k_plus, k_minus=k_minus, r=r, v=v, epsilon_lower_bound=bound,
        epsilon_claimed=float(claimed), delta=config.target_delta, dp=noise,
        noise_multiplier=config.noise_multiplier, steps=result.steps, confidence=confidence,
    )
    log.info("canary audit (%s): %d/%d right guesses, ε lower bound %.3f vs claimed %.3f",
             "DP" if noise else "no noise", v, r, audit.epsilon_lower_bound, audit.epsilon_claimed)
    _write_json(Path(out_dir) / RESULT_FILE, audit.to_dict())
    return audit


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
