"""The operator registry: every noise operator with its family, severity and label flag.

An operator is a small pure function. Plain operators take ``(text, rng)`` and return the noisy
text, or ``None`` when they cannot apply (no eligible word, too short, ...); they never return
their input unchanged. Context operators (response swap, wrong context, label flip) also need
the other rows, so they take ``(value, rng, ctx)`` with a :class:`NoiseContext`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infscope.errors import InfscopeError

FAMILIES = ("grammar", "semantic", "quality", "label")
TASKS = ("instruction", "classification")
TEXT_FIELDS = {"instruction": ("instruction", "input", "output"), "classification": ("text", "text_b")}

PlainFn = Callable[[str, random.Random], "str | None"]
ContextFn = Callable[[Any, random.Random, "NoiseContext"], Any]


@dataclass
class NoiseContext:
    """What context operators may read besides their own value (all clean, sorted by id).

    ``pools`` maps a field to ``(ids, values)`` of every row, so a donor row is chosen by index
    independently of input order; ``classes`` are the label values in a fixed order and
    ``class_counts`` their frequencies (for class-balanced label flips).
    """

    row_id: str = ""
    pools: dict[str, tuple[Sequence[str], Sequence[Any]]] = field(default_factory=dict)
    classes: list[Any] = field(default_factory=list)
    class_counts: dict[Any, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Operator:
    """One registered noise operator.

    ``fields`` fixes the field it edits (``None``: any text field the row has); ``cosmetic``
    operators promise never to change a digit; ``default=False`` operators are used only when
    named explicitly in weights (e.g. ``label_flip_balanced=1``).
    """

    name: str
    family: str
    severity: float
    label_changed: bool
    fn: Callable[..., Any]
    tasks: tuple[str, ...] = TASKS
    fields: tuple[str, ...] | None = None
    context: bool = False
    cosmetic: bool = False
    default: bool = True
    doc: str = ""

    def apply(self, value: Any, rng: random.Random, ctx: NoiseContext | None = None) -> Any:
        """Run the operator; ``None`` means it cannot apply to this value."""
        if self.context:
            return self.fn(value, rng, ctx if ctx is not None else NoiseContext())
        return self.fn(value, rng)

    def field_for(self, task: str, available: Sequence[str]) -> str | None:
        """The fixed field this operator edits for ``task`` (``None`` if it takes any text field)."""
        if self.fields is None:
            return None
        for name in self.fields:
            if name in available:
                return name
        return ""


OPERATORS: dict[str, Operator] = {}


def register(
    family: str,
    severity: float,
    *,
    label_changed: bool = False,
    tasks: tuple[str, ...] = TASKS,
    fields: tuple[str, ...] | None = None,
    context: bool = False,
    cosmetic: bool = False,
    default: bool = True,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that adds a function to :data:`OPERATORS` under its name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError("severity must lie in [0, 1]")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        op_name = name or fn.__name__
        OPERATORS[op_name] = Operator(
            name=op_name,
            family=family,
            severity=severity,
            label_changed=label_changed,
            fn=fn,
            tasks=tasks,
            fields=fields,
            context=context,
            cosmetic=cosmetic,
            default=default,
            doc=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
        )
        return fn

    return wrap


def _load_operator_modules() -> None:
    """Import the modules that register operators (idempotent)."""
    from infscope.noise import grammar, label, quality, semantic  # noqa: F401


def all_operators() -> dict[str, Operator]:
    """Every registered operator by name."""
    _load_operator_modules()
    return OPERATORS


def get_operator(name: str) -> Operator:
    """The operator called ``name``; an unknown name is a user error."""
    ops = all_operators()
    if name not in ops:
        raise InfscopeError(f"unknown noise operator '{name}'; choose one of: {', '.join(sorted(ops))}")
    return ops[name]


def family_operators(family: str, task: str, *, include_optional: bool = False) -> list[Operator]:
    """Operators of ``family`` that apply to ``task`` (sorted by name for a stable order)."""
    if family not in FAMILIES:
        raise InfscopeError(f"unknown noise family '{family}'; choose one of: {', '.join(FAMILIES)}")
    return sorted(
        (
            op
            for op in all_operators().values()
            if op.family == family and task in op.tasks and (op.default or include_optional)
        ),
        key=lambda op: op.name,
    )
