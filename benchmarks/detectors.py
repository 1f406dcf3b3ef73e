"""Which detector finds label-changing noise best, per setting, checkpoint and option? (issue 10)

For each setting (built-in task + noise, :data:`SETTINGS`) and seed, this script fine-tunes once
through :func:`infscope.pipeline.run_pipeline` (resumable: SmolLM2-135M with LoRA r=8 on q/v of the
top 10 layers for instruction data; MiniLM for the classification setting, since the built-in
SmolLM2 has no classifier), then scores every training row with

* every applicable registry method (gradient influence, TracIn, LESS, TrackStar, loss baselines,
  training dynamics, ``label_margin`` for classifiers) through :func:`infscope.scoring.score_run`,
  at the best checkpoint and, where the profile says so, at every checkpoint (``METHOD@epoch-N``)
  and their mean (``METHOD@ensemble``); each method in its own call, so a crash becomes an error
  row and the rest goes on;
* pair-consistency scores of instruction data with several options: ``xprompt`` with competitors
  ``r`` (random, k 3/5/8), ``n`` (nearest by prompt embedding, k 3/5) and ``y`` (nearest by the
  words of the *response*, k 3: the rows whose instructions could have produced this response),
  aggregated as the mean (the registry's), the ``_min`` or the ``_ratio``; ``pmi``, ``ifd``,
  ``xresponse``; at the tuned checkpoints and under the base model (``base_*``). They come from
  **one** batched pass over the union of (response, prompt) pairs per model
  (:func:`infscope.models.pair_losses.pair_losses`, saved in chunks, resumable), combined with the
  library's own plans (:mod:`infscope.estimators.pair`). Random competitors are one draw of
  :data:`RANDOM_DRAW` per row and every k uses its prefix (the registry draws each k anew: the
  same distribution, other rows). Their seconds are estimates: time per pair x pairs needed.
* label-free fusions of cached scores (:data:`FUSIONS`, mean percentile rank).

How much is scored per run is the setting's :class:`Profile` (a SmolLM2 forward pass costs about
0.1-0.3 s per pair on this shared machine, so the grid is cut to fit the time budget).

Per setting it writes a Markdown table (mean AUROC and AP over seeds, the smallest gap to the
training loss over seeds, seconds, peak MB) to ``benchmarks/results/detectors.md`` and every
per-seed number to ``benchmarks/results/detectors.json``. Scores of each run are cached in
``RUN/detectors/`` (values per variant, pair losses per model), so a rerun computes only what is
missing, and a new fusion costs nothing. Peak MB is the process's resident peak while a method
ran (models loaded earlier in the process count too).

The goals of issue 10 (response swaps and wrong answers: AUROC >= 0.95 and AP >= 0.85; label flips:
AUROC >= 0.90; each >= 0.08 above the loss in every seed; quality noise >= 0.85) head each table.
Only a method fixed in advance (or chosen on canaries) may back a claim for users; every other
row is an oracle choice.

    OMP_NUM_THREADS=1 python3 benchmarks/detectors.py --settings demo_swap,sections_flip
    OMP_NUM_THREADS=1 python3 benchmarks/detectors.py --tables-only   # rebuild tables from the cache
    python3 benchmarks/detectors.py --model tiny-llama --seeds 0 --root /tmp/det --results /tmp/det-res
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from infscope.data.manifest import read_manifest
from infscope.estimators.pair import (
    PairPlan,
    competitor_index,
    ifd_plan,
    pmi_plan,
    xprompt_plan,
    xresponse_plan,
)
from infscope.estimators.pair import response_words as library_response_words
from infscope.estimators.registry import FUSION_POOL, get_method
from infscope.evaluate.metrics import auroc, average_precision
from infscope.models.pair_losses import pair_losses, prompt_embeddings
from infscope.pipeline import DEMO_NOISE, PipelineConfig, run_pipeline
from infscope.runs import PeakMemory
from infscope.scoring import RunInputs, open_run, score_run

ROOT = Path("/work/bench-runs/detectors")
RESULTS = Path(__file__).resolve().parent / "results"

#: Registry methods that need gradients (collected once per checkpoint, then cached by the run).
GRADIENT_METHODS = (
    "loss",
    "base_loss",
    "grad_norm",
    "datainf",
    "hessian_free",
    "exact",
    "lissa",
    "grad_cos",
    "datainf_cos",
)
#: Methods that read every checkpoint's gradients (and optimiser state).
ALL_CHECKPOINT_METHODS = ("tracin", "less", "trackstar")
DYNAMICS_METHODS = ("cartography", "el2n", "aum", "forgetting")


@dataclass(frozen=True)
class Profile:
    """How much is scored in a run: which gradient checkpoints, which pair passes.

    ``grads``: ``"all"`` (every checkpoint, plus TracIn/LESS/TrackStar), ``"best"`` or ``"none"``.
    ``random_k`` / ``nearest_k``: the largest k of each competitor kind at the best checkpoint
    (smaller k are prefixes). ``other_k``: random k at the other checkpoints (0 = own loss only).
    ``base_k``: random k under the base model (0 = skip the base model). ``resp_k``: competitors
    nearest by response words at the best checkpoint. ``empty``: also the empty-instruction pass
    (pmi, ifd, xresponse).
    """

    grads: str = "all"
    random_k: int = 8
    nearest_k: int = 5
    xresponse_k: int = 3
    other_k: int = 3
    base_k: int = 3
    empty: bool = True
    resp_k: int = 3
    fusion: bool = False
    oof: bool = False


#: Random competitors are one draw of this many rows per row; every k (and checkpoint) uses a prefix.
RANDOM_DRAW = 8

PROFILES = {
    "full": Profile(random_k=3, nearest_k=3, xresponse_k=0, other_k=0, base_k=0, empty=False),
    # what seed 0 of demo_swap was scored with (cached; later seeds use "full" within the time budget)
    "wide": Profile(random_k=8, nearest_k=5, xresponse_k=3, other_k=3, base_k=3),
    "lite": Profile(grads="best", random_k=3, nearest_k=3, xresponse_k=0, other_k=0, base_k=0, empty=False),
    "pairs": Profile(grads="none", random_k=3, nearest_k=3, xresponse_k=0, other_k=0, base_k=0, empty=False),
    # held-out seeds: pair variants only (response-similar competitors up to k=5, and pmi/ifd)
    "fresh": Profile(grads="none", random_k=0, nearest_k=0, xresponse_k=0, other_k=0, base_k=0, resp_k=5),
    # canary runs: the registry's fusion (and its pool) as a user gets it, plus response-similar variants
    "canary": Profile(
        grads="none",
        random_k=0,
        nearest_k=0,
        xresponse_k=0,
        other_k=0,
        base_k=0,
        empty=False,
        resp_k=5,
        fusion=True,
    ),
    # wrong answers: the registry rows (loss, answer_loss, dynamics) and the shipped xprompt default
    "answers": Profile(
        grads="none", random_k=0, nearest_k=0, xresponse_k=0, other_k=0, base_k=0, empty=False, resp_k=3
    ),
    # canaries on wrong answers: fusion as a user gets it; no extra pair variants beyond its pool
    "canary_answers": Profile(
        grads="none",
        random_k=0,
        nearest_k=0,
        xresponse_k=0,
        other_k=0,
        base_k=0,
        empty=False,
        resp_k=0,
        fusion=True,
    ),
    "heldout_cls": Profile(
        grads="none", random_k=0, nearest_k=0, xresponse_k=0, other_k=0, base_k=0, empty=False, resp_k=0
    ),
    "canary_cls": Profile(
        grads="none",
        random_k=0,
        nearest_k=0,
        xresponse_k=0,
        other_k=0,
        base_k=0,
        empty=False,
        fusion=True,
        oof=True,
    ),
}


@dataclass(frozen=True)
class Setting:
    """One benchmark setting: the pipeline's data/noise/training options and the goal it is held to."""

    name: str
    note: str
    config: dict[str, Any]
    goal: tuple[float, float | None]
    profile: str = "lite"
    extra: dict[str, Any] = field(default_factory=dict)


