"""The canaries of the one-run privacy audit: records with a random label and a rare token
of their own, planted in a merchant's data; the attack's score of each, and its guesses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client import encoding
from shared.config import RunConfig
from shared.tasks import Example, task_of

CANARY_PREFIX = "canary-"


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
    dataset = encoding.encode(canaries, tokenizer, max_seq_len=config.max_seq_len)
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
