"""Turn instruction rows into model text (Alpaca-style prompt + response).

The prompt is what the model conditions on; the response is what the loss is taken on. After
noise injection the fields change, so :func:`add_text_column` rebuilds ``text`` from them and no
stale clean text can survive next to noisy fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from infscope.errors import InfscopeError

INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "### Input:\n"
RESPONSE_HEADER = "### Response:\n"


def is_instruction_row(row: Mapping[str, Any]) -> bool:
    """Whether ``row`` has the instruction-task fields (``instruction`` and ``output``)."""
    return "instruction" in row and "output" in row


def format_prompt(row: Mapping[str, Any]) -> str:
    """The Alpaca-style prompt of an instruction row, ending with the response header.

    ``### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n``; the input
    block appears only when ``input`` is non-empty.
    """
    if "instruction" not in row:
        raise InfscopeError(
            f"row {row.get('id')!r} has no 'instruction' field; map it with --instruction-col or use a classification task"
        )
    prompt = INSTRUCTION_HEADER + str(row["instruction"]) + "\n\n"
    extra = row.get("input")
    if extra is not None and str(extra) != "":
        prompt += INPUT_HEADER + str(extra) + "\n\n"
    return prompt + RESPONSE_HEADER


def format_text(row: Mapping[str, Any]) -> str:
    """Prompt followed by the response (``output``): the full training text of an instruction row."""
    if "output" not in row:
        raise InfscopeError(f"row {row.get('id')!r} has no 'output' field; map it with --output-col")
    return format_prompt(row) + str(row["output"])


def add_text_column(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` whose ``text`` is rebuilt from the fields (instruction rows only).

    Classification rows (no ``instruction``/``output``) are copied unchanged, since their
    ``text`` is itself the input. The input rows are not modified.
    """
    out = []
    for row in rows:
        new = dict(row)
        if is_instruction_row(new):
            new["text"] = format_text(new)
        out.append(new)
    return out