SWAP_GOAL = (0.95, 0.85)
#: debian_sections label flips on MiniLM + LoRA (no SmolLM2 classification head), and its 10-epoch variant.
SECTIONS_FLIP = {
    "dataset": "debian_sections",
    "noise_weights": "label_flip=1",
    "model": "minilm",
    "lora_layers": None,
    "max_length": 64,
}
SECTIONS_E10 = {**SECTIONS_FLIP, "epochs": 10, "lr": 3e-3}
#: 10 % canaries copied from validation rows: 3 validation rows per class, 12 of 30 become canaries.
VAL_CANARIES = {"val_per_class": 3, "canaries": 0.1, "canary_source": "auto"}
BASE = {"classes": 10, "train_per_class": 12, "val_per_class": 2, "noise_ratio": 0.2, "lora_layers": "top:10"}
SETTINGS = {
    s.name: s
    for s in (
        Setting(
            "demo_swap",
            "demo task (sentence_transform), 20 % response swaps",
            {"dataset": "sentence_transform", "noise_weights": "response_swap=1"},
            SWAP_GOAL,
            "full",
        ),
        Setting(
            "sections_flip",
            "debian_sections (real package descriptions -> archive section), 20 % label flips; "
            "MiniLM + LoRA classifier, 3 epochs, max 64 tokens (SmolLM2 has no classification head here)",
            {**SECTIONS_FLIP, "epochs": 3},
            (0.90, None),
            "full",
        ),
        Setting(
            "demo_mix",
            "demo task with the demo's noise mix (grammar .3, semantic .2, quality .2, swaps .3)",
            {"dataset": "sentence_transform", "noise_weights": DEMO_NOISE},
            (0.0, None),
        ),
        Setting(
            "describe_swap",
            "debian_describe (real package descriptions), 20 % response swaps",
            {"dataset": "debian_describe", "noise_weights": "response_swap=1"},
            SWAP_GOAL,
        ),
        Setting(
            "math_wrong",
            "math_reason, 20 % wrong final numbers",
            {"dataset": "math_reason", "noise_weights": "wrong_numeric=1"},
            SWAP_GOAL,
            "pairs",
        ),
        Setting(
            "demo_quality",
            "demo task, 20 % quality noise (truncation, filler, duplicates, non-answers)",
            {"dataset": "sentence_transform", "noise_weights": "quality=1"},
            (0.85, None),
            "pairs",
        ),
        Setting(
            "demo_swap_heldout",
            "demo_swap on seeds not used to choose xprompt's defaults (pair variants only)",
            {"dataset": "sentence_transform", "noise_weights": "response_swap=1"},
            SWAP_GOAL,
            "fresh",
        ),
        Setting(
            "sections_flip_heldout",
            "sections_flip on seeds not used to design text_oof (3 epochs, MiniLM; loss, dynamics, text_oof)",
            {**SECTIONS_FLIP, "epochs": 3},
            (0.90, None),
            "heldout_cls",
        ),
        Setting(
            "demo_cls_flip",
            "the demo task's classification view (sentence_transform_cls), 20 % label flips, MiniLM 3 epochs "
            "(text_oof fixed before these runs)",
            {
                "dataset": "sentence_transform_cls",
                "noise_weights": "label_flip=1",
                "model": "minilm",
                "lora_layers": None,
                "epochs": 3,
                "max_length": 64,
            },
            (0.90, None),
            "heldout_cls",
        ),
        Setting(
            "math_wrong_heldout",
            "math_wrong on seeds not used to design answer_loss (designed on seed 0 of math_wrong)",
            {"dataset": "math_reason", "noise_weights": "wrong_numeric=1"},
            SWAP_GOAL,
            "answers",
        ),
        Setting(
            "math_wrong_canary",
            "math_wrong with 10 % wrong-answer canaries: the registry's fusion chooses on them (held-out seeds)",
            {
                "dataset": "math_reason",
                "noise_weights": "wrong_numeric=1",
                "canaries": 0.1,
                "canary_noise": "wrong_answer",
                "canary_source": "train",
            },
            SWAP_GOAL,
            "canary_answers",
        ),
        Setting(
            "math_wrong_canary_val",
            "math_wrong_canary with the canaries copied from validation rows (`--canary-source auto` picks "
            "validation here): 3 validation rows per class, 12 of 30 become canaries, 18 stay (20 in "
            "math_wrong_canary); training rows and noise as in math_wrong_canary",
            {
                "dataset": "math_reason",
                "noise_weights": "wrong_numeric=1",
                **VAL_CANARIES,
                "canary_noise": "wrong_answer",
            },
            SWAP_GOAL,
            "canary_answers",
        ),
        # canaries: 10 % extra rows corrupted with the setting's own noise type, the label-free route
        Setting(
            "demo_swap_canary",
            "demo_swap with 10 % response-swap canaries: the registry's fusion chooses on them (held-out seeds)",
            {
                "dataset": "sentence_transform",
                "noise_weights": "response_swap=1",
                "canaries": 0.1,
                "canary_noise": "response_swap",
                "canary_source": "train",
            },
            SWAP_GOAL,
            "canary",
        ),
        Setting(
            "demo_swap_canary_val",
            "demo_swap_canary with the canaries copied from validation rows (`--canary-source auto`): "
            "3 validation rows per class, 12 of 30 become canaries, 18 stay",
            {
                "dataset": "sentence_transform",
                "noise_weights": "response_swap=1",
                **VAL_CANARIES,
                "canary_noise": "response_swap",
            },
            SWAP_GOAL,
            "canary_answers",
        ),
        Setting(
            "describe_swap_canary",
            "describe_swap with 10 % response-swap canaries",
            {
                "dataset": "debian_describe",
                "noise_weights": "response_swap=1",
                "canaries": 0.1,
                "canary_noise": "response_swap",
                "canary_source": "train",
            },
            SWAP_GOAL,
            "canary",
        ),
        Setting(
            "sections_flip_canary",
            "sections_flip_e10 (10 epochs, MiniLM) with 10 % label-flip canaries: fusion, and each method's "
            "checkpoint chosen on the canaries (`@canary`)",
            {**SECTIONS_E10, "canaries": 0.1, "canary_noise": "label", "canary_source": "train"},
            (0.90, None),
            "canary_cls",
        ),
        Setting(
            "sections_flip_canary_val",
            "sections_flip_canary with the canaries copied from validation rows (`--canary-source auto`): "
            "3 validation rows per class, 12 of 30 become canaries, 18 stay",
            {**SECTIONS_E10, **VAL_CANARIES, "canary_noise": "label"},
            (0.90, None),
            "canary_cls",
        ),
        # directions: train further so the model learns the task (and the pairing)
        Setting(
            "demo_swap_long",
            "direction: demo_swap trained 4 epochs at lr 4e-3 (4x the optimiser steps x lr of the demo)",
            {"dataset": "sentence_transform", "noise_weights": "response_swap=1", "epochs": 4, "lr": 4e-3},
            SWAP_GOAL,
            "pairs",
        ),
        Setting(
            "sections_flip_e10",
            "direction: sections_flip trained 10 epochs at lr 3e-3 (MiniLM)",
            SECTIONS_E10,
            (0.90, None),
            "lite",
        ),
    )
}


