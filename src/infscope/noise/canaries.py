"""Canaries: extra training rows corrupted by our own noise generator, to calibrate detectors.

Users rarely have labelled noise, so there is nothing to tell which method, checkpoint or fusion
finds bad rows in *their* data. Canaries supply that signal: :func:`make_canaries` copies a seeded
sample of the user's rows under new ids (``canary-<n>-<source id>``) and corrupts every copy with
:func:`infscope.noise.inject.inject_noise`, using the noise type the user names (``response_swap``,
``label``, ``grammar``, ``wrong_answer``, ...). The copies are added before fine-tuning; afterwards
the detector that ranks them highest is chosen (:mod:`infscope.estimators.fusion`), and the canary
rows are dropped from every output. The user's own rows are never modified.

The copies are corrupted in the context of the whole dataset: donors for a response swap are other
rows' outputs and the classes of a label flip are every class in the data (the change happens only
in the copy). The generator runs with a seed derived from ``seed``, so canaries never copy the very
rows, or repeat the very edits, of ``infscope noise`` run with the same seed.

**Where canaries come from.** A canary copied from a training row trains beside its clean twin, and
a model that sees the same prompt with two answers shows a conflict no real noisy row has: detectors
that measure the conflict (margins, AUM, the contrastive prompt margin) rank such canaries far higher
than real noise, and the choice made on them is wrong. With ``source="validation"`` canaries copy *validation* rows
instead; those rows then leave the validation
set of the run (no query, no checkpoint choice sees the clean twin), so each canary is, like real
noise, the only version of its example the model ever sees. ``source="train"`` keeps the older
behaviour, and ``source="auto"`` (the default) takes validation rows when the validation set keeps
at least half its rows (and :data:`MIN_VALIDATION_LEFT`) afterwards, training rows otherwise; the run
records the source used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infscope.data.formatting import is_chat_row, sync_chat_row
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError
from infscope.noise.inject import inject_noise, label_noise_applies
from infscope.noise.registry import FAMILIES, TASKS, TEXT_FIELDS, all_operators
from infscope.noise.rng import hash_order, stable_hash
from infscope.noise.strategies import parse_weights
from infscope.runs import RunDir, read_jsonl

MAX_FRACTION = 0.5
#: Friendly names for operators (``--canary-noise wrong_answer``).
ALIASES = {"wrong_answer": "wrong_numeric", "wrong_answers": "wrong_numeric"}
#: Extra source rows tried at first, beyond the ones needed, in case some cannot take the noise.
_SLACK = 0.25
#: Where canaries copy their rows from (see the module docstring); ``auto`` picks one per run.
SOURCES = ("auto", "validation", "train")
#: Validation rows that must stay after validation-sourced canaries take theirs (queries, checkpoint choice).
MIN_VALIDATION_LEFT = 4


@dataclass
class CanarySet:
    """Canary rows (ready to append to the training rows), their ids, and one manifest record each.

    ``manifest`` records follow :data:`infscope.data.manifest.MANIFEST_FIELDS` (``is_noisy`` is always
    true) plus ``source_id``, the user row each canary copies. ``weights`` are the normalised noise
    weights used, ``seed`` the user's seed and ``noise_seed`` the derived seed the generator ran with.
    """

    rows: list[dict[str, Any]]
    ids: list[str]
    manifest: list[dict[str, Any]]
    weights: dict[str, float]
    seed: int
    noise_seed: int

    @property
    def source_ids(self) -> list[str]:
        """The user row each canary copies, in canary order."""
        return [record["source_id"] for record in self.manifest]


def canary_count(fraction: float, n_rows: int) -> int:
    """``round(fraction * n_rows)`` (halves up), at least 1; ``fraction`` must lie in (0, 0.5]."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not math.isfinite(fraction)
        or not 0.0 < fraction <= MAX_FRACTION
    ):
        raise InfscopeError(
            f"canary fraction must be in (0, {MAX_FRACTION}], got {fraction}; e.g. --canaries 0.05"
        )
    if n_rows <= 0:
        raise InfscopeError("the dataset is empty; pass a file with at least one row before adding canaries")
    return max(1, math.floor(fraction * n_rows + 0.5))


