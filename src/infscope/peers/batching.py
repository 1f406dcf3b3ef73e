"""Row-index datasets and collate functions that hand peers the pipeline's own padded batches.

Peers take torch ``Dataset``/``DataLoader`` objects. The dataset here yields row positions and the
collate function pads them with :func:`infscope.models.encode.collate`, so every peer sees the
same token ids, attention masks and ``-100`` loss targets as our gradient engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from infscope.models.encode import Encoded, collate


class RowDataset(Dataset):
    """``len(encoded)`` items; item ``i`` is ``(encoded, i)`` and padding happens at collate.

    Carrying the :class:`Encoded` in each item lets one collate function serve both the training
    and the query dataset (kronfluence sets a single collate function per analyzer).
    """

    def __init__(self, encoded: Encoded) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[Encoded, int]:
        return self.encoded, int(index)


def _rows_of(items: Sequence[tuple[Encoded, int]]) -> tuple[Encoded, list[int]]:
    encoded = items[0][0]
    if any(item[0] is not encoded for item in items):
        raise ValueError("a batch mixes rows of two datasets")
    return encoded, [int(item[1]) for item in items]


def collate_dict(items: Sequence[tuple[Encoded, int]]) -> dict[str, torch.Tensor]:
    """The pipeline's padded dict batch (``input_ids``, ``attention_mask``, ``labels``)."""
    return collate(*_rows_of(items))


def collate_tuple(items: Sequence[tuple[Encoded, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` for peers that vmap over tuple batches (dattri).

    Causal rows are right-padded and the model is causal, so dropping the attention mask leaves
    every target token's logits unchanged (padding only follows real tokens); classification needs
    the mask, so its loaders use one row per batch and no padding at all.
    """
    batch = collate_dict(items)
    return batch["input_ids"], batch["labels"]


def row_loader(encoded: Encoded, batch_size: int, collate_fn: Callable = collate_tuple) -> DataLoader:
    """An unshuffled loader over all rows in order."""
    return DataLoader(RowDataset(encoded), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