# ---------------------------------------------------------------- per-run cache


class RunCache:
    """Per-run scores by variant name (values aligned with ``ids``, seconds, peak MB or an error)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "detectors" / "scores.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def has(self, name: str) -> bool:
        return name in self.data

    def put(self, name: str, entry: dict[str, Any]) -> None:
        self.data[name] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def pipeline_config(setting: Setting, seed: int, model: str = "smollm2-135m") -> PipelineConfig:
    """The pipeline run of ``setting`` and ``seed`` (scoring only ``random``: gradients come later)."""
    layers = {"lora_layers": None} if model.startswith("tiny") else {}  # tiny models have 2 layers
    return PipelineConfig(
        **{**BASE, "model": model, **setting.config, "seed": seed, "methods": ("random",), **layers}
    )


def error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def registry_scores(run_dir: Path, cache: RunCache, profile: Profile, task: str, log) -> None:
    """Every applicable registry method at the best and (profile ``all``) every checkpoint."""
    names: list[str] = []
    if profile.grads != "none":
        names += list(GRADIENT_METHODS)
    if profile.grads == "all":
        names += list(ALL_CHECKPOINT_METHODS)
    names += list(DYNAMICS_METHODS)
    if task == "classification":
        names.append("label_margin")
    if task == "instruction":
        names.append("answer_loss")  # one forward pass
    names = [n for n in names if task in get_method(n).tasks]  # aum/forgetting: classifiers only
    for name in names:
        if cache.has(name):
            continue
        checkpoint = "all" if profile.grads == "all" or name == "label_margin" else "best"
        if name in DYNAMICS_METHODS + ALL_CHECKPOINT_METHODS:
            checkpoint = "best"  # they read every epoch already
        start = time.perf_counter()
        try:
            scored = score_run(run_dir, [name], checkpoint=checkpoint)
        except Exception as exc:  # recorded in the table, the benchmark goes on
            cache.put(name, {"error": error_line(exc), "traceback": traceback.format_exc()})
            log(f"  {name}: ERROR {error_line(exc)}")
            continue
        for key, s in scored.items():
            cache.put(
                key,
                {
                    "ids": list(s.train_ids),
                    "values": np.asarray(s.values, dtype=float).reshape(-1).tolist(),
                    "seconds": s.meta.get("seconds"),
                    "peak_mb": s.meta.get("peak_rss_mb"),
                },
            )
        log(f"  {name}: {time.perf_counter() - start:.0f} s")


def _put_scored(cache: RunCache, scored: dict, suffix: str = "") -> None:
    """Cache every returned :class:`Scores` (canaries already dropped) with its canary AUROC and choice."""
    for key, s in scored.items():
        cache.put(
            f"{key}{suffix}",
            {
                "ids": list(s.train_ids),
                "values": np.asarray(s.values, dtype=float).reshape(-1).tolist(),
                "seconds": s.meta.get("seconds"),
                "peak_mb": s.meta.get("peak_rss_mb"),
                "canary_auroc": s.meta.get("canary_auroc"),
                "fusion": s.meta.get("fusion"),
                "checkpoint_tag": s.meta.get("checkpoint_tag"),
            },
        )


def canary_scores(run_dir: Path, cache: RunCache, profile: Profile, task: str, log) -> None:
    """What a user without labels runs: ``--method fusion`` (its pool in the same call, as the CLI does),
    and for classifiers ``--checkpoint canary`` and the out-of-fold scores."""
    calls = []
    if profile.fusion:
        pool = [m for m in FUSION_POOL if task in get_method(m).tasks]
        calls.append(("fusion", pool + ["fusion"], "best", ""))
    has_canaries = bool(open_run(run_dir).canary_ids)
    if task == "classification" and has_canaries:
        calls.append(
            ("label_margin@canary", ["label_margin", "loss", "grad_cos", "datainf"], "canary", "@canary")
        )
    if task == "classification":  # the cross-fitted probe: no fine-tune, one pass of the base model
        calls.append(("text_oof", ["text_oof", "loss"], "best", ""))
    if task == "classification" and profile.oof:  # K fold fine-tunes (cached in the run)
        calls.append(("oof_fusion", ["oof_loss", "cleanlab", "oof_fusion"], "best", ""))
    for marker, names, checkpoint, suffix in calls:
        if cache.has(marker):
            continue
        start = time.perf_counter()
        try:
            scored = score_run(run_dir, names, checkpoint=checkpoint)
        except Exception as exc:  # recorded in the table, the benchmark goes on
            cache.put(marker, {"error": error_line(exc), "traceback": traceback.format_exc()})
            log(f"  {marker}: ERROR {error_line(exc)}")
            continue
        if suffix:  # the canary-chosen vectors only, not every checkpoint's
            scored = {k: v for k, v in scored.items() if "@" not in k}
        _put_scored(cache, scored, suffix)
        log(f"  {marker} ({', '.join(names)}): {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------- pair scores from one pass


def pair_pass(
    run_dir: Path, inputs: RunInputs, which: str, tag: str, pairs: np.ndarray, chunk: int = 240
) -> tuple[dict, float, float]:
    """Losses of ``pairs`` under model ``which`` (cached in ``RUN/detectors/pairs-TAG.json``).

    Returns ``({(r, p): loss}, seconds per pair, peak MB)``. Only missing pairs are computed, in
    chunks of ``chunk`` pairs saved one by one, so an interrupted pass resumes where it stopped.
    """
    path = run_dir / "detectors" / f"pairs-{tag}.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    table = {(int(r), int(p)): float(v) for r, p, v in stored.get("pairs", [])}
    seconds, computed = float(stored.get("seconds", 0.0)), int(stored.get("computed", 0))
    if stored.get("seconds_per_pair"):  # files of the first version: one pass, its time per pair
        computed = len(table)
        seconds = float(stored["seconds_per_pair"]) * computed
    peak = float(stored.get("peak_mb") or 0.0)
    missing = [pp for pp in map(tuple, pairs.tolist()) if pp not in table]
    if missing:
        todo = np.unique(np.asarray(missing, dtype=np.int64), axis=0)
        loaded = inputs.model(which)
        enc = inputs.encode_options()
        for first in range(0, len(todo), chunk):
            part = todo[first : first + chunk]
            start = time.perf_counter()
            with PeakMemory() as mem:
                values = pair_losses(
                    loaded.model,
                    loaded.tokenizer,
                    inputs.rows(),
                    part,
                    max_length=enc["max_length"],
                    batch_size=16,
                    response_only=enc["response_only"],
                )
            seconds += time.perf_counter() - start
            computed += len(part)
            table.update(
                {(int(r), int(p)): float(v) for (r, p), v in zip(part.tolist(), values, strict=True)}
            )
            peak = max(peak, mem.peak_rss / 2**20)
            stored = {
                "pairs": [[r, p, v] for (r, p), v in table.items()],
                "seconds": seconds,
                "computed": computed,
                "peak_mb": peak,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored))
            tmp.replace(path)
    return table, seconds / max(computed, 1), peak


def response_words(rows: list[dict]) -> np.ndarray:
    """Bag-of-words counts of each row's response ``(n, vocabulary)``: a model-free similarity.

    Competitors nearest by *response* are the rows whose instructions could have produced this
    response: for a swapped row, the row it was swapped from (whose response is the same text).
    """
    words = [str(r.get("output", "")).lower().split() for r in rows]
    vocab = {w: k for k, w in enumerate(sorted({w for ws in words for w in ws}))}
    counts = np.zeros((len(rows), max(len(vocab), 1)))
    for i, ws in enumerate(words):
        for w in ws:
            counts[i, vocab[w]] += 1
    return counts


def plans_for(
    n: int, ids: list[str], seed: int, kinds: dict[str, int], embeddings, rows: list[dict]
) -> dict[str, PairPlan]:
    """The pair plans of every variant: ``loss_fwd``, ``pmi``, ``ifd``, ``xprompt_{r,n,y}K``, ``xresponse_*``.

    ``r``: random competitors, ``n``: nearest by prompt embedding, ``y``: nearest by response words.
    """
    i = np.arange(n)
    own = np.stack([i, i], 1)
    plans: dict[str, PairPlan] = {"loss_fwd": PairPlan(own, lambda loss: loss)}
    if kinds.get("empty"):
        plans["pmi"] = pmi_plan(n)
        plans["ifd"] = ifd_plan(n)
    comps = {}
    if kinds.get("random"):
        # one draw of ``draw`` competitors per row; smaller k (and other checkpoints) use its prefix
        drawn = competitor_index(ids, kinds["draw"], competitors="random", seed=seed)
        comps["r"] = drawn[:, : kinds["random"]]
    if kinds.get("nearest"):
        comps["n"] = competitor_index(ids, kinds["nearest"], competitors="nearest", embeddings=embeddings)
    if kinds.get("resp"):
        comps["y"] = competitor_index(
            ids, kinds["resp"], competitors="nearest", embeddings=response_words(rows)
        )
    if kinds.get("resp"):
        # exactly what `--method xprompt` computes (the library's hashed response words, k=3, min):
        # the label-free row, from the same cached pair losses
        shipped = competitor_index(ids, 3, competitors="response", embeddings=library_response_words(rows))
        plans["xprompt_default"] = xprompt_plan(shipped, aggregate="min")
    for short, comp in comps.items():
        for k in (3, 5, 8):
            if k <= comp.shape[1]:
                plans[f"xprompt_{short}{k}"] = xprompt_plan(comp[:, :k])
        k3 = min(3, comp.shape[1])
        plans[f"xprompt_{short}{k3}_ratio"] = PairPlan(
            xprompt_plan(comp[:, :k3]).pairs,
            lambda loss, k=k3: loss[:n] / np.maximum(loss[n:].reshape(n, k).mean(axis=1), 1e-12),
        )
        for k_min in (3, 5, 8):
            if k_min <= comp.shape[1]:
                plans[f"xprompt_{short}{k_min}_min"] = xprompt_plan(comp[:, :k_min], aggregate="min")
        xk = kinds.get("xresponse", 0)
        if xk and kinds.get("empty") and short == "r":
            plans[f"xresponse_{short}{xk}"] = xresponse_plan(comp[:, :xk])
    return plans


def pair_scores(
    run_dir: Path, cache: RunCache, tag: str, inputs: RunInputs, which: str, kinds: dict, suffix: str, log
) -> None:
    """Every pair variant of ``kinds`` under one model, from one cached pass; stored as ``NAME{suffix}``."""
    rows = inputs.rows()
    ids = [str(r["id"]) for r in rows]
    n = len(rows)
    prefix = "base_" if which == "base" else ""
    embeddings = None
    if kinds.get("nearest"):
        emb_path = run_dir / "detectors" / f"embeddings-{tag}.npy"
        if emb_path.is_file():
            embeddings = np.load(emb_path)
        else:
            loaded = inputs.model(which)
            enc = inputs.encode_options()
            embeddings = prompt_embeddings(
                loaded.model, loaded.tokenizer, rows, max_length=enc["max_length"], batch_size=16
            )
            emb_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(emb_path, np.asarray(embeddings))
    plans = plans_for(n, ids, inputs.seed, kinds, embeddings, rows)
    names = {name: f"{prefix}{name}{suffix}" for name in plans}
    plans = {name: plan for name, plan in plans.items() if not cache.has(names[name])}
    if not plans:
        return
    start = time.perf_counter()
    everything = np.concatenate([p.pairs for p in plans.values()])
    table, per_pair, peak = pair_pass(run_dir, inputs, which, tag, everything)
    for name, plan in plans.items():
        losses = np.asarray([table[(int(r), int(p))] for r, p in plan.pairs.tolist()])
        unique = len(np.unique(plan.pairs, axis=0))
        cache.put(
            names[name],
            {
                "ids": ids,
                "values": np.asarray(plan.combine(losses), dtype=float).tolist(),
                "seconds": round(unique * per_pair, 2),
                "peak_mb": round(peak, 1),
                "pairs": unique,
            },
        )
    log(f"  pairs {tag} ({which}): {len(plans)} variants, {time.perf_counter() - start:.0f} s")


def all_pair_scores(run_dir: Path, cache: RunCache, profile: Profile, log) -> None:
    """Pair variants at the best checkpoint, cheap ones at the others, and under the base model."""
    run = open_run(run_dir)
    best = run.checkpoint("best")
    best_kinds = {
        "draw": RANDOM_DRAW,
        "empty": profile.empty,
        "random": profile.random_k,
        "nearest": profile.nearest_k,
        "xresponse": profile.xresponse_k,
        "resp": profile.resp_k,
    }
    pair_scores(run_dir, cache, best.tag, RunInputs(run, best, run.val), "checkpoint", best_kinds, "", log)
    for ckpt in run.checkpoints:
        kinds = {"random": profile.other_k, "draw": RANDOM_DRAW}
        if ckpt.path == best.path:
            kinds = best_kinds
        pair_scores(
            run_dir, cache, ckpt.tag, RunInputs(run, ckpt, run.val), "checkpoint", kinds, f"@{ckpt.tag}", log
        )
    if profile.base_k:
        pair_scores(
            run_dir,
            cache,
            "base",
            RunInputs(run, best, run.val),
            "base",
            {"random": profile.base_k, "draw": RANDOM_DRAW},
            "",
            log,
        )


# ---------------------------------------------------------------- fusions (label-free, fixed in advance)


def percentile(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1] (ties share their mean rank)."""
    return pd.Series(values).rank(method="average").to_numpy() / len(values)


