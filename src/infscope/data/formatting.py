"""Turn instruction rows into model text, and read or replace their prompt and response parts.

Two row layouts are instruction rows:

* **Alpaca rows**: ``instruction``, ``input``, ``output``. The prompt is the Alpaca-style template
  (:func:`format_prompt`), the response is ``output``.
* **Chat rows**: ``messages``, a list of ``{"role", "content"}`` turns (roles ``system``,
  ``user``, ``assistant``; the first non-system turn is a user turn and the last turn is an
  assistant turn), plus two *views* kept next to it: ``output`` is the content of the last
  assistant turn and ``instruction`` the content of the last user turn before it. The views are
  what noise operators, swaps and reports read and write, so **the views win**:
  :func:`chat_messages` is ``messages`` with the views written into those two turns. Use
  :func:`with_response` / :func:`with_instruction` (or :func:`sync_chat_row` after editing a view)
  to keep the stored list in step.

When a tokenizer has no chat template, chat rows use the built-in template of
:func:`render_chat` (``### System:`` / ``### User:`` / ``### Assistant:`` headers, turns separated
by a blank line, the EOS token right after each assistant reply). After noise injection the fields
change, so :func:`add_text_column` rebuilds ``text`` from them and no stale clean text can survive
next to noisy fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from infscope.errors import InfscopeError

INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "### Input:\n"
RESPONSE_HEADER = "### Response:\n"

CHAT_ROLES = ("system", "user", "assistant")
#: Header of each role in the built-in chat template (used when a tokenizer has no chat template).
CHAT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
CHAT_TURN_SEPARATOR = "\n\n"


def is_instruction_row(row: Mapping[str, Any]) -> bool:
    """Whether ``row`` is an instruction row: Alpaca ``instruction`` and ``output``, or chat ``messages``."""
    return ("instruction" in row and "output" in row) or is_chat_row(row)


def is_chat_row(row: Mapping[str, Any]) -> bool:
    """Whether ``row`` is a chat row (has a ``messages`` field)."""
    return "messages" in row


def _where(row_id: Any, source: str | None) -> str:
    return f"row {str(row_id)!r}" + (f" of {source}" if source else "")


def check_messages(messages: Any, row_id: Any, source: str | None = None) -> list[dict[str, str]]:
    """A clean copy of a ``messages`` value (plain ``{"role", "content"}`` dicts of strings), or an error.

    The value must be a list (a tuple or array from Parquet also works) of turns, each a mapping
    with a known ``role`` and a non-null ``content`` (non-strings are converted with ``str``;
    other keys are dropped). The first non-system turn must be a user turn and the last turn an
    assistant turn. Errors are one line naming the row and the fix.
    """
    where = _where(row_id, source)
    if isinstance(messages, (str, bytes, Mapping)) or not hasattr(messages, "__iter__"):
        raise InfscopeError(
            f"{where} has 'messages' of type {type(messages).__name__}, not a list of turns; "
            'store it as a JSON list like [{"role": "user", "content": ...}, {"role": "assistant", ...}]'
        )
    turns = []
    for position, turn in enumerate(messages, start=1):
        if not isinstance(turn, Mapping) or "role" not in turn:
            raise InfscopeError(
                f"{where} has message {position} without a role; give each turn a role and a content"
            )
        role = turn["role"]
        if role not in CHAT_ROLES:
            raise InfscopeError(
                f"{where} has message {position} with unknown role {role!r}; "
                f"use one of {', '.join(CHAT_ROLES)}"
            )
        content = turn.get("content")
        if content is None:
            raise InfscopeError(f"{where} has message {position} ({role}) without content; fill it in")
        turns.append({"role": role, "content": content if isinstance(content, str) else str(content)})
    roles = [turn["role"] for turn in turns]
    if "assistant" not in roles:
        raise InfscopeError(f"{where} has no assistant turn in its messages; add the reply or drop the row")
    if roles[-1] != "assistant":
        raise InfscopeError(
            f"{where} ends with a {roles[-1]} turn; a conversation must end with an assistant reply, "
            "drop the trailing turns"
        )
    first = next(role for role in roles if role != "system")
    if first != "user":
        raise InfscopeError(
            f"{where} starts with an assistant turn; the first non-system turn must be a user turn, "
            "add the user message"
        )
    return turns


def _view_positions(turns: Sequence[Mapping[str, str]]) -> tuple[int, int]:
    """Positions of the last assistant turn and of the last user turn before it (valid turns)."""
    last_assistant = len(turns) - 1
    last_user = max(i for i in range(last_assistant) if turns[i]["role"] == "user")
    return last_user, last_assistant


def chat_messages(row: Mapping[str, Any], source: str | None = None) -> list[dict[str, str]]:
    """The checked turns of a chat row with its views (``instruction``, ``output``) written in."""
    turns = check_messages(row.get("messages"), row.get("id"), source)
    last_user, last_assistant = _view_positions(turns)
    if row.get("instruction") is not None:
        turns[last_user]["content"] = str(row["instruction"])
    if row.get("output") is not None:
        turns[last_assistant]["content"] = str(row["output"])
    return turns


def chat_views(messages: Any, row_id: Any, source: str | None = None) -> tuple[str, str]:
    """``(last user turn, last assistant turn)`` contents of a ``messages`` value (checked)."""
    turns = check_messages(messages, row_id, source)
    last_user, last_assistant = _view_positions(turns)
    return turns[last_user]["content"], turns[last_assistant]["content"]


def sync_chat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a chat row whose ``messages`` and views agree (missing views are filled in)."""
    turns = chat_messages(row)
    last_user, last_assistant = _view_positions(turns)
    new = dict(row)
    new["messages"] = turns
    new["instruction"] = turns[last_user]["content"]
    new["output"] = turns[last_assistant]["content"]
    return new


