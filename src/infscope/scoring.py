"""Score the training rows of a fine-tuned run: gradients at one checkpoint, then every method.

Used by the pipeline (``infscope demo``) and by ``infscope score RUN`` on a run made with
``infscope finetune``. The layout it writes inside a run directory::

    grads/train, grads/val       gradient stores (block-contiguous shards, resumable)
    losses.parquet               id, loss (after tuning, at the scored checkpoint), base_loss
    scores/<method>.npz          Scores (values, ids, meta with seconds and peak memory)
    results/<method>.parquet     ranked table: id, score, rank (1 = most harmful), is_flagged
    scoring/<checkpoint>[-<block_by>]/   gradients and losses of ``infscope score`` per checkpoint
    scores/<method>@epoch-N.npz, results/<method>@epoch-N.*   ``infscope score --checkpoint all``
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infscope.errors import InfscopeError

GRADIENT_METHODS = ("datainf", "lissa", "exact", "hessian_free")
#: Methods that need gradients at every checkpoint (``infscope score`` only; costs one gradient pass each).
MULTI_CHECKPOINT_METHODS = ("tracin",)
BASELINE_METHODS = ("loss", "base_loss", "grad_norm", "random")
ALL_METHODS = GRADIENT_METHODS + BASELINE_METHODS
# Pipeline defaults per method. LiSSA's Richardson recursion needs about kappa * ln(1/tol) steps, and
# with the DataInf damping kappa = lambda_max / lambda can reach 10 * d, so a fixed budget keeps the
# demo in time; each block's iterations, residual and convergence are recorded in the Scores meta.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"lissa": {"max_iter": 300, "tol": 1e-4}}
METHOD_ALIASES = {"hessian-free": "hessian_free", "base-loss": "base_loss"}


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Turn ``"datainf,loss"`` (or ``"all"``) into a validated, de-duplicated list of method names."""
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    if names == ["all"]:
        return list(ALL_METHODS)
    out: list[str] = []
    for name in names:
        name = METHOD_ALIASES.get(name, name)
        if name not in ALL_METHODS + MULTI_CHECKPOINT_METHODS:
            known = ", ".join(ALL_METHODS + MULTI_CHECKPOINT_METHODS)
            raise InfscopeError(f"unknown method {name!r}; choose from {known} (or 'all')")
        if name not in out:
            out.append(name)
    if not out:
        raise InfscopeError("no method given; pass --method datainf,loss (or 'all')")
    return out


def row_task(rows: Sequence[dict]) -> str:
    """``classification`` for text + label rows, else ``instruction``."""
    return "classification" if rows and "label" in rows[0] and "output" not in rows[0] else "instruction"


@dataclass
class ModelSpec:
    """How to rebuild the base model and encode rows exactly as during fine-tuning."""

    name: str
    task: str = "instruction"
    label_names: list | None = None
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    response_only: bool = True

    @property
    def model_task(self) -> str:
        return "classification" if self.task == "classification" else "causal"

    def load_base(self):
        """The base model without adapters, seeded, on the configured device and dtype."""
        import torch

        from infscope.models.registry import load_model

        torch.manual_seed(self.seed)
        num_labels = None
        if self.model_task == "classification":
            if not self.label_names:
                raise InfscopeError("classification runs need label names; load the data with infscope.data")
            num_labels = len(self.label_names)
        return load_model(
            self.name,
            task=self.model_task,
            num_labels=num_labels,
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
        )

    def encode(self, rows: Sequence[dict], tokenizer):
        from infscope.models.encode import encode_rows

        labels = self.label_names if self.model_task == "classification" else None
        return encode_rows(
            list(rows),
            tokenizer,
            task=self.model_task,
            max_length=self.max_length,
            response_only=self.response_only,
            label_names=labels,
        )


