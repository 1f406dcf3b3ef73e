"""Turn rows into token ids and loss targets, and group them into padded batches.

Instruction rows become ``prompt + response + EOS``; the loss targets (``labels``) are the
response tokens and EOS, with ``-100`` on the prompt (unless ``response_only=False``) and on
padding. Classification rows become the tokenised text (and optional ``text_b``) with an integer
label. Everything downstream (fine-tuning, per-example loss, per-example gradients) reads the
same :class:`Encoded`, so the loss an example is scored with is the loss it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from infscope.data.formatting import format_prompt
from infscope.errors import InfscopeError

IGNORE_INDEX = -100
_CAUSAL_TASKS = ("causal", "instruction")


@dataclass
class Encoded:
    """Token ids and loss targets of a list of rows, in row order.

    ``labels`` holds one list per row (causal: ``-100`` where no loss is taken) or one int per
    row (classification). ``pad_token_id`` is what :func:`batches` pads ``input_ids`` with.
    """

    ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]] | list[int]
    task: str
    pad_token_id: int
    truncated: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def attention_mask(self) -> list[list[int]]:
        """All-ones mask per row (unpadded); :func:`batches` pads it with zeros."""
        return [[1] * len(seq) for seq in self.input_ids]

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens per row."""
        return np.array([len(seq) for seq in self.input_ids], dtype=np.int64)

    def n_targets(self) -> np.ndarray:
        """Number of loss targets per row (tokens predicted; 1 for classification)."""
        if self.task == "classification":
            return np.ones(len(self), dtype=np.int64)
        # the first token is never predicted (labels are shifted by one)
        return np.array([sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in self.labels], dtype=np.int64)

    def subset(self, rows: Sequence[int]) -> Encoded:
        """The encoded rows at the given positions, in that order."""
        rows = list(rows)
        keep = {self.ids[i] for i in rows}
        return Encoded(
            ids=[self.ids[i] for i in rows],
            input_ids=[self.input_ids[i] for i in rows],
            labels=[self.labels[i] for i in rows],
            task=self.task,
            pad_token_id=self.pad_token_id,
            truncated=[i for i in self.truncated if i in keep],
        )


