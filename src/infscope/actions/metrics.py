"""Test-set metrics of a tuned model: mean loss, and accuracy or exact match where the task has answers.

* Classification: ``loss`` (mean cross-entropy) and ``accuracy`` (argmax of the classifier's logits).
* Instruction data whose reference answers hold numbers (math-style, at least half of the rows):
  ``loss`` and ``exact_match``, the share of rows whose final number in a greedy generation equals
  the final number of the reference (numbers compared as values, thousands commas ignored). This
  is real generation, not a proxy: up to ``max_new_tokens`` (default: the longest reference answer
  plus 8 tokens) are decoded greedily, batched with left padding.
* Other instruction data: ``loss`` only.

:func:`primary_metric` names the metric the cleaning loop compares rounds by. Each metric comes with
its standard error over the rows (``loss_se``, ``accuracy_se``, ``exact_match_se``: the sample
standard deviation of the per-row values over sqrt(n)), so a gain can be read against the noise of
a finite test set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import torch

from infscope.actions.relabel import class_losses
from infscope.data.formatting import chat_messages, format_prompt, is_chat_row
from infscope.models.encode import chat_renderer, encode_rows
from infscope.models.loss import model_device, per_example_loss
from infscope.noise.inject import label_noise_applies
from infscope.noise.label import NUMBER_RE


def primary_metric(task: str, rows: Sequence[Mapping[str, Any]], generate: bool = True) -> tuple[str, bool]:
    """``(metric name, higher is better)`` the loop compares rounds by for this task and test set."""
    if task == "classification":
        return "accuracy", True
    if generate and label_noise_applies(rows, "instruction"):
        return "exact_match", True
    return "loss", False


def final_number(text: str) -> Decimal | None:
    """The last number in ``text`` as a value (``1,200.50`` -> 1200.50), or ``None``."""
    matches = NUMBER_RE.findall(str(text))
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only matches digits
        return None


def _prompt_text(row: Mapping[str, Any], tokenizer: Any) -> tuple[str, bool]:
    """The text generation starts from and whether the tokenizer adds special tokens (as in encoding)."""
    if is_chat_row(row):
        return chat_renderer(tokenizer)(chat_messages(row)[:-1], True), False
    return format_prompt(row), True


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    max_length: int = 256,
) -> list[str]:
    """Greedy continuations of each row's prompt (batched, left padded), special tokens removed."""
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = []
    for row in rows:
        text, special = _prompt_text(row, tokenizer)
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        prompts.append(list(ids)[-max(1, max_length - max_new_tokens) :])
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, p in enumerate(chunk):
                input_ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            out.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def exact_match(answers: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per row: whether the final numbers of answer and reference are equal (``False`` if either has none)."""
    out = []
    for answer, reference in zip(answers, references, strict=True):
        a, b = final_number(answer), final_number(reference)
        out.append(a is not None and b is not None and a == b)
    return np.array(out, dtype=bool)


def test_metrics(
    loaded: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    task: str,
    label_names: Sequence[Any] | None = None,
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
    generate: bool = True,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """The metrics of :func:`primary_metric`'s family for the tuned model ``loaded`` on test ``rows``."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if task == "classification":
        losses = class_losses(model, tokenizer, rows, label_names=label_names, max_length=max_length,
                              batch_size=batch_size)  # fmt: skip
        labels = np.array([int(r["label"]) for r in rows])
        row_loss = losses[np.arange(len(rows)), labels]
        return {**_mean_se("loss", row_loss), **_mean_se("accuracy", losses.argmin(axis=1) == labels)}
    encoded = encode_rows(rows, tokenizer, task="causal", max_length=max_length, response_only=response_only)
    metrics = _mean_se("loss", per_example_loss(model, encoded, batch_size=batch_size))
    if primary_metric(task, rows, generate)[0] == "exact_match":
        references = [
            str(chat_messages(r)[-1]["content"]) if is_chat_row(r) else str(r["output"]) for r in rows
        ]
        if max_new_tokens is None:
            lengths = tokenizer(references, add_special_tokens=False)["input_ids"]
            max_new_tokens = min(512, max(len(t) for t in lengths) + 8)
        answers = greedy_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 max_length=max_length)  # fmt: skip
        metrics.update(_mean_se("exact_match", exact_match(answers, references)))
    return metrics


def _mean_se(name: str, values: Any) -> dict[str, float]:
    """``{name: mean, name_se: standard error of the mean}`` of per-row values (se 0 for one row)."""
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return {name: float(v.mean()), f"{name}_se": se}
