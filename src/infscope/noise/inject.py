"""Inject known noise into a fraction of rows and record a per-row ground-truth manifest.

:func:`inject_noise` is pure: it copies the rows, picks exactly ``round(ratio * n)`` of them
(order-independent, see :mod:`infscope.noise.sampling`), splits them between families/operators
in exact proportions, and edits each chosen row in one intended field. If an operator cannot
apply, the other operators of the same family are tried on the same field; a row where none
applies is counted as a failure and left clean (never moved to another field).

Chat rows (``messages``) are instruction rows whose ``output`` is the last assistant turn and
whose ``instruction`` is the last user turn (see :mod:`infscope.data.formatting`): operators edit
those views, the manifest records them, and the edited row's ``messages`` is updated to match.
Chat rows have no ``input`` field.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infscope.data.formatting import add_text_column, is_chat_row, sync_chat_row
from infscope.errors import InfscopeError
from infscope.noise.registry import (
    TASKS,
    TEXT_FIELDS,
    NoiseContext,
    Operator,
    all_operators,
    family_operators,
)
from infscope.noise.rng import hash_order, row_rng
from infscope.noise.sampling import (
    SAMPLINGS,
    allocate,
    class_strata,
    length_strata,
    select_rows,
    target_count,
)
from infscope.noise.strategies import resolve_weights
from infscope.noise.text import NUMERIC_RE_ASCII

DEFAULT_FIELD_WEIGHTS = {"instruction": {"output": 0.8, "instruction": 0.2}, "classification": {"text": 1.0}}
MAX_FAILED_IDS = 50


@dataclass
class NoiseResult:
    """Noisy copies of the rows (input order), one manifest record per row, and a summary dict."""

    rows: list[dict[str, Any]]
    manifest: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """What one chosen row should receive: a unit (family or operator key) and its operator."""

    unit: str
    operator: Operator


def label_noise_applies(rows: Sequence[Mapping[str, Any]], task: str) -> bool:
    """Whether label noise makes sense: classification, or instruction data with numeric answers.

    Instruction data counts as math-style when at least half of the outputs hold a number.
    """
    if task == "classification":
        return True
    with_number = sum(1 for row in rows if NUMERIC_RE_ASCII.search(str(row.get("output", ""))))
    return with_number * 2 >= len(rows)


def _with_chat_views(rows: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """The rows, with chat rows replaced by copies whose views and ``messages`` agree (checked)."""
    if not any(is_chat_row(row) for row in rows):
        return rows
    return [sync_chat_row(row) if is_chat_row(row) else row for row in rows]


def _check_rows(rows: Sequence[Mapping[str, Any]], task: str) -> list[str]:
    if task not in TASKS:
        raise InfscopeError(f"unknown task '{task}'; use instruction or classification")
    if not rows:
        raise InfscopeError("the dataset is empty; pass a file with at least one row")
    ids = [str(row.get("id", "")) for row in rows]
    if any(not i for i in ids):
        raise InfscopeError("every row needs an 'id'; load the data with infscope.data.loading.load_rows")
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise InfscopeError(f"row id '{dup}' is not unique; ids must be unique before injecting noise")
    needed = ("instruction", "output") if task == "instruction" else ("text", "label")
    missing = [name for name in needed if name not in rows[0]]
    if missing:
        raise InfscopeError(
            f"{task} rows need the column(s) {', '.join(missing)}; map them with the column flags"
        )
    return ids


def _field_weights(
    field_weights: Mapping[str, float] | None, task: str, present: set[str]
) -> dict[str, float]:
    weights = dict(field_weights) if field_weights else dict(DEFAULT_FIELD_WEIGHTS[task])
    if not field_weights and task == "classification" and "text_b" in present:
        weights = {"text": 0.5, "text_b": 0.5}
    for name, value in weights.items():
        if name not in TEXT_FIELDS[task] or name not in present:
            raise InfscopeError(
                f"field '{name}' cannot be a noise target for this {task} data; use {', '.join(f for f in TEXT_FIELDS[task] if f in present)}"
            )
        if not value >= 0:
            raise InfscopeError(f"field weight for '{name}' must be >= 0; fix the field weights")
    total = sum(weights.values())
    if not total > 0:
        raise InfscopeError("field weights must sum to a positive number")
    return {k: v / total for k, v in sorted(weights.items()) if v > 0}


def _unit_operators(unit: str, task: str, present: set[str]) -> list[Operator]:
    """The operators a weight key stands for, restricted to the task and the fields the data has."""
    ops = all_operators()
    chosen = [ops[unit]] if unit in ops else family_operators(unit, task)
    usable = [op for op in chosen if task in op.tasks and (op.fields is None or set(op.fields) & present)]
    if not usable:
        raise InfscopeError(
            f"noise '{unit}' has no operator that applies to this {task} data; choose other weights"
        )
    return usable


def _classes(rows: Sequence[Mapping[str, Any]], label_names: Sequence[Any] | None) -> list[Any]:
    observed = {row["label"] for row in rows}
    if label_names:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in observed):
            return sorted(set(range(len(label_names))) | observed)
        return list(label_names) + sorted((observed - set(label_names)), key=str)
    return sorted(observed, key=lambda v: (type(v).__name__, v))


def _context(
    rows: Sequence[Mapping[str, Any]], ids: list[str], task: str, present: set[str], label_names
) -> NoiseContext:
    """Clean pools sorted by id (so donor choice ignores input order) plus the class list."""
    order = np.argsort(np.asarray(ids, dtype=object).astype(str), kind="stable")
    sorted_ids = [ids[i] for i in order]
    pools = {
        name: (sorted_ids, [rows[i].get(name) for i in order])
        for name in ("output", "input", "text_b")
        if name in present
    }
    ctx = NoiseContext(pools=pools)
    if task == "classification":
        ctx.classes = _classes(rows, label_names)
        ctx.class_counts = dict(Counter(row["label"] for row in rows))
    return ctx


def _plans(
    chosen: np.ndarray, ids: list[str], seed: int, units: dict[str, float], task: str, present: set[str]
) -> dict[int, _Plan]:
    """Exact split of the chosen rows between units, then equally between each unit's operators."""
    plans: dict[int, _Plan] = {}
    chosen_ids = [ids[i] for i in chosen]
    family_order = chosen[hash_order(seed, chosen_ids, "family")]
    start = 0
    for unit, count in allocate(len(chosen), units).items():
        block = family_order[start : start + count]
        start += count
        ops = _unit_operators(unit, task, present)
        block = block[hash_order(seed, [ids[i] for i in block], "operator")]
        op_start = 0
        for op, op_count in allocate(len(block), {op: 1.0 for op in ops}).items():
            for i in block[op_start : op_start + op_count]:
                plans[int(i)] = _Plan(unit, op)
            op_start += op_count
    return plans