def collect_gradients(
    spec: ModelSpec,
    checkpoint: str | Path,
    train: Sequence[dict],
    query: Sequence[dict],
    out_dir: str | Path,
    *,
    grad_dtype: str = "float32",
    query_name: str = "val",
    block_by: str = "matrix",
) -> dict[str, Any]:
    """Gradient stores of train and query rows at ``checkpoint`` plus per-row losses.

    The base model's loss is measured first (no adapter: the ``base_loss`` baseline), then the
    checkpoint's adapter is loaded and both stores are collected in batched hook passes; the
    training loss at the checkpoint (the ``loss`` baseline) comes from the same passes.
    Stores resume shard by shard if interrupted.
    """
    from infscope.grads.store import collect_to_store
    from infscope.models.lora import load_adapter
    from infscope.models.loss import per_example_loss
    from infscope.models.prefix import PrefixStates, adapter_first_layer, frozen_prefix
    from infscope.runs import atomic_path

    if not query:
        raise InfscopeError("the query set is empty; pass --query with at least one row")
    out = Path(out_dir)
    loaded = spec.load_base()
    enc_train, enc_query = spec.encode(train, loaded.tokenizer), spec.encode(query, loaded.tokenizer)
    depth = adapter_first_layer(checkpoint)
    prefix = PrefixStates(depth) if depth else None  # shared by the base-model and adapter passes
    loaded.model.requires_grad_(False)  # the base model is only evaluated; the adapter brings its own weights
    with frozen_prefix(loaded.model, prefix):
        base_loss = per_example_loss(loaded.model, enc_train, batch_size=spec.batch_size)
    model = load_adapter(loaded, checkpoint)
    stores = {}
    with frozen_prefix(model, prefix):
        for name, enc in (("train", enc_train), (query_name, enc_query)):
            stores[name] = collect_to_store(
                model,
                enc,
                out / "grads" / name,
                batch_size=spec.batch_size,
                dtype=grad_dtype,
                block_by=block_by,
                meta={"checkpoint": str(checkpoint)},
            )
        train_loss = stores["train"].losses()
        if train_loss is None:
            train_loss = per_example_loss(model, enc_train, batch_size=spec.batch_size)
    losses = pd.DataFrame({"id": enc_train.ids, "loss": np.asarray(train_loss), "base_loss": base_loss})
    with atomic_path(out / "losses.parquet") as tmp:
        losses.to_parquet(tmp, index=False)
    store = stores["train"]
    return {
        "checkpoint": str(checkpoint),
        "blocks": len(store.block_names),
        "params": int(sum(store.block_dim(b) for b in store.block_names)),
        "train_rows": len(store.ids),
        "query_rows": len(stores[query_name].ids),
        "truncated_rows": len(getattr(enc_train, "truncated", []) or []),
    }