FUSIONS = {
    "fuse_xprompt_xresponse": ("xprompt_r3", "xresponse_r3"),
    "fuse_xprompt_r3_n3": ("xprompt_r3", "xprompt_n3"),
    "fuse_xprompt_loss": ("xprompt_r3", "loss_fwd"),
    "fuse_xprompt_epochs": ("xprompt_r3", "xprompt_r3@epoch-1"),
    "fuse_xprompt_y3_n3": ("xprompt_y3", "xprompt_n3"),
    "fuse_xprompt_y3_r3": ("xprompt_y3", "xprompt_r3"),
}


def add_fusions(cache: RunCache) -> None:
    """Mean percentile rank of each pair in :data:`FUSIONS` whose members are cached."""
    for name, members in FUSIONS.items():
        entries = [cache.data.get(m) for m in members]
        if any(e is None or "values" not in e for e in entries):
            continue
        order = entries[0]["ids"]
        stacked = []
        for e in entries:
            pos = {i: k for k, i in enumerate(e["ids"])}
            stacked.append(percentile(np.asarray(e["values"])[[pos[i] for i in order]]))
        cache.put(
            name,
            {
                "ids": order,
                "values": np.mean(stacked, axis=0).tolist(),
                "seconds": sum(e.get("seconds") or 0 for e in entries),
                "peak_mb": max(e.get("peak_mb") or 0 for e in entries),
            },
        )