def noise_seed(seed: int) -> int:
    """The seed the noise generator runs with for canaries (differs from ``seed`` itself on purpose)."""
    return stable_hash(int(seed), "", "canaries") & 0x7FFFFFFF


def _present_fields(rows: Sequence[Mapping[str, Any]], task: str) -> set[str]:
    """The noise-target fields the rows have (chat rows: the instruction/output views, no input)."""
    first = rows[0]
    if is_chat_row(first):
        first = sync_chat_row(first)
    present = {name for name in (*TEXT_FIELDS[task], "label") if name in first}
    if is_chat_row(first):
        present.discard("input")
    return present


def valid_noise_names(rows: Sequence[Mapping[str, Any]], task: str) -> list[str]:
    """Families and operators that can corrupt canaries of this data (sorted; aliases not included).

    An operator fits when it serves the task and its field exists; a family fits when one of its
    default operators does. Label noise on instruction data (a wrong final number) needs math-style
    outputs, as in :func:`infscope.noise.inject.label_noise_applies`.
    """
    present = _present_fields(rows, task)
    label_ok = label_noise_applies(rows, task)
    fitting = [
        op
        for op in all_operators().values()
        if task in op.tasks
        and (op.fields is None or set(op.fields) & present)
        and (op.family != "label" or label_ok)
    ]
    families = {op.family for op in fitting if op.default}
    return sorted(families & set(FAMILIES)) + sorted(op.name for op in fitting)


def resolve_canary_noise(
    noise: str | Mapping[str, float], rows: Sequence[Mapping[str, Any]], task: str
) -> dict[str, float]:
    """Noise weights for canaries from a name (``response_swap``), names (``grammar,label``) or weights.

    Names are families or operators (aliases such as ``wrong_answer`` allowed, ``-`` read as ``_``);
    a name that is unknown, or does not fit the task and the data, is an error listing the valid ones.
    """
    if task not in TASKS:
        raise InfscopeError(f"unknown task '{task}'; use instruction or classification")
    if isinstance(noise, Mapping) or "=" in str(noise):
        raw = parse_weights(noise)
    else:
        raw = {part.strip(): 1.0 for part in str(noise).split(",") if part.strip()}
    valid = valid_noise_names(rows, task)
    known = set(FAMILIES) | set(all_operators())
    if not raw:
        raise InfscopeError(f"no canary noise given; choose one of: {', '.join(valid)}")
    weights: dict[str, float] = {}
    for key, value in raw.items():
        name = key.strip().lower().replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in known:
            raise InfscopeError(
                f"unknown canary noise '{key}'; for {task} data choose one of: {', '.join(valid)}"
            )
        if name not in valid:
            raise InfscopeError(
                f"canary noise '{key}' does not fit this {task} data; choose one of: {', '.join(valid)}"
            )
        weights[name] = weights.get(name, 0.0) + float(value)
    total = sum(weights.values())
    if not total > 0:
        raise InfscopeError("canary noise weights must sum to a positive number; e.g. response_swap=1")
    return {name: value / total for name, value in sorted(weights.items()) if value > 0}


def _canary_ids(sources: Sequence[str], taken: set[str]) -> list[str]:
    """``canary-<n>-<source id>`` for n = 1, 2, ...; a clash with an existing id moves n up by len(sources)."""
    out: list[str] = []
    used = set(taken)
    step = max(1, len(sources))
    for number, source in enumerate(sources, start=1):
        candidate = f"canary-{number}-{source}"
        while candidate in used:
            number += step
            candidate = f"canary-{number}-{source}"
        used.add(candidate)
        out.append(candidate)
    return out