def prompt_response_view(row: Mapping[str, Any]) -> tuple[str, str]:
    """``(instruction, response)`` of an instruction row.

    Chat rows: the last user turn and the last assistant turn (views first, see the module
    docstring). Alpaca rows: the ``instruction`` and ``output`` fields (the ``input`` stays with
    the row), so ``with_instruction(row, prompt_response_view(row)[0])`` gives the row back.
    """
    if is_chat_row(row):
        instruction, response = chat_views(row["messages"], row.get("id"))
        if row.get("instruction") is not None:
            instruction = str(row["instruction"])
        if row.get("output") is not None:
            response = str(row["output"])
        return instruction, response
    if "instruction" not in row or "output" not in row:
        raise InfscopeError(
            f"row {row.get('id')!r} is not an instruction row (needs instruction and output, or messages); "
            "pass instruction or chat rows"
        )
    return str(row["instruction"]), str(row["output"])


def _with_part(row: Mapping[str, Any], name: str, text: str) -> dict[str, Any]:
    if not is_instruction_row(row):
        raise InfscopeError(
            f"row {row.get('id')!r} is not an instruction row (needs instruction and output, or messages); "
            f"only instruction or chat rows have an {name} to replace"
        )
    new = dict(row)
    new[name] = str(text)
    if is_chat_row(new):
        new = sync_chat_row(new)
    if "text" in new:
        new["text"] = format_text(new)
    return new


def with_response(row: Mapping[str, Any], text: str) -> dict[str, Any]:
    """A copy of an Alpaca or chat row whose response (``output``, the last assistant turn) is ``text``.

    A ``text`` column, if the row has one, is rebuilt; the input row is not modified.
    """
    return _with_part(row, "output", text)


def with_instruction(row: Mapping[str, Any], text: str) -> dict[str, Any]:
    """A copy of an Alpaca or chat row whose instruction (``instruction``, the last user turn) is ``text``.

    Alpaca ``input`` and earlier chat turns stay; a ``text`` column is rebuilt.
    """
    return _with_part(row, "instruction", text)


def render_chat(
    turns: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False, bos: str = "", eos: str = ""
) -> str:
    """The built-in chat template: ``bos`` then the turns, separated by a blank line.

    A turn is its role header (:data:`CHAT_HEADERS`) and content, plus ``eos`` after an assistant
    reply; ``add_generation_prompt`` appends the assistant header of the next reply. Every prefix of
    a conversation renders to a prefix of the whole, so turn boundaries are string positions.
    """
    parts = [
        CHAT_HEADERS[turn["role"]] + turn["content"] + (eos if turn["role"] == "assistant" else "")
        for turn in turns
    ]
    if add_generation_prompt:
        parts.append(CHAT_HEADERS["assistant"])
    return bos + CHAT_TURN_SEPARATOR.join(parts)


def format_prompt(row: Mapping[str, Any]) -> str:
    """The prompt of an instruction row: everything the response is conditioned on.

    Alpaca rows: ``### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n``;
    the input block appears only when ``input`` is non-empty. Chat rows: the turns before the last
    assistant reply in the built-in template (:func:`render_chat`), ending with the assistant header.
    """
    if is_chat_row(row):
        return render_chat(chat_messages(row)[:-1], add_generation_prompt=True)
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
    """Prompt followed by the response: the full training text of an instruction row."""
    if is_chat_row(row):
        return format_prompt(row) + prompt_response_view(row)[1]
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