# ---------------------------------------------------------------- metrics and tables


def run_metrics(run_dir: Path, cache: RunCache) -> dict[str, dict[str, Any]]:
    """AUROC, AP (all noise vs clean) and per-family AUROC of every cached variant of one run."""
    manifest = read_manifest(run_dir / "data" / "manifest.jsonl").set_index("id")
    canaries = set(open_run(run_dir).canary_ids)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in cache.data.items():
        if "values" not in entry:
            out[name] = {"error": entry.get("error")}
            continue
        all_values = np.asarray(entry["values"], dtype=float)
        is_canary = np.array([i in canaries for i in entry["ids"]], dtype=bool)
        canary_auroc = entry.get("canary_auroc")
        if is_canary.any() and np.isfinite(all_values).all():  # benchmark variants score canaries too
            canary_auroc = auroc(all_values, is_canary)
        ids = [i for i in entry["ids"] if i not in canaries]
        values = all_values[~is_canary]
        truth = manifest.loc[ids, "is_noisy"].to_numpy(dtype=bool)
        family = manifest.loc[ids, "family"].to_numpy()
        if not np.isfinite(values).all():
            out[name] = {"error": "non-finite scores"}
            continue
        per_family = {}
        for fam in sorted({f for f, t in zip(family, truth, strict=True) if t and f}):
            keep = ~truth | (family == fam)
            per_family[fam] = auroc(values[keep], (family == fam)[keep])
        out[name] = {
            "auroc": auroc(values, truth),
            "ap": average_precision(values, truth),
            "families": per_family,
            "seconds": entry.get("seconds"),
            "peak_mb": entry.get("peak_mb"),
            "canary_auroc": canary_auroc,
            "fusion": entry.get("fusion"),
            "checkpoint_tag": entry.get("checkpoint_tag"),
        }
    return out