def _as_named(record: Mapping[str, Any], weights: Mapping[str, float]) -> bool:
    """Whether a manifest record shows the named noise (not a fallback to another operator of its family)."""
    return bool(record["is_noisy"]) and (record["operator"] in weights or record["family"] in weights)


def make_canaries(
    rows: Sequence[Mapping[str, Any]],
    *,
    fraction: float,
    noise: str | Mapping[str, float],
    seed: int,
    task: str,
    label_names: Sequence[Any] | None = None,
    sources: Sequence[Mapping[str, Any]] | None = None,
) -> CanarySet:
    """Copy ``round(fraction * len(rows))`` seeded rows under new ids and corrupt every copy.

    ``sources``, when given, are the rows the canaries copy (held-out validation rows); ``rows`` then
    only set the count and serve as context (donors of swapped responses, classes of flipped labels).

    The noise generator picks rows exactly as ``infscope noise`` does (order-independent hashing,
    with :func:`noise_seed`); rows where the named noise cannot apply (no number to change, no donor)
    are skipped and further rows tried, so every canary really differs from its source in the
    manifest's ``field``, by the named operator or family (never by the generator's fallback to a
    sibling operator). Canaries are numbered in the generator's order, so ids and content do not depend on the
    order of ``rows``. Fewer usable rows than needed is an error. ``rows`` are never modified.
    """
    k = canary_count(fraction, len(rows))
    if sources is not None:
        check_validation_left(k, len(sources))
    weights = resolve_canary_noise(noise, rows, task)
    used_seed = noise_seed(seed)
    pool = list(rows) if sources is None else [*sources, *rows]
    n_sources = len(pool) if sources is None else len(sources)
    n = len(pool)
    tried = min(n, k + max(2, math.ceil(_SLACK * k)))
    if sources is not None:  # the generator picks across the pool; enough of its picks must be sources
        tried = min(n, math.ceil(tried * n / max(1, n_sources)))
    while True:
        result = inject_noise(
            pool, task=task, ratio=tried / n, weights=weights, seed=used_seed, label_names=label_names
        )
        usable = np.flatnonzero([_as_named(record, weights) for record in result.manifest[:n_sources]])
        if usable.size >= k or tried == n:
            break
        tried = min(n, 2 * tried)
    if usable.size < k:
        names = ", ".join(weights)
        where = "rows" if sources is None else "validation rows"
        fix = (
            "use a smaller --canaries fraction or another --canary-noise"
            if sources is None
            else "use a smaller --canaries fraction, a larger validation set, or --canary-source train"
        )
        raise InfscopeError(
            f"only {usable.size} of {n_sources} {where} can take canary noise {names} but {k} canaries "
            f"are needed; {fix}"
        )
    ids = [str(row["id"]) for row in pool]
    usable_ids = [ids[i] for i in usable]
    chosen = usable[hash_order(used_seed, usable_ids, "canary")[:k]]
    source_ids = [ids[i] for i in chosen]
    canary_ids = _canary_ids(source_ids, set(ids))
    canary_rows: list[dict[str, Any]] = []
    manifest: list[dict[str, Any]] = []
    for i, canary_id in zip(chosen.tolist(), canary_ids, strict=True):
        row = copy.deepcopy(result.rows[i])
        row["id"] = canary_id
        canary_rows.append(row)
        record = copy.deepcopy(result.manifest[i])
        record.update(id=canary_id, source_id=ids[i])
        manifest.append(record)
    return CanarySet(
        rows=canary_rows,
        ids=canary_ids,
        manifest=manifest,
        weights=weights,
        seed=int(seed),
        noise_seed=used_seed,
    )


def canary_mask(ids: Sequence[str], canary_ids: Sequence[str]) -> np.ndarray:
    """Boolean vector over ``ids``: True where the id is a canary (ids compared as strings)."""
    wanted = {str(i) for i in canary_ids}
    return np.fromiter((str(i) in wanted for i in ids), dtype=bool, count=len(ids))


