"""A merchant's examples as model inputs: token ids, attention mask, token types, packed targets.

Training and evaluation read the same tensors (``shared.model.tokenize_pairs`` cuts every pair
alike); ``trim`` drops the padding a batch does not use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, TensorDataset
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from shared.model import tokenize_pairs
from shared.tasks import Example, group_records, pack_targets


class PairDataset(Dataset):
    """One sample per data record: its (context, product) pair, tokenised on access, and its
    targets packed in ``TASKS`` order (NaN where it has none). The record is the DP unit, so
    Poisson sampling, clipping and the sample rate all count records, not task examples.

    Lazy on purpose: a call with a step cap touches a few hundred of a merchant's tens of
    thousands of records, and tokenising them all up front cost more than the training.
    """

    def __init__(self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int) -> None:
        if not examples:
            raise ValueError("no examples to encode")
        records = group_records(examples)
        self.pairs = [(members[0].context, members[0].product) for members in records]
        # Record indices per privacy unit (``Example.unit``; none: the record is its own unit), in
        # order of first appearance: what user-level DP-SGD samples (``client.dp.one_record_per_unit``).
        by_unit: dict[str | int, list[int]] = {}
        for index, members in enumerate(records):
            by_unit.setdefault(members[0].unit or -1 - index, []).append(index)
        self.units = list(by_unit.values())
        self.targets = torch.tensor([pack_targets(members) for members in records], dtype=torch.float32)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        context, product = self.pairs[index]
        enc = tokenize_pairs(self.tokenizer, [context], [product], self.max_seq_len)
        return enc["input_ids"][0], enc["attention_mask"][0], enc["token_type_ids"][0], self.targets[index]


def encode(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int
) -> TensorDataset:
    """Tokenise all examples at once, one row each (batched; for evaluation, where every
    example is used and each is scored on its own task)."""
    if not examples:
        raise ValueError("no examples to encode")
    enc = tokenize_pairs(tokenizer, [e.context for e in examples], [e.product for e in examples], max_seq_len)
    packed = torch.tensor([pack_targets([e]) for e in examples], dtype=torch.float32)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], packed)


def trim(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Drop padding columns no example in the batch uses; saves most of the compute at seq 64."""
    input_ids, attention_mask, token_type_ids, packed = batch
    length = max(int(attention_mask.sum(1).max().item()), 1) if len(input_ids) else 1
    # contiguous(): Opacus' embedding norm sampler calls .view() on the index tensor.
    return (input_ids[:, :length].contiguous().to(device), attention_mask[:, :length].contiguous().to(device),
            token_type_ids[:, :length].contiguous().to(device), packed.to(device))
