"""A small learnable ctr task shared by trainer and audit tests: click iff 'good' words."""

from __future__ import annotations

import random

from shared.tasks import Example

GOOD = ["premium", "durable", "leather", "handcrafted", "sturdy"]
BAD = ["cheap", "flimsy", "plastic", "fragile", "knockoff"]
NOUNS = ["bag", "wallet", "belt", "shoes", "jacket", "case", "chair", "lamp"]


def product_examples(n: int, seed: int) -> list[Example]:
    """Click iff the product text uses 'good' words: learnable from the text alone."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        clicked = i % 2
        words = rng.sample(GOOD if clicked else BAD, 2) + [rng.choice(NOUNS)]
        rng.shuffle(words)
        out.append(Example(task="ctr", context="", product=" ".join(words), target=float(clicked)))
    return out
