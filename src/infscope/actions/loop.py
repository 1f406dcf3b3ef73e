"""The cleaning loop: fine-tune, score, act, evaluate on a held-out test set, round after round.

Round 0 fine-tunes on the input as given (the no-cleaning baseline). Each later round acts on the
rows with the scores and the tuned model of the round before (drop, reweight, relabel or repair),
then fine-tunes again from the same base model and seed on the changed rows, scores them and
evaluates on the test set. Every round is a run directory of its own (``rounds/round-N``, made
like ``infscope finetune`` makes one) scored with :func:`infscope.scoring.score_run`.

Every round is measured on the validation rows as well as on the test rows. ``select`` says which
of the two picks rounds: ``val`` (the default) keeps the round with the best *validation* metric
and stops on validation gains, so the test number of the kept round is an honest estimate; ``test``
picks by the test metric itself, which makes the kept round's test number slightly optimistic
(the baselines get no such choice). The loop stops when the selection metric's gain over the
previous round falls under ``min_gain`` or the metric gets worse (unless ``early_stop`` is off),
and keeps the best round by that metric (ties: the lower loss on the same split, then the earlier,
less cleaned round). In the same run it trains two baselines from the input: the same action on as
many random rows as the kept rounds changed, and the oracle, the action on exactly the rows the
noise manifest marks.

With ``reuse`` (a folder), a round whose rows, weights, model and settings match one trained
before (by any clean run given the same folder) copies that round instead of fine-tuning again;
benchmarks use it to share the no-cleaning round and the baselines between methods.

Everything is resumable: the loop's own run record lists the finished rounds and baselines; the
changes of a round are saved before it trains, and its run directory resumes fine-tuning after
the last finished epoch. Bad input is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from infscope.actions.audit import audit_header, write_audit
from infscope.actions.changes import ACTIONS, REVIEW, Change, apply_changes, changed_rows, is_canary, touched
from infscope.actions.drop import drop
from infscope.actions.flagging import Budget, flag
from infscope.actions.layout import CleanLayout
from infscope.actions.metrics import primary_metric, test_metrics
from infscope.actions.output import InputFile, cleaned_records, read_input, write_cleaned
from infscope.actions.relabel import class_losses, relabel
from infscope.actions.repair import repair
from infscope.actions.reweight import reweight
from infscope.data.columns import ColumnMap
from infscope.data.formatting import format_text
from infscope.data.loading import load_rows
from infscope.data.manifest import read_manifest
from infscope.data.readers import rows_fingerprint
from infscope.data.training import find_manifest, label_names_for
from infscope.data.writing import write_rows
from infscope.errors import InfscopeError
from infscope.estimators.inputs import CANARIES
from infscope.estimators.registry import get_method
from infscope.estimators.scores import Scores
from infscope.evaluate.jsonable import to_jsonable
from infscope.runs import (
    DataSource,
    ModelSpec,
    RunDir,
    RunLayout,
    RunRecord,
    atomic_write_json,
    atomic_write_jsonl,
    read_json,
    read_jsonl,
)

#: Changes listed in the report section (the audit log has them all).
REPORT_CHANGES = 200
#: What ``--select`` may pick rounds by: the validation rows (honest) or the test rows (optimistic).
SELECT = ("val", "test")
#: Metrics rounds may be compared by (``exact_match`` only where answers are numbers).
SELECT_METRICS = ("loss", "accuracy", "exact_match")
#: Prefix of the validation metrics in a round's metrics (``val_accuracy``, ``val_loss``).
VAL = "val_"


@dataclass
class CleanConfig:
    """The settings of one ``infscope clean`` run (guarded: rerunning with others needs ``--overwrite``).

    ``k`` is the per-round budget (:class:`~infscope.actions.flagging.Budget`); ``strength`` is
    reweight's ``a``; ``margin`` relabel's confidence margin in nats; ``expert`` repair's expert
    spec (``local:MODEL`` or ``openai:URL#MODEL``); ``select`` whether rounds are kept and stopped
    by the validation (``val``) or the test (``test``) metric, and ``select_metric`` which metric
    (default: the task's primary one, accuracy or exact match; ``loss`` is finer-grained on a small
    validation set). ``canaries`` (a fraction), ``canary_noise`` and ``canary_source`` add the
    seeded corrupted rows of ``infscope finetune --canaries`` to every round's training set, so that
    ``--method fusion`` calibrates on them; they are never acted on and never in any output.
    Fine-tuning settings mirror ``infscope demo``.
    """

    data: str
    val: str
    test: str
    method: str = "loss"
    action: str = "drop"
    rounds: int = 2
    k: str = "10%"
    strength: float = 1.0
    margin: float = 0.5
    expert: str | None = None
    manifest: str | None = None
    model: str = "smollm2-135m"
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 8
    max_length: int = 128
    rank: int = 8
    alpha: float = 16.0
    target_modules: str | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint: str = "best"
    min_gain: float = 1e-3
    early_stop: bool = True
    generate: bool = True
    baselines: bool = True
    select: str = "val"
    select_metric: str | None = None
    canaries: float = 0.0
    canary_noise: str | None = None
    canary_source: str = "auto"

    def __post_init__(self) -> None:
        from infscope.noise.canaries import check_canary_source

        check_canary_source(self.canary_source)
        if int(self.rounds) < 1:
            raise InfscopeError(f"--rounds {self.rounds} runs no cleaning round; pass --rounds 1 or more")
        if self.action not in ACTIONS:
            raise InfscopeError(f"unknown action {self.action!r}; use one of {', '.join(ACTIONS)}")
        self.method = get_method(self.method).name
        if CANARIES in get_method(self.method).needs and not self.canaries:
            raise InfscopeError(
                f"method {self.method} chooses on canaries; pass --canaries 0.05 (or another --method)"
            )
        self.budget  # noqa: B018 - parse --k now, so a bad budget fails before anything is written
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise InfscopeError(f"--margin {self.margin} must be a number >= 0; pass e.g. --margin 0.5")
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise InfscopeError(f"--strength {self.strength} must be a number >= 0; pass e.g. --strength 1")
        if self.checkpoint not in ("best", "last"):
            raise InfscopeError(f"--checkpoint {self.checkpoint!r} is not best or last")
        if self.select not in SELECT:
            raise InfscopeError(f"--select {self.select!r} is not val or test; pass --select val")
        if self.select_metric not in (None, *SELECT_METRICS):
            raise InfscopeError(
                f"--select-metric {self.select_metric!r} is not one of {', '.join(SELECT_METRICS)}; "
                "pass --select-metric loss"
            )

    @property
    def budget(self) -> Budget:
        return Budget.parse(self.k)


@dataclass
class RoundResult:
    """One trained round (or baseline): its rows, run directory, scores of the rows, test metrics."""

    name: str
    run_dir: Path
    rows: list[dict[str, Any]]
    weights: dict[str, float]
    scores: np.ndarray
    metrics: dict[str, float]


@dataclass
class CleanResult:
    """What a finished loop produced: the round table, the kept round, baselines and output paths."""

    table: list[dict[str, Any]]
    best_round: int
    metric: str
    higher_is_better: bool
    baselines: dict[str, dict[str, Any]]
    stopped: str
    cleaned: Path
    audit: Path
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- checks before anything is written


def _row_text(row: Mapping[str, Any]) -> str:
    if "text" in row and "output" not in row:
        return f"{row['text']}\x00{row.get('text_b', '')}"
    return format_text(row)


def check_test_overlap(train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a test set sharing a row with the training data (same id or identical text)."""
    ids = {str(r["id"]) for r in train}
    same_id = [str(r["id"]) for r in test if str(r["id"]) in ids]
    texts = {_row_text(r) for r in train}
    same_text = [str(r["id"]) for r in test if _row_text(r) in texts]
    if same_id or same_text:
        what = f"same id {same_id[0]!r}" if same_id else f"identical text in test row {same_text[0]!r}"
        n = len(set(same_id) | set(same_text))
        raise InfscopeError(
            f"the test set shares {n} row(s) with the training data ({what}), so the measured gain "
            "would be fake; pass a held-out --test with no training rows"
        )


def check_endpoint(spec: str, timeout: float = 3.0) -> None:
    """For an ``openai:URL#MODEL`` expert, refuse at once when nothing listens at ``URL``'s host and port."""
    kind, _, rest = str(spec).partition(":")
    if kind.strip().lower() != "openai":
        return
    url = urlparse(rest.rpartition("#")[0].strip())
    if not url.hostname:
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return
    except OSError as exc:
        raise InfscopeError(
            f"cannot reach the repair expert at {url.geturl()} ({exc.strerror or exc}); start the server "
            "or pass another --expert (e.g. local:smollm2-135m)"
        ) from None


def _remap_labels(
    rows: list[dict[str, Any]], names: list | None, target: list | None
) -> list[dict[str, Any]]:
    """Labels of a file whose names were sorted on their own, renumbered to the training file's names."""
    if not names or not target or list(names) == list(target):
        return rows
    unknown = sorted(set(names) - set(target))
    if unknown:
        raise InfscopeError(f"label {unknown[0]!r} is not a training label; use the training data's labels")
    index = {name: target.index(name) for name in names}
    return [{**r, "label": index[names[int(r["label"])]]} for r in rows]


@dataclass
class _Prepared:
    data: InputFile
    task: str
    label_names: list | None
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    manifest_path: Path | None
    noisy: set[str] | None
    expert: Any


def prepare(cfg: CleanConfig, columns: ColumnMap | None = None, expert: Any = None) -> _Prepared:
    """Load and check everything the loop needs; raises before any file is written."""
    data = read_input(cfg.data, columns)
    task = data.loaded.task
    if cfg.action == "relabel" and task != "classification":
        raise InfscopeError(
            "relabel moves rows between classes, but this is instruction data; use --action repair, drop or reweight"
        )
    if cfg.action == "repair" and task != "instruction":
        raise InfscopeError(
            "repair rewrites responses, but this is classification data; use --action relabel, drop or reweight"
        )
    method = get_method(cfg.method)
    if task not in method.tasks:
        raise InfscopeError(
            f"method {cfg.method} scores {' or '.join(method.tasks)} data, not {task}; choose another --method"
        )
    val_loaded = load_rows(cfg.val, task=task, columns=columns)
    test_loaded = load_rows(cfg.test, task=task, columns=columns)
    label_names = None
    val, test = val_loaded.rows, test_loaded.rows
    if task == "classification":
        label_names = label_names_for(data.rows + val + test, data.loaded.label_names)
        val = _remap_labels(val, val_loaded.label_names, data.loaded.label_names)
        test = _remap_labels(test, test_loaded.label_names, data.loaded.label_names)
    check_test_overlap(data.rows, test)
    if cfg.action == "repair" and expert is None:
        if not cfg.expert:
            raise InfscopeError(
                "repair needs an expert model; pass --expert local:smollm2-135m or openai:URL#MODEL"
            )
        check_endpoint(cfg.expert)
        from infscope.actions.experts import expert_from_spec

        expert = expert_from_spec(cfg.expert)
        if hasattr(expert, "check"):
            expert.check()
    if cfg.canaries:
        from infscope.noise.canaries import check_canary_setting

        check_canary_setting(cfg.canaries, cfg.canary_noise, cfg.canary_source, data.rows, val, task)
    manifest_path = find_manifest(cfg.data, cfg.manifest)
    noisy = None
    if manifest_path is not None:
        frame = read_manifest(manifest_path, train_ids=[r["id"] for r in data.rows])
        noisy = set(frame.loc[frame["is_noisy"], "id"].astype(str))
    return _Prepared(data, task, label_names, val, test, manifest_path, noisy, expert)


def _with_canaries(
    cfg: CleanConfig, prep: _Prepared, run: RunDir, rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A round's training rows plus its canaries, and the validation rows the canaries left."""
    from infscope.noise.canaries import add_canaries, default_canary_noise, without_canary_sources

    if not cfg.canaries:
        return rows, prep.val
    train = add_canaries(
        run,
        rows,
        fraction=cfg.canaries,
        noise=cfg.canary_noise or default_canary_noise(prep.task),
        seed=cfg.seed,
        task=prep.task,
        label_names=prep.label_names,
        val=prep.val,
        source=cfg.canary_source,
    )
    run.save()
    return train, without_canary_sources(prep.val, run.record.canaries)


# ---------------------------------------------------------------- one trained round


def _model_spec(cfg: CleanConfig, task: str, label_names: list | None) -> ModelSpec:
    return ModelSpec(
        name=cfg.model,
        task=task,
        label_names=list(label_names) if task == "classification" and label_names else None,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=cfg.device,
        dtype=cfg.dtype,
    )


def finetune_config(cfg: CleanConfig) -> Any:
    """The fine-tuning settings every round uses (same base, same seed), as the pipeline builds them."""
    from infscope.models.config import lora_finetune_config

    return lora_finetune_config(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        max_length=cfg.max_length,
        device=cfg.device,
        dtype=cfg.dtype,
        rank=cfg.rank,
        alpha=cfg.alpha,
        target_modules=cfg.target_modules,
    )


def _weights_digest(weights: Mapping[str, float]) -> str | None:
    if not weights or all(w == 1.0 for w in weights.values()):
        return None
    text = json.dumps(sorted((str(k), float(v)) for k, v in weights.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tuned_model(run_dir: str | Path, checkpoint: str = "best") -> Any:
    """The base model of a round with its tuned adapter (``best`` or ``last`` checkpoint), in eval mode."""
    from infscope.models.lora import load_adapter
    from infscope.models.registry import load_spec
    from infscope.scoring import open_run

    opened = open_run(run_dir)
    loaded = load_spec(opened.spec)
    loaded.model = load_adapter(loaded, opened.checkpoint(checkpoint).path)
    loaded.model.eval()
    return loaded


def _reuse_key(cfg: CleanConfig, prep: _Prepared, record: RunRecord) -> str:
    """What makes two rounds the same training and evaluation: rows, weights, model, settings, val and test."""
    parts = {
        "args": {k: v for k, v in record.args.items() if k != "round"},
        "model": asdict(record.model),
        "val": rows_fingerprint(prep.val),
        "test": rows_fingerprint(prep.test),
        "checkpoint": cfg.checkpoint,
        "generate": cfg.generate,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _copy_run(source: Path, target: Path) -> None:
    """Copy a finished round directory, pointing the absolute paths its JSON files record at the copy."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    old, new = str(source.resolve()), str(target.resolve())
    for path in tmp.rglob("*.json"):
        text = path.read_text()
        if old in text:
            path.write_text(text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1]))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def train_round(
    cfg: CleanConfig,
    prep: _Prepared,
    name: str,
    run_dir: Path,
    rows: list[dict[str, Any]],
    weights: Mapping[str, float],
    reuse: Path | None = None,
) -> RoundResult:
    """Fine-tune ``rows`` (with ``weights``) into ``run_dir``, score them, evaluate on val and test rows.

    Each step is a stage of the round's run directory, so an interrupted round resumes inside it.
    With ``reuse``, a round trained before with the same rows, weights and settings is copied from
    there instead of trained, and a newly trained round is stored there.
    """
    from infscope.models.finetune import finetune
    from infscope.models.registry import load_spec
    from infscope.scoring import score_run

    spec = _model_spec(cfg, prep.task, prep.label_names)
    ft = finetune_config(cfg)
    record = RunRecord(
        kind="finetune",
        model=spec,
        data=DataSource(
            train=str(prep.data.path),
            fingerprint=rows_fingerprint(rows),
            val=str(Path(cfg.val).resolve()) if Path(cfg.val).exists() else cfg.val,
            split_seed=cfg.seed,
        ),
        finetune=ft.to_dict(),
        manifest=str(prep.manifest_path) if prep.manifest_path else None,
        args={
            "command": "clean",
            "round": name,
            "rows": rows_fingerprint(rows),
            "weights": _weights_digest(weights),
            "model": cfg.model,
            "config": ft.to_dict(),
            **(
                {
                    "canaries": cfg.canaries,
                    "canary_noise": cfg.canary_noise,
                    "canary_source": cfg.canary_source,
                }
                if cfg.canaries
                else {}
            ),
        },
    )
    cached = Path(reuse) / _reuse_key(cfg, prep, record) if reuse is not None else None
    if cached is not None and (cached / "run.json").is_file() and not RunLayout(run_dir).record.exists():
        _copy_run(cached, run_dir)
    run = RunDir.create(run_dir, record, overwrite=True)
    if not run.done("data"):
        with run.stage("data") as rec:
            write_rows(rows, run.layout.train)
            write_rows(prep.val, run.layout.val)
            rec.info.update(train_rows=len(rows), val_rows=len(prep.val), task=prep.task)
    train, val = _with_canaries(cfg, prep, run, rows)
    if not run.done("finetune"):
        with run.stage("finetune") as rec:
            loaded = load_spec(spec)
            labels = spec.label_names if prep.task == "classification" else None
            result = finetune(
                loaded, train, val, ft, run.layout.finetune, label_names=labels, weights=weights or None
            )
            rec.info.update(best=result.best.path, epochs=len(result.checkpoints))
    if not RunLayout(run_dir).scores(cfg.method).is_file():  # a copied round may hold other methods only
        score_run(run_dir, [cfg.method], checkpoint=cfg.checkpoint)
        run = RunDir.open(run_dir)
    scores = Scores.load(RunLayout(run_dir).scores(cfg.method))
    by_id = dict(zip(scores.train_ids, scores.vector(), strict=True))
    vector = np.array([by_id.get(str(r["id"]), np.nan) for r in rows], dtype=np.float64)
    loaded = None
    for stage, split in (("test", prep.test), ("val", val)):
        if not run.done(stage):
            with run.stage(stage) as rec:
                loaded = loaded or tuned_model(run_dir, cfg.checkpoint)
                rec.info.update(
                    test_metrics(
                        loaded,
                        split,
                        task=prep.task,
                        label_names=prep.label_names,
                        max_length=cfg.max_length,
                        batch_size=cfg.batch_size,
                        generate=cfg.generate,
                    )
                )
    metrics = {k: float(v) for k, v in run.stage_info("test").items()}
    metrics.update({f"{VAL}{k}": float(v) for k, v in run.stage_info("val").items()})
    if scores.meta.get("canary_auroc") is not None:  # how well the round's scores find its canaries
        metrics["canary_auroc"] = float(scores.meta["canary_auroc"])
    if cached is not None and not cached.exists():
        _copy_run(run_dir, cached)
    return RoundResult(name, run_dir, rows, dict(weights), vector, metrics)


# ---------------------------------------------------------------- acting


def _eligible(action: str, rows: Sequence[Mapping[str, Any]], done: set[str]) -> np.ndarray:
    """Rows an action may touch: never canaries; relabel and repair touch a row once."""
    once = action in ("relabel", "repair")
    return np.array(
        [not is_canary(r["id"]) and not (once and str(r["id"]) in done) for r in rows], dtype=bool
    )


def act(
    cfg: CleanConfig,
    prep: _Prepared,
    previous: RoundResult,
    scores: np.ndarray,
    budget: Budget,
    *,
    round: int,
    method: str,
    done: set[str],
) -> list[Change]:
    """The changes ``cfg.action`` makes to ``previous.rows`` given ``scores`` (aligned with those rows).

    Relabel and repair consult the model tuned in ``previous``.
    """
    rows, eligible = previous.rows, _eligible(cfg.action, previous.rows, done)
    common = {"eligible": eligible, "round": round, "method": method}
    if cfg.action == "drop":
        return drop(rows, scores, budget, **common)
    if cfg.action == "reweight":
        return reweight(rows, scores, strength=cfg.strength, by_class=prep.task == "classification",
                        current=previous.weights, **common)  # fmt: skip
    flagged = flag(scores, budget, eligible)
    if not len(flagged):
        return []
    loaded = tuned_model(previous.run_dir, cfg.checkpoint)
    if cfg.action == "relabel":
        losses = np.full((len(rows), len(prep.label_names or [])), np.nan)
        losses[flagged] = class_losses(loaded.model, loaded.tokenizer, [rows[i] for i in flagged],
                                       label_names=prep.label_names, max_length=cfg.max_length,
                                       batch_size=cfg.batch_size)  # fmt: skip
        return relabel(
            rows, scores, losses, budget, margin=cfg.margin, label_names=prep.label_names, **common
        )
    from infscope.models.encode import encode_rows
    from infscope.models.loss import per_example_loss

    def losses_of(batch: list[dict[str, Any]]) -> np.ndarray:
        encoded = encode_rows(batch, loaded.tokenizer, task="causal", max_length=cfg.max_length)
        return per_example_loss(loaded.model, encoded, batch_size=cfg.batch_size)

    current = losses_of(list(rows))
    by_loss = flag(current, Budget("count", len(flagged)), eligible)
    threshold = float(current[by_loss].min())
    return repair(rows, scores, budget, prep.expert, losses_of, threshold, **common)


def _save_changes(path: Path, changes: Sequence[Change]) -> None:
    atomic_write_jsonl(path, [c.to_dict() for c in changes])


def _load_changes(path: Path) -> list[Change]:
    return [Change.from_dict(r) for r in read_jsonl(path)]


def _changes_for(path: Path, make: Callable[[], list[Change]]) -> list[Change]:
    """The changes saved at ``path`` by an interrupted attempt, else made now and saved first."""
    if path.is_file():
        return _load_changes(path)
    changes = make()
    _save_changes(path, changes)
    return changes


# ---------------------------------------------------------------- the loop


def selection_key(metric: str, select: str) -> str:
    """The column rounds are compared by: the metric on the validation rows (``val_...``) or test rows."""
    return f"{VAL}{metric}" if select == "val" else metric


def _gain(metric: str, higher: bool, new: Mapping[str, float], old: Mapping[str, float]) -> float:
    return (new[metric] - old[metric]) if higher else (old[metric] - new[metric])


def best_round(table: Sequence[Mapping[str, Any]], key: str, higher: bool) -> int:
    """The round with the best ``key`` column; ties go to the lower loss on the same split, then the earlier round.

    The loss of the same split is ``val_loss`` for ``val_...`` keys and ``loss`` otherwise; accuracy
    on a small split moves in coarse steps, so equal accuracies are common and the loss tells them apart.
    """
    loss = f"{VAL}loss" if key.startswith(VAL) else "loss"

    def rank(row: Mapping[str, Any]) -> tuple[float, float, int]:
        value = float(row[key])
        tie = float(row.get(loss, math.nan)) if key != loss else 0.0
        return (-value if higher else value, tie if math.isfinite(tie) else math.inf, int(row["round"]))

    trained = [row for row in table if row.get(key) is not None]
    return int(min(trained, key=rank)["round"])


def _loop_record(cfg: CleanConfig, prep: _Prepared) -> RunRecord:
    args = asdict(cfg)
    args.update(
        data=str(prep.data.path),
        data_fingerprint=prep.data.loaded.fingerprint,
        val=str(Path(cfg.val).resolve()) if Path(cfg.val).exists() else cfg.val,
        test=str(Path(cfg.test).resolve()) if Path(cfg.test).exists() else cfg.test,
        manifest=str(prep.manifest_path) if prep.manifest_path else None,
        columns=prep.data.columns.mapping() or None,
    )
    return RunRecord(
        kind="clean",
        model=_model_spec(cfg, prep.task, prep.label_names),
        data=DataSource(train=str(prep.data.path), fingerprint=prep.data.loaded.fingerprint, val=args["val"]),
        finetune=finetune_config(cfg).to_dict(),
        manifest=args["manifest"],
        args=args,
    )


def run_clean(
    cfg: CleanConfig,
    out: str | Path,
    *,
    columns: ColumnMap | None = None,
    expert: Any = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    reuse: str | Path | None = None,
) -> CleanResult:
    """Run (or resume) the cleaning loop into ``out`` and write the cleaned data, audit log and tables.

    ``reuse``: a folder of trained rounds shared between runs (see the module docstring).
    """
    reuse = Path(reuse) if reuse is not None else None
    say = log or (lambda message: None)
    prep = prepare(cfg, columns, expert)
    layout = CleanLayout(out)
    metric, higher = primary_metric(prep.task, prep.test, cfg.generate)
    chosen = cfg.select_metric or metric
    if chosen not in ("loss", metric):
        raise InfscopeError(
            f"--select-metric {chosen} is not measured on this data (it has loss and {metric}); "
            f"pass --select-metric loss or {metric}"
        )
    sel_higher = higher if chosen == metric else False
    key = selection_key(chosen, cfg.select)
    split = "validation" if cfg.select == "val" else "test"
    budget = cfg.budget
    loop = RunDir.create(out, _loop_record(cfg, prep), overwrite=overwrite)

    input_rows = list(prep.data.rows)
    say(f"round 0: fine-tuning {cfg.model} on {len(input_rows)} rows as given")
    current = train_round(cfg, prep, "round-0", layout.round_dir(0), input_rows, {}, reuse)
    if not loop.done("round-0"):
        with loop.stage("round-0") as rec:
            rec.info.update(metrics=current.metrics, rows=len(current.rows), changed=0)
    results = {0: current}
    table = [_table_row(0, current, [], 0, None)]
    all_changes: list[Change] = []
    stopped = f"ran all {cfg.rounds} rounds"
    for r in range(1, cfg.rounds + 1):
        previous = results[r - 1]
        changes = _changes_for(
            layout.round_changes(r),
            lambda previous=previous, r=r: act(
                cfg,
                prep,
                previous,
                previous.scores,
                budget,
                round=r,
                method=cfg.method,
                done=touched(all_changes),
            ),
        )
        if changed_rows(changes) == 0:
            stopped = f"round {r} found nothing to change"
            all_changes.extend(c for c in changes if c.action == REVIEW)
            break
        all_changes.extend(changes)
        rows, weights = apply_changes(input_rows, {}, all_changes)
        say(f"round {r}: {cfg.action} on {changed_rows(changes)} rows, fine-tuning on {len(rows)} rows")
        result = train_round(cfg, prep, f"round-{r}", layout.round_dir(r), rows, weights, reuse)
        gain = _gain(key, sel_higher, result.metrics, previous.metrics)
        stop = cfg.early_stop and (gain < cfg.min_gain or gain < 0)
        if not loop.done(f"round-{r}"):
            with loop.stage(f"round-{r}") as rec:
                rec.info.update(
                    metrics=result.metrics, rows=len(rows), changed=changed_rows(changes), gain=gain
                )
        results[r] = result
        table.append(_table_row(r, result, changes, changed_rows(all_changes), gain))
        say(
            f"round {r}: test {metric} {result.metrics[metric]:.4f}, validation {metric} "
            f"{result.metrics[f'{VAL}{metric}']:.4f} ({split} {chosen} gain {gain:+.4f})"
        )
        if stop:
            worse = gain < 0
            stopped = (
                f"round {r} made the {split} {chosen} worse"
                if worse
                else f"round {r} gained less than {cfg.min_gain:g} in {split} {chosen}"
            )
            break
    best = best_round(table, key, sel_higher)
    for row in table:
        row["kept"] = row["round"] == best
    kept = [c for c in all_changes if c.round <= best]
    baselines = {"noisy": {"rows_changed": 0, **results[0].metrics}}
    if cfg.baselines:
        baselines.update(_baselines(cfg, prep, loop, layout, results, kept, all_changes, budget, say, reuse))
    cleaned, audit = _write_outputs(cfg, prep, layout, kept, results[best], best, stopped)
    report = clean_report(cfg, prep, table, best, metric, higher, baselines, kept, stopped, cleaned, audit)
    atomic_write_json(layout.rounds_table, to_jsonable(table))
    atomic_write_json(layout.report, to_jsonable(report))
    return CleanResult(table, best, metric, higher, baselines, stopped, cleaned, audit, report)


def _table_row(
    r: int, result: RoundResult, changes: Sequence[Change], cumulative: int, gain: float | None
) -> dict[str, Any]:
    return {
        "round": r,
        "rows": len(result.rows),
        "changed": changed_rows(changes),
        "review": sum(1 for c in changes if c.action == REVIEW),
        "cumulative": cumulative,
        **result.metrics,
        "gain": gain,
    }


def _baselines(
    cfg: CleanConfig,
    prep: _Prepared,
    loop: RunDir,
    layout: CleanLayout,
    results: dict[int, RoundResult],
    kept: list[Change],
    all_changes: list[Change],
    budget: Budget,
    say: Callable[[str], None],
    reuse: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Random rows (as many as the kept rounds changed) and the oracle (the manifest's noisy rows)."""
    base = results[0]
    ids = [str(r["id"]) for r in base.rows]
    n_random = changed_rows(kept) or changed_rows(c for c in all_changes if c.round == 1)
    plans: dict[str, tuple[np.ndarray, Budget]] = {}
    if n_random:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED]))
        plans["random"] = (rng.random(len(ids)), Budget("count", n_random))
    if prep.noisy:
        plans["oracle"] = (np.array([float(i in prep.noisy) for i in ids]), Budget("threshold", 0.5))
    out: dict[str, dict[str, Any]] = {}
    for name, (scores, chosen) in plans.items():
        changes = _changes_for(
            layout.baseline_changes(name),
            lambda scores=scores, chosen=chosen, name=name: act(
                cfg, prep, base, scores, chosen, round=1, method=name, done=set()
            ),
        )
        if changed_rows(changes) == 0:  # the same rows as round 0: nothing to retrain
            out[name] = {"rows_changed": 0, **base.metrics}
            continue
        rows, weights = apply_changes(base.rows, {}, changes)
        say(f"baseline {name}: {cfg.action} on {changed_rows(changes)} rows")
        result = train_round(cfg, prep, f"baseline-{name}", layout.baseline_dir(name), rows, weights, reuse)
        if not loop.done(f"baseline:{name}"):
            with loop.stage(f"baseline:{name}") as rec:
                rec.info.update(metrics=result.metrics, changed=changed_rows(changes))
        out[name] = {"rows_changed": changed_rows(changes), **result.metrics}
    return out


def _write_outputs(
    cfg: CleanConfig,
    prep: _Prepared,
    layout: CleanLayout,
    kept: list[Change],
    best: RoundResult,
    best_round: int,
    stopped: str,
) -> tuple[Path, Path]:
    """The cleaned file (input's format) and the audit log; canaries appear in neither."""
    weights = best.weights if cfg.action == "reweight" else None
    visible = [c for c in kept if not is_canary(c.id)]
    cleaned = write_cleaned(
        prep.data, cleaned_records(prep.data, visible, weights), layout.cleaned(prep.data.path.suffix)
    )
    header = audit_header(
        prep.data.path,
        prep.data.format,
        cleaned,
        method=cfg.method,
        action=cfg.action,
        best_round=best_round,
        rounds=cfg.rounds,
        stopped=stopped,
        expert=getattr(prep.expert, "spec", cfg.expert),
    )
    audit = write_audit(layout.audit, header, visible)
    return cleaned, audit


def clean_report(
    cfg: CleanConfig,
    prep: _Prepared,
    table: list[dict[str, Any]],
    best: int,
    metric: str,
    higher: bool,
    baselines: dict[str, dict[str, Any]],
    kept: list[Change],
    stopped: str,
    cleaned: Path,
    audit: Path,
) -> dict[str, Any]:
    """The section the report renders: the gain curve beside the baselines and the changed rows."""
    visible = [c.to_dict() for c in kept if not is_canary(c.id)]
    return {
        "kind": "clean",
        "method": cfg.method,
        "action": cfg.action,
        "budget": cfg.budget.describe(),
        "metric": metric,
        "higher_is_better": higher,
        "metric_note": "exact match of the final number by greedy generation"
        if metric == "exact_match"
        else None,
        "select": cfg.select,
        "selected_by": f"{'validation' if cfg.select == 'val' else 'test'} {cfg.select_metric or metric}",
        "rounds": table,
        "best_round": best,
        "stopped": stopped,
        "curve": {
            "round": [row["round"] for row in table],
            "rows_changed": [row["cumulative"] for row in table],
            metric: [row[metric] for row in table],
            f"{VAL}{metric}": [row.get(f"{VAL}{metric}") for row in table],
        },
        "baselines": baselines,
        "changes": visible[:REPORT_CHANGES],
        "n_changes": len(visible),
        "cleaned": str(cleaned),
        "audit": str(audit),
    }


def read_result(out: str | Path) -> dict[str, Any]:
    """The report section a finished ``infscope clean`` wrote (for the report and ``--show``)."""
    return read_json(CleanLayout(out).report)
