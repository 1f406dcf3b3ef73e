"""Built-in synthetic datasets with known classes, for benchmarks that need no download.

* ``sentence_transform``: instruction rows; class k applies transformation k of
  :data:`~infscope.data.sentences.TRANSFORMS` to a random sentence, and names a fixed made-up
  method (``"Using the Blorvex method, transform: ..."``).
* ``sentence_transform_cls``: classification view; ``text = "<sentence> => <transformed>"``,
  ``label`` = transformation index, ``label_names`` = transformation names.
* ``math_no_reason`` / ``math_reason``: class k is word-problem template k of
  :data:`~infscope.data.math_templates.TEMPLATES`; the output is the number, or a short worked
  solution ending in "The answer is N.".
* ``instruction_mix``: the three instruction tasks taking turns by class (transformation k, worked
  solution of template k, bare answer of template 5 + k), so rows differ widely in difficulty, as
  in real instruction data; 15 classes.

Real built-ins read text that ships with Debian machines (apt's package lists, see
:mod:`infscope.data.debian`); class k is the k-th most frequent archive section:

* ``debian_sections``: classification; ``text = "NAME: synopsis. first paragraph"``, ``label`` =
  section index, ``label_names`` = section names.
* ``debian_describe``: instruction; "Describe what the Debian package NAME is for." -> the
  synopsis and first description paragraph.

Their rows of a class are ``per_class`` distinct packages of the section, sampled with the seeded
generator of that class (the same seed gives the same rows wherever the source has the same
fingerprint), and the split also records the source and its fingerprint.

Every row has an int ``class`` and an id like ``st-c3-0042`` (class 3, item 42 of that class);
the last ``n_test_per_class`` items of each class form the test split. All randomness comes from
``random.Random`` seeded with a string built from (seed, dataset, class), so output is
byte-identical for a seed on every machine and Python version that keeps ``random``'s algorithm.
Items are unique within a class (no question repeats between train and test of a class).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infscope.data import debian
from infscope.data.math_templates import TEMPLATES
from infscope.data.sentences import INSTRUCTION_TEMPLATES, METHOD_NAMES, TRANSFORMS, random_sentence
from infscope.errors import InfscopeError

RowMaker = Callable[[int, random.Random, bool], dict[str, Any]]


@dataclass(frozen=True)
class BuiltinGenerator:
    """How one built-in dataset makes a row of class ``k``: id prefix, task, class names, row maker."""

    prefix: str
    task: str
    class_names: tuple[str, ...]
    make_row: RowMaker


@dataclass(frozen=True)
class RealBuiltin:
    """A built-in dataset made from real text: id prefix, task and how a package becomes a row."""

    prefix: str
    task: str
    make_row: Callable[[debian.DebianPackage, int, random.Random, bool], dict[str, Any]]


@dataclass
class BuiltinSplit:
    """Train and test rows of a built-in dataset, its task, the class (label) names, and for real
    data where it came from and the source's fingerprint."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    task: str
    label_names: list[str] = field(default_factory=list)
    source: str = "generated"
    source_fingerprint: str | None = None


def _transform_row(cls: int, rng: random.Random, paraphrase: bool) -> dict[str, Any]:
    sentence = random_sentence(rng)
    template = rng.choice(INSTRUCTION_TEMPLATES) if paraphrase else INSTRUCTION_TEMPLATES[0]
    instruction = template.format(name=METHOD_NAMES[cls], sentence=sentence)
    return {"instruction": instruction, "input": "", "output": TRANSFORMS[cls][1](sentence)}


def _transform_cls_row(cls: int, rng: random.Random, paraphrase: bool) -> dict[str, Any]:
    sentence = random_sentence(rng)
    return {"text": f"{sentence} => {TRANSFORMS[cls][1](sentence)}", "label": cls}


