"""Options shared by several commands, defined once: the column-mapping flags, ``--threads``, ``--device``,
``--dtype`` and the canary flags.

:func:`column_options` adds ``--instruction-col``, ``--output-col``, ... ``--messages-col`` to a
command; the command receives one ``columns`` argument (a :class:`~infscope.data.columns.ColumnMap`
or ``None``). Every command that reads data uses it, so the flags an error message names exist
wherever data is read.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from infscope.data.columns import column_map_from_options

#: (parameter, flag, help) of each column flag, in the order ``column_map_from_options`` takes them.
COLUMN_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("instruction_col", "--instruction-col", "Column holding the instruction."),
    ("input_col", "--input-col", "Column holding the optional input/context."),
    ("output_col", "--output-col", "Column holding the response."),
    ("text_col", "--text-col", "Column holding the text to classify."),
    ("text_b_col", "--text-b-col", "Column holding the second text of a pair."),
    ("label_col", "--label-col", "Column holding the class label."),
    ("id_col", "--id-col", "Column holding unique row ids."),
    ("messages_col", "--messages-col", "Column holding chat messages (a list of role/content turns)."),
)

Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Model dtype: float32, bfloat16 or float16.")]
CanaryNoise = Annotated[
    str | None,
    typer.Option(
        "--canary-noise",
        help="Noise of the canaries: response_swap, label, wrong_answer, a family or operator "
        "(default: response_swap for instruction data, label for classification).",
    ),
]
CanarySource = Annotated[
    str,
    typer.Option(
        "--canary-source",
        help="Rows the canaries copy: validation (they then leave the validation set, so no clean twin "
        "trains beside a canary, as with real noise), train (copies of training rows), or auto: "
        "validation when half the validation rows stay, else train.",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", help="CPU threads for torch (default: the cores other jobs leave idle)."),
]


def column_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the column flags; it must take a ``columns`` keyword instead."""
    signature = inspect.signature(command, eval_str=True)  # real annotations: typer reads Annotated options
    kept = [p for p in signature.parameters.values() if p.name != "columns"]
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, flag, help=help_text, rich_help_panel="Column mapping"),
            annotation=str | None,
        )
        for name, flag, help_text in COLUMN_FLAGS
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        flags = {name: kwargs.pop(name, None) for name, _, _ in COLUMN_FLAGS}
        return command(**kwargs, columns=column_map_from_options(**flags))

    wrapper.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {
        **{k: v for k, v in command.__annotations__.items() if k != "columns"},
        **{name: str | None for name, _, _ in COLUMN_FLAGS},
    }
    return wrapper
