"""Turn rows into token ids and loss targets, and group them into padded batches.

Instruction rows become ``prompt + response + EOS``; the loss targets (``labels``) are the
response tokens and EOS, with ``-100`` on the prompt (unless ``response_only=False``) and on
padding. Chat rows (``messages``) are rendered with the tokenizer's chat template (or, when it has
none, the built-in one of :func:`infscope.data.formatting.render_chat`, with a warning once) and
the targets are the tokens of every assistant reply, with its end-of-turn marker; system and user
turns are masked. Classification rows become the tokenised text (and optional ``text_b``) with an
integer label. Everything downstream (fine-tuning, per-example loss, per-example gradients) reads the
same :class:`Encoded`, so the loss an example is scored with is the loss it was trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from infscope.data.formatting import chat_messages, format_prompt, is_chat_row, render_chat
from infscope.errors import InfscopeError

IGNORE_INDEX = -100
_CAUSAL_TASKS = ("causal", "instruction")
_FALLBACK_WARNED: set[str] = set()


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


def _check_targets(ids: Sequence[str], labels: Sequence[list[int]]) -> None:
    no_target = [i for i, lab in zip(ids, labels, strict=True) if all(t == IGNORE_INDEX for t in lab[1:])]
    if no_target:
        raise InfscopeError(
            f"rows {_name_rows(no_target)} have no target tokens after truncation; raise max_length"
        )


def _encode_alpaca(
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
    _check_targets(ids, labels)
    return input_ids, labels, truncated


Renderer = Callable[[list[dict[str, str]], bool], str]


def chat_renderer(tokenizer: Any) -> Renderer:
    """``render(turns, add_generation_prompt) -> text`` for chat rows with this tokenizer.

    The tokenizer's own chat template when it has one; otherwise the built-in template
    (:func:`infscope.data.formatting.render_chat`, with the tokenizer's BOS text first and its EOS
    text after each reply), announced by one warning per tokenizer.
    """
    if getattr(tokenizer, "chat_template", None):

        def render(turns: list[dict[str, str]], generation: bool) -> str:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)

        return render
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if name not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(name)
        warnings.warn(
            f"tokenizer {name!r} has no chat template; chat rows use infscope's built-in template "
            "(### System/User/Assistant headers, EOS after each reply); set tokenizer.chat_template "
            "to use another",
            UserWarning,
            stacklevel=3,
        )
    bos = getattr(tokenizer, "bos_token", None) or ""
    eos = getattr(tokenizer, "eos_token", None) or ""

    def render_builtin(turns: list[dict[str, str]], generation: bool) -> str:
        return render_chat(turns, add_generation_prompt=generation, bos=bos, eos=eos)

    return render_builtin


def chat_segments(turns: list[dict[str, str]], render: Renderer, row_id: str) -> list[str]:
    """The rendered conversation cut into ``[other, reply, other, reply, ..., other]`` text pieces.

    A reply's piece runs from the end of the generation prompt before it (``turns[:k]`` rendered
    with ``add_generation_prompt``) to the end of ``turns[:k+1]`` rendered, so it holds the reply
    and its end-of-turn marker. Each prefix must render to a prefix of the whole conversation.
    """
    try:
        full = render(turns, False)
        cuts = []
        for k, turn in enumerate(turns):
            if turn["role"] == "assistant":
                for prefix in (render(turns[:k], True), render(turns[: k + 1], False)):
                    cuts.append(len(prefix) if full.startswith(prefix) else -1)
    except Exception as exc:  # jinja2 template errors and the like, from the tokenizer's own template
        raise InfscopeError(
            f"the chat template rejects row {row_id!r} ({type(exc).__name__}: {exc}); "
            "fix the row's turns or set another tokenizer.chat_template"
        ) from None
    if -1 in cuts or cuts != sorted(cuts):
        raise InfscopeError(
            f"the chat template renders the turns of row {row_id!r} differently in a longer conversation, "
            "so the assistant tokens cannot be found; set a tokenizer.chat_template that renders each "
            "prefix of a conversation as a prefix of it"
        )
    bounds = [0, *cuts, len(full)]
    return [full[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _encode_chat(
    rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, response_only: bool
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Chat rows: template text tokenised piece by piece; targets are every assistant reply.

    All pieces of all rows go through the tokenizer in one call (no special tokens added: the
    template holds them). For truncation the last reply and what follows it is the response
    and everything before it the prompt (see :func:`_fit`).
    """
    ids = [str(r["id"]) for r in rows]
    turns = [chat_messages(r) for r in rows]
    empty = [i for i, t in zip(ids, turns, strict=True) if not t[-1]["content"].strip()]
    if empty:
        raise InfscopeError(
            f"rows {_name_rows(empty)} have an empty last assistant turn, so there is no response to "
            "train on; drop or fill them"
        )
    render = chat_renderer(tokenizer)
    pieces = [chat_segments(t, render, i) for t, i in zip(turns, ids, strict=True)]
    flat = [piece for row_pieces in pieces for piece in row_pieces]
    tokens = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    bos = getattr(tokenizer, "bos_token_id", None)
    input_ids, labels, truncated = [], [], []
    start = 0
    for row_id, row_pieces in zip(ids, pieces, strict=True):
        row_tokens = [list(t) for t in tokens[start : start + len(row_pieces)]]
        start += len(row_pieces)
        # pieces alternate other/reply; the last reply is row_tokens[-2], the tail row_tokens[-1]
        masks = [
            tok if (j % 2 == 1 or not response_only) else [IGNORE_INDEX] * len(tok)
            for j, tok in enumerate(row_tokens)
        ]
        prompt = [t for tok in row_tokens[:-2] for t in tok]
        prompt_labels = [t for m in masks[:-2] for t in m]
        response = row_tokens[-2] + row_tokens[-1]
        response_labels = masks[-2] + masks[-1]
        keep_first = bos is not None and len(prompt) > 0 and prompt[0] == bos
        p, r = _fit(prompt, response, max_length, keep_first)
        pl, rl = _fit(prompt_labels, response_labels, max_length, keep_first)
        if len(p) + len(r) < len(prompt) + len(response):
            truncated.append(row_id)
        input_ids.append(p + r)
        labels.append(pl + rl)
    _check_targets(ids, labels)
    return input_ids, labels, truncated