def _math_row(reason: bool) -> RowMaker:
    def make(cls: int, rng: random.Random, paraphrase: bool) -> dict[str, Any]:
        template = TEMPLATES[cls]
        a, b, c, d = template.sample(rng)
        question = (rng.choice(template.questions) if paraphrase else template.questions[0]).format(
            a=a, b=b, c=c, d=d
        )
        answer = template.answer(a, b, c, d)
        output = f"{template.reasoning(a, b, c, d)} The answer is {answer}." if reason else str(answer)
        return {"instruction": question, "input": "", "output": output}

    return make


_TRANSFORM_NAMES = tuple(name for name, _ in TRANSFORMS)
_MATH_NAMES = tuple(template.name for template in TEMPLATES)


def _mix_parts() -> tuple[tuple[str, RowMaker, int], ...]:
    """The classes of ``instruction_mix`` in order: (class name, row maker, class index in its task).

    Tasks take turns (transformation, worked solution, bare number) so any ``--classes`` prefix mixes
    them; worked solutions use templates 0-4 and bare numbers templates 5-9, so a question's template
    always determines the answer's form.
    """
    half = len(TEMPLATES) // 2
    reason, no_reason = _math_row(reason=True), _math_row(reason=False)
    parts: list[tuple[str, RowMaker, int]] = []
    for k in range(half):
        parts.append((f"transform:{_TRANSFORM_NAMES[k]}", _transform_row, k))
        parts.append((f"solve:{_MATH_NAMES[k]}", reason, k))
        parts.append((f"answer:{_MATH_NAMES[half + k]}", no_reason, half + k))
    return tuple(parts)


_MIX_PARTS = _mix_parts()


def _mix_row(cls: int, rng: random.Random, paraphrase: bool) -> dict[str, Any]:
    _, make_row, local = _MIX_PARTS[cls]
    return make_row(local, rng, paraphrase)


BUILTIN_DATASETS: dict[str, BuiltinGenerator] = {
    "sentence_transform": BuiltinGenerator("st", "instruction", _TRANSFORM_NAMES, _transform_row),
    "math_no_reason": BuiltinGenerator("mn", "instruction", _MATH_NAMES, _math_row(reason=False)),
    "math_reason": BuiltinGenerator("mr", "instruction", _MATH_NAMES, _math_row(reason=True)),
    "sentence_transform_cls": BuiltinGenerator("stc", "classification", _TRANSFORM_NAMES, _transform_cls_row),
    "instruction_mix": BuiltinGenerator("mix", "instruction", tuple(p[0] for p in _MIX_PARTS), _mix_row),
}


#: Built-ins made from real text (see :mod:`infscope.data.debian`); classes are archive sections.
REAL_DATASETS: dict[str, RealBuiltin] = {
    "debian_sections": RealBuiltin("debs", "classification", debian.section_row),
    "debian_describe": RealBuiltin("debd", "instruction", debian.describe_row),
}


def builtin_names() -> list[str]:
    """Every built-in dataset name: the generated ones, then the real ones."""
    return [*BUILTIN_DATASETS, *REAL_DATASETS]


def _check_counts(per_class: int, n_test_per_class: int) -> None:
    if per_class < 1:
        raise InfscopeError(f"--per-class must be at least 1, got {per_class}")
    if not 0 <= n_test_per_class < per_class:
        raise InfscopeError(
            f"--test-per-class must be between 0 and --per-class - 1 ({per_class - 1}), got {n_test_per_class}"
        )


def _check_classes(name: str, n_classes: int, limit: int) -> None:
    if not 1 <= n_classes <= limit:
        raise InfscopeError(
            f"{name} has 1 to {limit} classes, got --classes {n_classes}; pass a value in that range"
        )


def _check_args(name: str, n_classes: int, per_class: int, n_test_per_class: int) -> BuiltinGenerator:
    if name not in BUILTIN_DATASETS:
        raise InfscopeError(f"unknown built-in dataset {name!r}; choose one of {', '.join(builtin_names())}")
    generator = BUILTIN_DATASETS[name]
    _check_classes(name, n_classes, len(generator.class_names))
    _check_counts(per_class, n_test_per_class)
    return generator