def add_canaries(
    run: RunDir,
    train: list[dict[str, Any]],
    *,
    fraction: float,
    noise: str,
    seed: int,
    task: str,
    label_names: Sequence[Any] | None = None,
    val: Sequence[Mapping[str, Any]] | None = None,
    source: str = "train",
) -> list[dict[str, Any]]:
    """Training rows plus canaries, recorded in ``run`` (ids, noise, source, manifest at ``data/canaries.jsonl``).

    ``source="validation"`` copies rows of ``val`` (see the module docstring); the run then records
    their ids, and :func:`without_canary_sources` removes them from the validation rows. Canaries are
    made once per run (stage ``canaries``) and reread on resume, so a resumed fine-tune trains on
    exactly the same rows. The user's rows are returned unchanged, first.
    """
    from infscope.data.manifest import write_manifest

    check_canary_source(source)
    if source == "auto":
        source = auto_canary_source(canary_count(fraction, len(train)), len(val or []))
    if not run.done("canaries"):
        with run.stage("canaries") as rec:
            made = make_canaries(
                train,
                fraction=fraction,
                noise=noise,
                seed=seed,
                task=task,
                label_names=label_names,
                sources=list(val or []) if source == "validation" else None,
            )
            write_rows(made.rows, run.layout.canary_rows)
            write_manifest(made.manifest, run.layout.canaries)
            run.record.canaries = {
                "fraction": fraction,
                "noise": noise,
                "weights": made.weights,
                "ids": made.ids,
                "source": source,
                "source_ids": made.source_ids,
                "manifest": "data/canaries.jsonl",
            }
            rec.info.update(rows=len(made.ids), noise=noise, source=source)
    return list(train) + read_jsonl(run.layout.canary_rows)


def check_canary_source(source: str) -> None:
    """A one-line error unless ``source`` is one of :data:`SOURCES`."""
    if source not in SOURCES:
        raise InfscopeError(
            f"unknown canary source {source!r}; use {', '.join(SOURCES[:-1])} or {SOURCES[-1]}"
        )


def check_canary_setting(
    fraction: float,
    noise: str | None,
    source: str,
    train: Sequence[Mapping[str, Any]],
    val: Sequence[Mapping[str, Any]],
    task: str,
) -> None:
    """Refuse, before anything is written, canaries that cannot be made for these rows.

    Checks the source, the fraction, that validation-sourced canaries leave enough validation rows,
    and that the noise (``None``: :func:`default_canary_noise`) applies to the data.
    """
    check_canary_source(source)
    n_canaries = canary_count(fraction, len(train))
    if source == "validation":
        check_validation_left(n_canaries, len(val))
    resolve_canary_noise(noise or default_canary_noise(task), train, task)


def check_validation_left(n_canaries: int, n_validation: int) -> None:
    """A one-line error when validation-sourced canaries would leave too few validation rows."""
    if n_validation - n_canaries < MIN_VALIDATION_LEFT:
        raise InfscopeError(
            f"{n_canaries} canaries from {n_validation} validation rows would leave fewer than "
            f"{MIN_VALIDATION_LEFT} for validation; use a smaller --canaries fraction, a larger validation "
            "set, or --canary-source train"
        )


def auto_canary_source(n_canaries: int, n_validation: int) -> str:
    """``validation`` when that many canaries leave half the validation rows (and at least 4), else ``train``."""
    left = n_validation - n_canaries
    return "validation" if left >= max(MIN_VALIDATION_LEFT, math.ceil(n_validation / 2)) else "train"


def without_canary_sources(
    val: Sequence[Mapping[str, Any]], canaries: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """The validation rows a run uses: all of them, minus the rows validation-sourced canaries copied."""
    if not canaries or canaries.get("source") != "validation":
        return [dict(row) for row in val]
    taken = {str(i) for i in canaries.get("source_ids", [])}
    return [dict(row) for row in val if str(row["id"]) not in taken]


def default_canary_noise(task: str) -> str:
    """The noise canaries get unless the user names one: response swaps, or label flips for classification."""
    return "label" if task == "classification" else "response_swap"
