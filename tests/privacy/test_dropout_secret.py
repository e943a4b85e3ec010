"""Dropout masks of a private call are secret (issue "Privacy end to end", finding 12).

``build_model`` seeds torch's global generator from the run config, and the trainer drew its
dropout masks from it: every private call in every process used the same masks. A private
call now forks the global generator and reseeds it from OS entropy for the call's steps
(``client.trainer.secret_dropout``); a non-private call keeps its reproducible masks. The
generator's seed seen inside the model's forward tells which generator a mask came from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from client.trainer import train
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, load_tokenizer
from shared.privacy.budget import PrivacyState
from tests.helpers.examples import product_examples

EXAMPLES = product_examples(64, seed=0)
CONFIG = RunConfig(encoder="tiny", trainable="lora", dropout=0.1, batch_size=16, max_local_steps=3, max_seq_len=16,
                   noise_multiplier=1.0, target_epsilon=1e6, seed=0)


def seeds_seen(config: RunConfig, tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> tuple[set[int], bool]:
    """The global generator's seeds the model's forward passes saw, and whether the call left the
    global generator's state as it found it."""
    model = build_model(ModelSpec.from_config(config))  # seeds the global generator from the config
    seen: set[int] = set()
    model.register_forward_pre_hook(lambda *_: seen.add(torch.initial_seed()))
    before = torch.get_rng_state()
    privacy = PrivacyState.open(tmp_path / "state.json", merchant_id="m", target_epsilon=1e6,
                                target_delta=1e-5) if config.dp else None
    train(model, EXAMPLES, tokenizer, config, privacy=privacy)
    return seen, torch.equal(before, torch.get_rng_state())


def test_a_private_call_draws_its_dropout_masks_from_fresh_entropy(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(ModelSpec(encoder="tiny"))
    first, untouched = seeds_seen(CONFIG, tokenizer, tmp_path / "a")
    second, _ = seeds_seen(CONFIG, tokenizer, tmp_path / "b")
    assert first and second
    assert CONFIG.seed not in first | second  # not the config-seeded global generator
    assert first.isdisjoint(second)  # a fresh seed per call
    assert untouched  # the global generator is restored afterwards


def test_a_non_private_call_keeps_reproducible_masks(tmp_path: Path) -> None:
    """The control: without DP the masks come from the config-seeded global generator, the same
    seed in every call (so the check above can tell the two apart)."""
    tokenizer = load_tokenizer(ModelSpec(encoder="tiny"))
    public = RunConfig.from_mapping({**CONFIG.to_mapping(), "dp": False})
    first, untouched = seeds_seen(public, tokenizer, tmp_path / "a")
    second, _ = seeds_seen(public, tokenizer, tmp_path / "b")
    assert len(first) == 1 and first == second
    assert not untouched  # its dropout advanced the (reproducible) global generator