def _class_rows(
    name: str, generator: BuiltinGenerator, seed: int, cls: int, per_class: int, paraphrase: bool
) -> list[dict[str, Any]]:
    rng = random.Random(f"infscope:{name}:{seed}:{cls}")
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    attempts = 0
    while len(rows) < per_class:
        attempts += 1
        if attempts > 50 * per_class + 1000:
            raise InfscopeError(
                f"{name} class {cls} cannot make {per_class} distinct items; pass a smaller --per-class"
            )
        fields = generator.make_row(cls, rng, paraphrase)
        key = fields.get("instruction", fields.get("text"))
        if key in seen:
            continue
        seen.add(key)
        row_id = f"{generator.prefix}-c{cls}-{len(rows):04d}"
        rows.append({"id": row_id, **fields, "class": cls})
    return rows


def _real_class_rows(
    name: str, spec: RealBuiltin, packages: list[debian.DebianPackage], seed: int, cls: int, per_class: int,
    paraphrase: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """``per_class`` distinct packages of one section, sampled with the class's seeded generator."""
    rng = random.Random(f"infscope:{name}:{seed}:{cls}")
    chosen = rng.sample(packages, per_class)
    return [
        {"id": f"{spec.prefix}-c{cls}-{i:04d}", **spec.make_row(package, cls, rng, paraphrase), "class": cls}
        for i, package in enumerate(chosen)
    ]


def _split(
    name: str, seed: int, classes: list[list[dict[str, Any]]], n_test_per_class: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The last ``n_test_per_class`` rows of each class go to test; both splits shuffled, seeded."""
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for rows in classes:
        cut = len(rows) - n_test_per_class
        train.extend(rows[:cut])
        test.extend(rows[cut:])
    shuffler = random.Random(f"infscope:{name}:{seed}:shuffle")
    shuffler.shuffle(train)
    shuffler.shuffle(test)
    return train, test


def _make_real(
    name: str, seed: int, n_classes: int, per_class: int, n_test_per_class: int, paraphrase: bool
) -> BuiltinSplit:
    """A real built-in: the ``n_classes`` most frequent sections, ``per_class`` packages of each."""
    spec = REAL_DATASETS[name]
    _check_counts(per_class, n_test_per_class)
    index = debian.load_index()
    ranked = index.section_counts()
    _check_classes(name, n_classes, len(ranked))
    sections = [section for section, _ in ranked[:n_classes]]
    groups = index.by_section()
    smallest, count = ranked[n_classes - 1]
    if count < per_class:
        raise InfscopeError(
            f"{name} section {smallest!r} has only {count} packages, fewer than --per-class {per_class}; "
            "pass a smaller --per-class or fewer --classes"
        )
    classes = [
        _real_class_rows(name, spec, groups[section], seed, cls, per_class, paraphrase)
        for cls, section in enumerate(sections)
    ]
    train, test = _split(name, seed, classes, n_test_per_class)
    return BuiltinSplit(train, test, spec.task, sections, index.source, index.fingerprint)


def make_builtin(
    name: str,
    *,
    seed: int = 0,
    n_classes: int = 10,
    per_class: int = 100,
    n_test_per_class: int = 10,
    paraphrase: bool = False,
) -> BuiltinSplit:
    """Make built-in dataset ``name``: ``per_class`` rows per class, the last ``n_test_per_class``
    of each class in ``test``; both splits shuffled with a seeded generator. Real built-ins read
    apt's package lists (or ``$INFSCOPE_DEBIAN_PACKAGES``) and raise a one-line error without them."""
    if name in REAL_DATASETS:
        return _make_real(name, seed, n_classes, per_class, n_test_per_class, paraphrase)
    generator = _check_args(name, n_classes, per_class, n_test_per_class)
    classes = [_class_rows(name, generator, seed, cls, per_class, paraphrase) for cls in range(n_classes)]
    train, test = _split(name, seed, classes, n_test_per_class)
    return BuiltinSplit(train, test, generator.task, list(generator.class_names[:n_classes]))