def baseline_name(metrics: dict[str, dict]) -> str:
    """The training loss the gaps are measured to: the registry ``loss`` when scored, else ``loss_fwd``."""
    return "loss" if metrics.get("loss", {}).get("auroc") is not None else "loss_fwd"


def repeats_best(name: str, per_seed: dict[int, dict[str, dict]]) -> bool:
    """Whether ``NAME@epoch-N`` has the plain (best-checkpoint) name's numbers in every seed."""
    if "@" not in name:
        return False
    plain = name.split("@")[0]
    return all(
        plain in m
        and name in m
        and m[plain].get("auroc") == m[name].get("auroc")
        and m[name].get("ap") == m[plain].get("ap")
        for m in per_seed.values()
    )


def setting_table(setting: Setting, per_seed: dict[int, dict[str, dict]]) -> str:
    """Markdown: one row per variant, mean AUROC/AP over seeds, min gap to the loss, cost."""
    seeds = sorted(per_seed)
    names = sorted({n for m in per_seed.values() for n in m if not repeats_best(n, per_seed)})
    rows = []
    for name in names:
        cells = [per_seed[s].get(name) for s in seeds]
        errors = [c["error"] for c in cells if c and c.get("error")]
        good = [c for c in cells if c and c.get("auroc") is not None]
        if errors and not good:
            rows.append((-1.0, f"| {name} | {len(errors)} | error: {errors[0]} | | | | |"))
            continue
        have = [s for s in seeds if per_seed[s].get(name, {}).get("auroc") is not None]
        au = np.array([c["auroc"] for c in good])
        ap = np.array([c["ap"] for c in good])
        gaps = [
            per_seed[s][name]["auroc"] - per_seed[s][baseline_name(per_seed[s])]["auroc"]
            for s in have
            if per_seed[s].get(baseline_name(per_seed[s]), {}).get("auroc") is not None
        ] or [float("nan")]  # no loss in this run (an error row): no gap
        sec = np.mean([c["seconds"] or 0 for c in good])
        mb = max(c["peak_mb"] or 0 for c in good)
        spread = f" ± {au.std(ddof=1):.3f}" if len(au) > 1 else ""
        rows.append(
            (
                au.mean(),
                f"| {name} | {len(have)} | {au.mean():.3f}{spread} | {ap.mean():.3f} | {min(gaps):+.3f} | "
                f"{sec:.1f} | {mb:.0f} |",
            )
        )
    rows.sort(key=lambda r: -r[0])
    base = baseline_name(per_seed[seeds[0]])
    goal = setting.goal
    goal_text = (
        f"goal: AUROC >= {goal[0]}" + (f", AP >= {goal[1]}" if goal[1] else "") + ", gap >= +0.08 every seed"
        if goal[0]
        else "no goal (mixed noise; per-family AUROC in the JSON)"
    )
    head = [
        f"### {setting.name}: {setting.note}",
        "",
        f"Seeds {', '.join(map(str, seeds))} (a row scored on fewer seeds says how many); gap = AUROC minus `{base}` (best checkpoint) in the same seed, "
        f"smallest over seeds. {goal_text}.",
        "",
        "| method | seeds | AUROC (mean ± sd) | AP | min gap to loss | seconds | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [r[1] for r in rows]) + canary_table(per_seed)


def canary_table(per_seed: dict[int, dict[str, dict]]) -> str:
    """Per seed: what the canaries chose (fusion), how it did on the real noise, and the hit rate.

    A *hit*: the pool method with the best canary AUROC is also the pool's best on the real noise
    (within 0.005 AUROC). Regret: the best pool method's real AUROC minus the fusion's.
    """
    lines = [
        "| seed | fusion chose | canary AUROC (LOO) | real AUROC | real AP | canaries' single pick | "
        "best pool method (real) | hit | regret | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    hits, fused = [], []
    for seed in sorted(per_seed):
        m = per_seed[seed]
        f = m.get("fusion", {})
        choice = f.get("fusion")
        if not choice or f.get("auroc") is None:
            continue
        pool = {n: m[n] for n in FUSION_POOL if m.get(n, {}).get("auroc") is not None}
        pick = max(pool, key=lambda n: (pool[n].get("canary_auroc") or -1, -list(pool).index(n)))
        best = max(pool, key=lambda n: pool[n]["auroc"])
        hit = pool[best]["auroc"] - pool[pick]["auroc"] <= 0.005
        hits.append(hit)
        fused.append(f["auroc"])
        chose = " + ".join(f"{w:.2f} {n}" for n, w in zip(choice["members"], choice["weights"], strict=True))
        loo = choice.get("loo_auroc")
        lines.append(
            f"| {seed} | {chose} | {choice['canary_auroc']:.3f} ({loo:.3f}) | {f['auroc']:.3f} | {f['ap']:.3f} | "
            f"{pick} ({pool[pick]['auroc']:.3f}) | {best} ({pool[best]['auroc']:.3f}) | {'yes' if hit else 'no'} | "
            f"{pool[best]['auroc'] - f['auroc']:+.3f} | {m[baseline_name(m)]['auroc']:.3f} |"
        )
    if not hits:
        return ""
    spread = f" ± {np.std(fused, ddof=1):.3f}" if len(fused) > 1 else ""
    return "\n".join(
        [
            "",
            f"Canaries' choice (the registry's `fusion`, label-free): real AUROC {np.mean(fused):.3f}{spread}; "
            f"the canaries' single pick is the pool's best on the real noise in {sum(hits)} of {len(hits)} seeds.",
            "",
            *lines,
        ]
    )


# ---------------------------------------------------------------- main


def run_one(setting: Setting, seed: int, log, model: str = "smollm2-135m") -> Path:
    run_dir = ROOT / setting.name / f"seed-{seed}"
    cfg = pipeline_config(setting, seed, model)
    start = time.perf_counter()
    result = run_pipeline(cfg, run_dir)
    stages = result.stages
    log(
        f"{setting.name} seed {seed}: pipeline {time.perf_counter() - start:.0f} s "
        f"(finetune {stages.get('finetune', {}).get('seconds')} s)"
    )
    profile = PROFILES[setting.profile]
    cache = RunCache(run_dir)
    task = open_run(run_dir).spec.task
    registry_scores(run_dir, cache, profile, task, log)
    canary_scores(run_dir, cache, profile, task, log)
    if task == "instruction":
        try:
            all_pair_scores(run_dir, cache, profile, log)
        except Exception as exc:
            cache.put("pair_scores", {"error": error_line(exc), "traceback": traceback.format_exc()})
            log(f"  pair scores: ERROR {error_line(exc)}")
    add_fusions(cache)
    return run_dir


def collect(settings: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """Metrics of every finished run on disk (any seed), by setting and seed."""
    out: dict[str, dict[int, dict]] = {}
    for name in settings:
        for seed in seeds:
            run_dir = ROOT / name / f"seed-{seed}"
            cache = RunCache(run_dir)
            if cache.data:
                add_fusions(cache)
                out.setdefault(name, {})[seed] = run_metrics(run_dir, cache)
    return out


def previous_results() -> tuple[dict[str, dict[int, dict]], dict[str, Any]]:
    """Metrics and stages of the last written ``detectors.json`` (empty when there is none)."""
    path = RESULTS / "detectors.json"
    if not path.is_file():
        return {}, {}
    old = json.loads(path.read_text())
    metrics = {
        name: {int(seed): m for seed, m in per_seed.items()}
        for name, per_seed in old.get("metrics", {}).items()
        if name in SETTINGS
    }
    return metrics, dict(old.get("stages", {}))


def write_results(metrics: dict[str, dict[int, dict]], stages: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "detectors.json").write_text(
        json.dumps({"metrics": metrics, "stages": stages}, indent=1, default=float)
    )
    parts = [
        "# Detectors on label-changing noise (benchmarks/detectors.py)",
        "",
        "SmolLM2-135M, LoRA r=8 on q/v of the top 10 layers (MiniLM + LoRA for label flips), 120 training "
        "rows (10 classes x 12), 20 % noise, batch 8, lr 2e-3 linear, 2 epochs unless the setting says "
        "otherwise. Analysis and the recommended default: `detectors_analysis.md`. `NAME@epoch-N`: "
        "scored at that checkpoint; plain names: the best (lowest validation loss) checkpoint. "
        "`base_*`: base model. `xprompt_rK`/`_nK`: K random/nearest competitor instructions; "
        "`_min`: own loss minus the best competitor's; `fuse_*`: mean percentile rank of two scores; "
        "`loss_fwd`: the training loss from a forward pass (same value as `loss`, used where no gradients "
        "were taken). `@epoch-N` rows equal to the plain row in every seed are left out. "
        "Only a method fixed in advance may back a claim for users; every other row is an oracle choice.",
        "",
    ]
    for name in metrics:
        parts += [setting_table(SETTINGS[name], metrics[name]), ""]
    (RESULTS / "detectors.md").write_text("\n".join(parts))


def main() -> None:
    global ROOT, RESULTS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="demo_swap,sections_flip")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tables-only", action="store_true", help="only rebuild tables from cached runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m", help="tiny-llama for a plumbing check")
    parser.add_argument("--root", default=str(ROOT), help="where the run directories go")
    parser.add_argument("--results", default=str(RESULTS), help="where the tables go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ROOT, RESULTS = Path(args.root), Path(args.results)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {message}", flush=True)

    if not args.tables_only:
        for name in settings:
            for seed in seeds:
                run_one(SETTINGS[name], seed, log, args.model)
    every = [s for s in SETTINGS if (ROOT / s).is_dir()]
    fresh = collect(every, list(range(10)))
    metrics, stages = previous_results()  # runs made on another machine keep their rows
    for name, per_seed in fresh.items():
        metrics.setdefault(name, {}).update(per_seed)
        for k in per_seed:
            run_json = ROOT / name / f"seed-{k}" / "run.json"
            stages[f"{name}/seed-{k}"] = json.loads(run_json.read_text()).get("stages", {})
    ordered = {name: dict(sorted(metrics[name].items())) for name in SETTINGS if name in metrics}
    write_results(ordered, stages)
    log(f"tables for {', '.join(metrics)} in {RESULTS / 'detectors.md'}")


if __name__ == "__main__":
    main()