def _encode_causal(
    rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, response_only: bool
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Alpaca rows and chat rows (``messages``), each encoded their way, returned in row order."""
    chat = [i for i, r in enumerate(rows) if is_chat_row(r)]
    if not chat:
        return _encode_alpaca(rows, tokenizer, max_length, response_only)
    if len(chat) == len(rows):
        return _encode_chat(rows, tokenizer, max_length, response_only)
    chat_set = set(chat)
    alpaca = [i for i in range(len(rows)) if i not in chat_set]
    input_ids: list[list[int]] = [[] for _ in rows]
    labels: list[list[int]] = [[] for _ in rows]
    truncated: set[str] = set()
    for positions, encode in ((chat, _encode_chat), (alpaca, _encode_alpaca)):
        part_ids, part_labels, part_truncated = encode(
            [rows[i] for i in positions], tokenizer, max_length, response_only
        )
        for i, seq, lab in zip(positions, part_ids, part_labels, strict=True):
            input_ids[i], labels[i] = seq, lab
        truncated.update(part_truncated)
    return input_ids, labels, [str(r["id"]) for r in rows if str(r["id"]) in truncated]


def label_indices(rows: Sequence[dict[str, Any]], label_names: Sequence[Any] | None) -> list[int]:
    """Each row's class index: a name looked up in ``label_names``, or an int ``0..K-1`` as given."""
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
    return [list(e) for e in enc], label_indices(rows, label_names), truncated


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

    ``task`` is ``"causal"`` (alias ``"instruction"``) or ``"classification"``. Chat rows
    (``messages``) are rendered with the tokenizer's chat template and take the loss on every
    assistant reply (see the module docstring); they may be mixed with Alpaca rows. Rows that do not
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