def _pick_field(op: Operator, row_id: str, seed: int, fields: dict[str, float], present: set[str]) -> str:
    """The intended field: the operator's own (response swap -> output) or drawn from field weights."""
    if op.fields is not None:
        return next(name for name in op.fields if name in present)
    rng = row_rng(seed, row_id, "field")
    names = list(fields)
    return rng.choices(names, weights=[fields[n] for n in names], k=1)[0]


def _fallbacks(
    plan: _Plan, target: str, family_ops: list[Operator], row_id: str, seed: int
) -> list[Operator]:
    """The planned operator, then the family's other operators that can edit ``target``, shuffled."""
    can_edit = [
        op
        for op in family_ops
        if op.name != plan.operator.name and (op.fields is None or target in op.fields)
    ]
    row_rng(seed, row_id, "fallback").shuffle(can_edit)
    return [plan.operator, *can_edit]


def inject_noise(
    rows: Sequence[Mapping[str, Any]],
    *,
    task: str,
    ratio: float,
    strategy: str = "balanced",
    weights: str | Mapping[str, float] | None = None,
    seed: int = 0,
    sampling: str = "uniform",
    field_weights: Mapping[str, float] | None = None,
    label_names: Sequence[Any] | None = None,
) -> NoiseResult:
    """Corrupt exactly ``round(ratio * len(rows))`` rows and return copies, manifest and summary.

    ``weights`` (families or operator names, e.g. ``"grammar=0.5,label=0.5"``) override
    ``strategy``. ``sampling`` is ``uniform``, ``length`` (instruction-length quartiles) or
    ``class`` (by ``label``/``class``). ``field_weights`` choose the edited field for operators
    that take any text field (default output 0.8 / instruction 0.2 for instruction data).
    The input rows are never modified. Chat rows are edited through their views (last user and
    last assistant turn) and come back with ``messages`` updated.
    """
    rows = _with_chat_views(rows)
    ids = _check_rows(rows, task)
    k = target_count(ratio, len(rows))
    present, strategy_name, units, fields, strata, strata_info = _prepare(
        rows, task, strategy, weights, sampling, field_weights
    )
    mask, strata_report = select_rows(ids, k, seed, strata)
    chosen = np.flatnonzero(mask)
    plans = _plans(chosen, ids, seed, units, task, present)
    ctx = _context(rows, ids, task, present, label_names)

    family_ops = {
        family: _unit_operators(family, task, present)
        for family in {p.operator.family for p in plans.values()}
    }
    out = [dict(row) for row in rows]
    manifest = [_clean_record(row_id, seed) for row_id in ids]
    failures: list[dict[str, str]] = []
    for i in chosen.tolist():
        row_id, plan = ids[i], plans[i]
        target = _pick_field(plan.operator, row_id, seed, fields, present)
        original = rows[i].get(target)
        if target != "label":
            original = "" if original is None else str(original)
        ctx.row_id = row_id
        for op in _fallbacks(plan, target, family_ops[plan.operator.family], row_id, seed):
            noisy = op.apply(original, row_rng(seed, row_id, op.name), ctx)
            if noisy is not None and noisy != original:
                out[i][target] = noisy
                manifest[i].update(
                    is_noisy=True,
                    family=op.family,
                    operator=op.name,
                    field=target,
                    original=original,
                    noisy=noisy,
                    label_changed=op.label_changed,
                    severity=op.severity,
                )
                break
        else:
            failures.append(
                {
                    "id": row_id,
                    "family": plan.operator.family,
                    "operator": plan.operator.name,
                    "field": target,
                }
            )
    for i in chosen.tolist():
        if manifest[i]["is_noisy"] and is_chat_row(out[i]):
            out[i] = sync_chat_row(out[i])
    if task == "instruction" and "text" in rows[0]:
        for i in chosen.tolist():
            if manifest[i]["is_noisy"]:
                out[i] = add_text_column([out[i]])[0]

    summary = _summary(
        rows,
        task,
        ratio,
        k,
        seed,
        strategy_name,
        units,
        sampling,
        fields,
        plans,
        manifest,
        failures,
        strata,
        strata_report,
        strata_info,
    )
    return NoiseResult(rows=out, manifest=manifest, summary=summary)