def _normalise_task(task: str) -> str:
    if task in _CAUSAL_TASKS:
        return "causal"
    if task == "classification":
        return task
    raise InfscopeError(f"unknown task {task!r}; use causal (instruction rows) or classification")


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _name_rows(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _fit(
    prompt: list[int], response: list[int], max_length: int, keep_first: bool
) -> tuple[list[int], list[int]]:
    """Shorten ``prompt + response`` to ``max_length``, keeping at least a quarter for the response.

    The response is cut from the right (its beginning is what the prompt conditions most); the
    prompt is cut from the left (the instruction's end sits next to the response), keeping a
    leading BOS token when ``keep_first``.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    min_response = min(len(response), max(1, max_length // 4))
    n_response = max(min_response, min(len(response), max_length - len(prompt)))
    n_prompt = max_length - n_response
    if n_prompt < len(prompt):
        if keep_first and n_prompt > 0:
            prompt = prompt[:1] + (prompt[len(prompt) - n_prompt + 1 :] if n_prompt > 1 else [])
        else:
            prompt = prompt[len(prompt) - n_prompt :] if n_prompt > 0 else []
    return prompt, response[:n_response]


def _encode_causal(
    rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, response_only: bool
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    ids = [str(r["id"]) for r in rows]
    empty = [i for i, r in zip(ids, rows, strict=True) if not str(r.get("output") or "").strip()]
    if empty:
        raise InfscopeError(
            f"rows {_name_rows(empty)} have an empty output, so there is no response to train on; "
            "drop or fill them"
        )
    prompts = tokenizer([format_prompt(r) for r in rows], add_special_tokens=True)["input_ids"]
    responses = tokenizer([str(r["output"]) for r in rows], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    bos = getattr(tokenizer, "bos_token_id", None)
    input_ids, labels, truncated = [], [], []
    for row_id, prompt, response in zip(ids, prompts, responses, strict=True):
        full_response = list(response) + ([int(eos)] if eos is not None else [])
        keep_first = bos is not None and len(prompt) > 0 and prompt[0] == bos
        p, r = _fit(list(prompt), full_response, max_length, keep_first)
        if len(p) + len(r) < len(prompt) + len(full_response):
            truncated.append(row_id)
        input_ids.append(p + r)
        labels.append((p if not response_only else [IGNORE_INDEX] * len(p)) + r)
    no_target = [i for i, lab in zip(ids, labels, strict=True) if all(t == IGNORE_INDEX for t in lab[1:])]
    if no_target:
        raise InfscopeError(
            f"rows {_name_rows(no_target)} have no target tokens after truncation; raise max_length"
        )
    return input_ids, labels, truncated


def _label_index(rows: Sequence[dict[str, Any]], label_names: Sequence[Any] | None) -> list[int]:
    lookup = {name: i for i, name in enumerate(label_names)} if label_names is not None else None
    out, bad = [], []
    for r in rows:
        value = r.get("label")
        if lookup is not None and value in lookup:
            value = lookup[value]
        elif isinstance(value, str) and value.strip().isdigit() and lookup is None:
            value = int(value)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
            out.append(int(value))
        else:
            bad.append(str(r.get("id")))
    if bad:
        raise InfscopeError(
            f"rows {_name_rows(bad)} have no valid label (need ints 0..K-1 or names in label_names); fix the labels"
        )
    return out


def _encode_classification(
    rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, label_names: Sequence[Any] | None
) -> tuple[list[list[int]], list[int], list[str]]:
    missing = [str(r.get("id")) for r in rows if not str(r.get("text") or "").strip()]
    if missing:
        raise InfscopeError(f"rows {_name_rows(missing)} have no text; drop them or fill the text column")
    texts = [str(r["text"]) for r in rows]
    pairs = [r.get("text_b") for r in rows]
    if any(p is not None for p in pairs):
        full = tokenizer(texts, [str(p or "") for p in pairs], add_special_tokens=True)["input_ids"]
        enc = tokenizer(texts, [str(p or "") for p in pairs], truncation=True, max_length=max_length)[
            "input_ids"
        ]
    else:
        full = tokenizer(texts, add_special_tokens=True)["input_ids"]
        enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    truncated = [str(r["id"]) for r, a, b in zip(rows, full, enc, strict=True) if len(a) != len(b)]
    return [list(e) for e in enc], _label_index(rows, label_names), truncated


def encode_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    task: str,
    max_length: int = 256,
    response_only: bool = True,
    label_names: Sequence[Any] | None = None,
) -> Encoded:
    """Tokenise rows for the loss: instruction rows as prompt+response+EOS, or text with a label.

    ``task`` is ``"causal"`` (alias ``"instruction"``) or ``"classification"``. Rows that do not
    fit in ``max_length`` are cut (prompt from the left, response from the right, at least a
    quarter of the length kept for the response) and their ids listed in ``Encoded.truncated``.
    String labels are mapped through ``label_names`` when given.
    """
    task = _normalise_task(task)
    if max_length < 2:
        raise InfscopeError(f"max_length must be at least 2, got {max_length}; pass a larger --max-length")
    if not rows:
        raise InfscopeError("no rows to encode; check that the dataset is not empty")
    bad_ids = [i for i, r in enumerate(rows) if "id" not in r]
    if bad_ids:
        raise InfscopeError(
            f"rows at positions {bad_ids[:5]} have no 'id'; load data with infscope.data.loading"
        )
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise InfscopeError("row ids are not unique; give every row a distinct id")
    if task == "causal":
        input_ids, labels, truncated = _encode_causal(rows, tokenizer, max_length, response_only)
    else:
        input_ids, labels, truncated = _encode_classification(rows, tokenizer, max_length, label_names)
    return Encoded(ids, input_ids, labels, task, _pad_id(tokenizer), truncated)


def batch_order(n: int, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> list[np.ndarray]:
    """Row positions of each batch; a seeded permutation when ``shuffle``."""
    if batch_size < 1:
        raise InfscopeError(f"batch_size must be at least 1, got {batch_size}; pass a positive --batch-size")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def collate(encoded: Encoded, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """Right-padded tensors ``input_ids``, ``attention_mask``, ``labels`` for the given rows."""
    rows = list(rows)
    seqs = [encoded.input_ids[i] for i in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), width), encoded.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, seq in enumerate(seqs):
        input_ids[j, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[j, : len(seq)] = 1
    if encoded.task == "classification":
        labels = torch.as_tensor([encoded.labels[i] for i in rows], dtype=torch.long)
    else:
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for j, i in enumerate(rows):
            labels[j, : len(encoded.labels[i])] = torch.as_tensor(encoded.labels[i], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    encoded: Encoded, batch_size: int, shuffle: bool = False, seed: int = 0, *, with_index: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches; with ``with_index`` each batch also holds ``index`` (row positions)."""
    for rows in batch_order(len(encoded), batch_size, shuffle=shuffle, seed=seed):
        batch = collate(encoded, rows)
        if with_index:
            batch["index"] = torch.as_tensor(rows, dtype=torch.long)
        yield batch