def score_methods(
    methods: Sequence[str],
    train_grads,
    query_grads,
    losses: pd.DataFrame | None,
    *,
    seed: int = 0,
    aggregate: bool = True,
    on_method: Callable[[str, float], None] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score every training row with each method; returns ``{method: Scores}``.

    Gradient methods use ``query_grads`` (averaged when ``aggregate``: noise detection; else one
    row per query: attribution); baselines ignore the query. Each Scores' meta records the
    seconds and peak memory of its method.
    """
    from infscope.estimators import baselines
    from infscope.estimators.registry import get_estimator
    from infscope.runs import PeakMemory

    options = options or {}
    train_grads = _in_memory_if_small(train_grads)
    out = {}
    for method in methods:
        start = time.perf_counter()
        with PeakMemory() as mem:
            if method in GRADIENT_METHODS:
                estimator = get_estimator(
                    method, **{**METHOD_OPTIONS.get(method, {}), **options.get(method, {})}
                )
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    scores = estimator.fit(train_grads).score(query_grads, aggregate=aggregate)
                if caught:
                    scores.meta["warning_count"] = len(caught)
                    scores.meta["first_warning"] = str(caught[0].message)
            elif method in ("loss", "base_loss"):
                if losses is None:
                    raise InfscopeError(f"method {method} needs per-row losses; collect gradients first")
                frame = losses.set_index("id").loc[train_grads.ids]
                scores = baselines.from_values(frame[method].to_numpy(), train_grads.ids, method)
            elif method == "grad_norm":
                scores = baselines.grad_norm_scores(train_grads)
            elif method == "random":
                scores = baselines.random_scores(train_grads.ids, seed=seed)
            else:
                raise InfscopeError(
                    f"method {method!r} cannot be scored from one checkpoint; use `infscope score`"
                )
        seconds = time.perf_counter() - start
        scores.meta.update(seconds=round(seconds, 4), peak_rss_mb=round(mem.peak_rss / 2**20, 1))
        out[method] = scores
        if on_method:
            on_method(method, seconds)
    return out


def _in_memory_if_small(grads, limit_bytes: int = 2 << 30):
    """Load an on-disk store once when it fits in ``limit_bytes``, so methods do not each reread it."""
    from infscope.grads.base import InMemoryGradients, to_memory

    if isinstance(grads, InMemoryGradients):
        return grads
    size = 4 * len(grads.ids) * sum(grads.block_dim(b) for b in grads.block_names)
    return to_memory(grads) if size <= limit_bytes else grads


def save_scores(run_dir: str | Path, scored: dict[str, Any], *, suffix: str = "") -> None:
    """Write ``scores/<method><suffix>.npz`` and, for vectors, ``results/<method><suffix>.parquet`` and ``.csv``."""
    run_dir = Path(run_dir)
    for method, scores in scored.items():
        scores.save(run_dir / "scores" / f"{method}{suffix}.npz")
        if np.ndim(scores.values) == 1:
            scores.write_table(run_dir / "results" / f"{method}{suffix}.parquet")
            scores.write_table(run_dir / "results" / f"{method}{suffix}.csv")


def load_scores(run_dir: str | Path) -> dict[str, Any]:
    """Every per-row score vector saved under ``run_dir/scores`` (``{method: Scores}``, sorted by name)."""
    from infscope.estimators.scores import Scores

    paths = sorted(p for p in (Path(run_dir) / "scores").glob("*.npz") if not p.name.endswith(".matrix.npz"))
    if not paths:
        raise InfscopeError(f"{run_dir} has no scores; run `infscope score {run_dir}` first")
    return {p.stem: Scores.load(p) for p in paths}


def detection_evaluation(scores: dict[str, Any], manifest: pd.DataFrame, *, ks: Sequence[int] = ()) -> dict:
    """Detection metrics of each method against the manifest: overall, per family and per operator.

    Returns ``{"n_train", "n_noisy", "detection": {method: report}, "leaderboard": [rows]}``; each
    leaderboard row carries the method's scoring seconds and peak memory from its Scores meta.
    """
    from infscope.evaluate.detection import detection_from_manifest, summary_row

    n_noisy = int(manifest["is_noisy"].astype(bool).sum())
    out: dict[str, Any] = {"n_train": len(manifest), "n_noisy": n_noisy, "detection": {}, "leaderboard": []}
    if not n_noisy:
        return out
    for method, s in scores.items():
        report = detection_from_manifest(
            s.vector(), manifest, ids=s.train_ids, by=("family", "operator"), ks=ks
        )
        out["detection"][method] = report
        out["leaderboard"].append(
            {
                "method": method,
                **summary_row(report),
                "seconds": s.meta.get("seconds"),
                "peak_mb": s.meta.get("peak_rss_mb"),
            }
        )
    return out


@dataclass
class FinetunedRun:
    """What scoring needs from a run directory made by ``infscope finetune`` or ``infscope demo``."""

    path: Path
    spec: ModelSpec
    train: list[dict]
    val: list[dict]
    checkpoints: list[Any]
    best: Any
    manifest: Path | None


def open_finetuned_run(run_dir: str | Path) -> FinetunedRun:
    """Rebuild the model spec, training rows, validation rows and checkpoints of a finished run.

    A ``finetune`` run reloads its data from the recorded source and refuses it if the file changed
    since (fingerprint check); a pipeline run reads the rows it saved under ``data/``.
    """
    import json

    from infscope.models.finetune import read_checkpoints

    path = Path(run_dir)
    run_file = path / "run.json"
    if not run_file.is_file():
        raise InfscopeError(f"{path} is not a run directory (no run.json); make one with `infscope finetune`")
    record = json.loads(run_file.read_text())
    args = record.get("args", {})
    if "finetune" not in record.get("stages", {}):
        raise InfscopeError(
            f"{path} has no finished fine-tuning; run `infscope finetune` (or demo) into it first"
        )
    ft = read_checkpoints(path / "finetune")
    if args.get("command") == "finetune":
        from infscope.cli.finetune_cmds import split_validation
        from infscope.data.loading import load_rows

        data = load_rows(args["data"])
        if data.fingerprint != args.get("data_fingerprint"):
            raise InfscopeError(
                f"{args['data']} changed since fine-tuning; score with the data the run was tuned on"
            )
        config = args.get("config", {})
        if args.get("val"):
            train, val = data.rows, load_rows(args["val"], task=data.task).rows
        else:
            train, val = split_validation(
                data.rows, float(args.get("val_fraction") or 0.1), config.get("seed", 0)
            )
        spec = ModelSpec(
            name=args["model"],
            task=data.task,
            label_names=data.label_names,
            max_length=int(config.get("max_length", 256)),
            batch_size=int(config.get("batch_size", 8)),
            seed=int(config.get("seed", 0)),
            device=config.get("device") or "cpu",
            dtype=config.get("dtype") or "float32",
            response_only=bool(config.get("response_only", True)),
        )
        source = Path(args["data"])
        candidate = (
            source.with_name(source.name[: -len(source.suffix)] + ".manifest.jsonl")
            if source.suffix
            else None
        )
        manifest = candidate if candidate is not None and candidate.is_file() else None
    else:
        from infscope.data.loading import load_rows

        train = load_rows(str(path / "data" / "train.jsonl")).rows
        val = load_rows(str(path / "data" / "val.jsonl")).rows
        label_names = record.get("stages", {}).get("data", {}).get("info", {}).get("label_names")
        spec = ModelSpec(
            name=args["model"],
            task=row_task(train),
            label_names=label_names,
            max_length=int(args.get("max_length", 128)),
            batch_size=int(args.get("batch_size", 8)),
            seed=int(args.get("seed", 0)),
            device=args.get("device", "cpu"),
            dtype=args.get("dtype", "float32"),
        )
        manifest = path / "data" / "manifest.jsonl"
    return FinetunedRun(path, spec, train, val, ft.checkpoints, ft.best, manifest)


def pick_checkpoint(run: FinetunedRun, which: str) -> Any:
    """``best`` (lowest validation loss), ``last`` or ``epoch-N``."""
    if which == "best":
        return run.best
    if which == "last":
        return run.checkpoints[-1]
    for c in run.checkpoints:
        if Path(c.path).name == which or str(c.epoch) == which.removeprefix("epoch-"):
            return c
    names = ", ".join(Path(c.path).name for c in run.checkpoints)
    raise InfscopeError(f"no checkpoint {which!r} in {run.path}; choose best, last, all or one of {names}")


def score_run(
    run_dir: str | Path,
    methods: Sequence[str],
    *,
    query: str | None = None,
    checkpoint: str = "best",
    grad_dtype: str = "float32",
    batch_size: int | None = None,
    block_by: str = "matrix",
) -> dict[str, Any]:
    """Collect gradients (once per checkpoint and query set) and score a fine-tuned run.

    Writes ``RUN/scores`` and ``RUN/results`` and returns ``{method: Scores}``. Gradients live in
    ``RUN/scoring/<checkpoint>/`` so several checkpoints or query sets can be scored side by side.
    ``checkpoint="all"`` also scores every checkpoint as ``<method>@epoch-N`` (the plain names hold
    the best checkpoint), so ``infscope evaluate`` ranks the epochs side by side, over seeds too;
    which checkpoint is scored often matters more than the method. Scoring a method again removes
    its earlier ``@epoch-N`` scores, so no stale epoch is ranked beside new scores.
    """
    from infscope.data.loading import load_rows

    run = open_finetuned_run(run_dir)
    every = checkpoint == "all"
    chosen = pick_checkpoint(run, "best" if every else checkpoint)
    if batch_size:
        run.spec.batch_size = int(batch_size)
    if query is None:
        query_rows, query_name = run.val, "val"
    else:
        loaded_query = load_rows(query, task=run.spec.task)
        query_rows, query_name = loaded_query.rows, "query-" + loaded_query.fingerprint
    single = [m for m in methods if m not in MULTI_CHECKPOINT_METHODS]

    def score_at(ckpt: Any) -> dict[str, Any]:
        train_grads, query_grads, losses = checkpoint_gradients(
            run, ckpt, query_rows, query_name, grad_dtype, block_by
        )
        at_ckpt = score_methods(single, train_grads, query_grads, losses, seed=run.spec.seed)
        for s in at_ckpt.values():
            s.meta.update(checkpoint=str(ckpt.path), query=query_name, train_store=str(train_grads.path))
        return at_ckpt

    scored = score_at(chosen)
    if every:
        for ckpt in run.checkpoints:
            at_ckpt = scored if ckpt.path == chosen.path else score_at(ckpt)
            tag = Path(ckpt.path).name
            for name, s in list(at_ckpt.items()):
                if "@" not in name:
                    scored[f"{name}@{tag}"] = replace(s, method=f"{name}@{tag}", meta=dict(s.meta))
    if "tracin" in methods:
        scored["tracin"] = _tracin_all_checkpoints(run, query_rows, query_name, grad_dtype, block_by)
    _remove_epoch_scores(run.path, methods)
    save_scores(run.path, scored)
    return scored


def _remove_epoch_scores(run_dir: Path, methods: Sequence[str]) -> None:
    """Delete ``<method>@epoch-N`` scores and tables of ``methods`` left by an earlier ``--checkpoint all``."""
    for method in methods:
        for folder, pattern in (("scores", f"{method}@*.npz"), ("results", f"{method}@*")):
            for path in (run_dir / folder).glob(pattern):
                path.unlink()


def checkpoint_gradients(
    run: FinetunedRun, ckpt: Any, query_rows, query_name: str, grad_dtype: str, block_by: str
):
    """Train and query gradient stores and per-row losses at ``ckpt``, collected unless already complete."""
    from infscope.grads.store import GradientStore
    from infscope.runs import atomic_write_json

    work = run.path / "scoring" / (Path(ckpt.path).name + ("" if block_by == "matrix" else f"-{block_by}"))
    train_store, query_store = work / "grads" / "train", work / "grads" / query_name
    if any(_store_differs(s, block_by, grad_dtype) for s in (train_store, query_store)):
        shutil.rmtree(work)  # made with other blocks or another dtype (or before --block-by reached it)
    if not (_complete(train_store) and _complete(query_store) and (work / "losses.parquet").is_file()):
        info = collect_gradients(
            run.spec,
            ckpt.path,
            run.train,
            query_rows,
            work,
            grad_dtype=grad_dtype,
            query_name=query_name,
            block_by=block_by,
        )
        atomic_write_json(work / "gradients.json", info)
    losses = pd.read_parquet(work / "losses.parquet")
    return GradientStore.open(train_store), GradientStore.open(query_store), losses


def _store_differs(path: Path, block_by: str, grad_dtype: str) -> bool:
    """Whether a (possibly unfinished) gradient store exists at ``path`` with other blocks or dtype.

    Checked before the model is loaded; the store's own check at creation would refuse it instead.
    """
    from infscope.grads.store import INDEX_FILE, GradientStore, dtype_name

    if not (path / INDEX_FILE).is_file():
        return False
    store = GradientStore.open(path)
    return store.meta.get("block_by", "matrix") != block_by or store.dtype != dtype_name(grad_dtype)


def _tracin_all_checkpoints(run: FinetunedRun, query_rows, query_name: str, grad_dtype: str, block_by: str):
    """TracIn over every saved checkpoint: ``sum_c lr_c (-v_c . g_{z,c})`` with gradients at each one."""
    from infscope.estimators.registry import get_estimator
    from infscope.runs import PeakMemory

    start = time.perf_counter()
    pairs, queries = [], []
    epoch_lrs = mean_epoch_lrs(run.checkpoints)
    with PeakMemory() as mem:
        for ckpt in run.checkpoints:
            train_grads, query_grads, _ = checkpoint_gradients(
                run, ckpt, query_rows, query_name, grad_dtype, block_by
            )
            pairs.append((train_grads, epoch_lrs[ckpt.path]))
            queries.append(query_grads)
        scores = get_estimator("tracin").fit(pairs).score(queries)
    scores.method = "tracin"
    scores.meta.update(
        seconds=round(time.perf_counter() - start, 4),
        peak_rss_mb=round(mem.peak_rss / 2**20, 1),
        checkpoint="all",
        query=query_name,
        train_store=str(pairs[-1][0].path),
        checkpoints=[str(c.path) for c in run.checkpoints],
        checkpoint_weights=[epoch_lrs[c.path] for c in run.checkpoints],
    )
    return scores


def mean_epoch_lrs(checkpoints: Sequence[Any]) -> dict[str, float]:
    """TracIn's weight of each checkpoint: the mean learning rate of the steps since the previous one.

    The learning rate recorded at a checkpoint is the one after its last step (zero at the end of a
    linear schedule), so the schedule is replayed from the trainer state instead.
    """
    import json
    import math

    from infscope.models.finetune import lr_factor

    last = checkpoints[-1]
    state = json.loads((Path(last.path) / "trainer_state.json").read_text())
    config = state["config"]
    total = int(last.step)
    warmup = math.ceil(float(config.get("warmup_ratio", 0.0)) * total)
    base, schedule = float(config["lr"]), config.get("schedule", "linear")
    out, previous = {}, 0
    for c in checkpoints:
        steps = range(previous, int(c.step))
        out[c.path] = base * sum(lr_factor(t, total, warmup, schedule) for t in steps) / max(1, len(steps))
        previous = int(c.step)
    return out


def _complete(store_path: Path) -> bool:
    from infscope.grads.store import GradientStore

    if not (store_path / "index.json").is_file():
        return False
    try:
        return bool(GradientStore.open(store_path).is_complete)
    except InfscopeError:
        return False