def _prepare(rows, task, strategy, weights, sampling, field_weights):
    """Validate the options against the rows: fields present, weights, field weights, strata."""
    present = {name for name in (*TEXT_FIELDS[task], "label") if name in rows[0]}
    if is_chat_row(rows[0]):
        present.discard("input")  # chat rows keep their context in the turns, not in an input field
    strategy_name, units = resolve_weights(
        strategy, weights, label_applicable=label_noise_applies(rows, task)
    )
    fields = _field_weights(field_weights, task, present)
    for unit in units:
        _unit_operators(unit, task, present)
    strata, strata_info = _strata(rows, task, sampling)
    return present, strategy_name, units, fields, strata, strata_info


def check_noise_args(
    rows: Sequence[Mapping[str, Any]],
    *,
    task: str,
    ratio: float,
    strategy: str = "balanced",
    weights: str | Mapping[str, float] | None = None,
    sampling: str = "uniform",
    field_weights: Mapping[str, float] | None = None,
) -> None:
    """Raise the :class:`InfscopeError` that :func:`inject_noise` would raise, without injecting."""
    rows = _with_chat_views(rows)
    _check_rows(rows, task)
    target_count(ratio, len(rows))
    _prepare(rows, task, strategy, weights, sampling, field_weights)


def _clean_record(row_id: str, seed: int) -> dict[str, Any]:
    return {
        "id": row_id,
        "is_noisy": False,
        "family": None,
        "operator": None,
        "field": None,
        "original": None,
        "noisy": None,
        "label_changed": False,
        "severity": 0.0,
        "seed": seed,
    }


def _strata(rows: Sequence[Mapping[str, Any]], task: str, sampling: str) -> tuple[np.ndarray | None, dict]:
    """Stratum label per row for stratified sampling (``None`` for uniform) and stratum details."""
    if sampling not in SAMPLINGS:
        raise InfscopeError(f"unknown sampling '{sampling}'; use uniform, length or class")
    if sampling == "uniform":
        return None, {}
    if sampling == "length":
        key = "instruction" if task == "instruction" else "text"
        labels, ranges = length_strata([len(str(row.get(key, ""))) for row in rows])
        return labels, {"length_field": key, "length_ranges": ranges}
    key = "label" if task == "classification" else "class"
    if key not in rows[0]:
        raise InfscopeError(
            f"--sampling class needs a '{key}' column; map it or use --sampling uniform/length"
        )
    return class_strata([row.get(key) for row in rows]), {"class_field": key}


def _summary(
    rows,
    task,
    ratio,
    k,
    seed,
    strategy_name,
    units,
    sampling,
    fields,
    plans,
    manifest,
    failures,
    strata,
    strata_report,
    strata_info,
) -> dict[str, Any]:
    """Target versus actual counts per family, operator, field, class and stratum."""
    noisy = [rec for rec in manifest if rec["is_noisy"]]
    family_target = Counter(plan.operator.family for plan in plans.values())
    op_target = Counter(plan.operator.name for plan in plans.values())
    family_actual = Counter(rec["family"] for rec in noisy)
    op_actual = Counter(rec["operator"] for rec in noisy)
    noisy_flags = np.asarray([rec["is_noisy"] for rec in manifest], dtype=bool)
    if strata is not None:
        for name, info in strata_report.items():
            info["actual"] = int(noisy_flags[strata.astype(str) == name].sum())
    else:
        strata_report["all"]["actual"] = int(noisy_flags.sum())
    class_key = "label" if task == "classification" else ("class" if "class" in rows[0] else None)
    classes: dict[str, dict[str, int]] = {}
    if class_key is not None:
        values = class_strata([row.get(class_key) for row in rows])
        for name in sorted(set(values.tolist())):
            members = values == name
            classes[name] = {"rows": int(members.sum()), "noisy": int(noisy_flags[members].sum())}
    return {
        "task": task,
        "rows": len(rows),
        "ratio": ratio,
        "seed": seed,
        "strategy": strategy_name,
        "weights": units,
        "field_weights": fields,
        "target_noisy": k,
        "actual_noisy": len(noisy),
        "label_changed": sum(1 for rec in noisy if rec["label_changed"]),
        "families": {
            f: {"target": family_target.get(f, 0), "actual": family_actual.get(f, 0)}
            for f in sorted(set(family_target) | set(family_actual))
        },
        "operators": {
            o: {"target": op_target.get(o, 0), "actual": op_actual.get(o, 0)}
            for o in sorted(set(op_target) | set(op_actual))
        },
        "fields": dict(sorted(Counter(rec["field"] for rec in noisy).items())),
        "classes": classes,
        "sampling": sampling,
        "strata": strata_report,
        **strata_info,
        "failures": {
            "count": len(failures),
            "by_family": dict(sorted(Counter(f["family"] for f in failures).items())),
            "ids": [f["id"] for f in failures[:MAX_FAILED_IDS]],
        },
    }
