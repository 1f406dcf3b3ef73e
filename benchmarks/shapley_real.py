"""Label-flip detection by Shapley-family values on scikit-learn's bundled real tables.

For each dataset (breast cancer, digits, wine), flip rate (10 %, 20 %) and seed (3): standardise the
features (digits: then its first 16 principal components, fitted on the training rows, so that the
proxy logistic regressions stay fast), split off a clean validation set, flip the label of
``rate * n_train`` training rows to a different random class, then score every training row with

- ``loss_oos``: raw-loss baseline, the 5-fold out-of-sample log loss of a logistic regression,
- ``loss_in``: raw-loss baseline, the in-sample log loss of one logistic regression on all rows,
- ``knn_shapley`` (k=10), ``data_oob`` (100 bags), ``tmc_shapley``, ``beta_shapley`` (16, 1) and
  ``banzhaf`` (MSR) with the proxy :class:`LogisticUtility` (validation accuracy).

Values are turned into suspicion with :func:`as_harm` (lowest value = most suspicious). Metrics: AUROC
of the suspicion against the flipped rows, and F1 when the ``k = number of flipped rows`` most
suspicious rows are flagged (precision = recall = F1 at that cut-off; ties shared by expectation).
Each cell is the mean over seeds with a 95 % t-interval. The sampled methods also report the MTM
check (held-out R^2) of their own recorded subsets. Writes ``benchmarks/results/shapley_real.md``.

    OMP_NUM_THREADS=1 python3 benchmarks/shapley_real.py [--seeds 3] [--n-jobs 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from infscope.estimators.shapley import (
    LogisticUtility,
    as_harm,
    banzhaf,
    beta_shapley,
    data_oob,
    knn_shapley,
    mtm_check,
    tmc_shapley,
)
from infscope.evaluate.metrics import auroc, top_k_hits_rows
from infscope.evaluate.stats import t_critical

DATASETS: dict[str, tuple[Callable, int, int]] = {  # loader, training rows, validation rows
    "breast_cancer": (load_breast_cancer, 100, 200),
    "digits": (load_digits, 100, 300),
    "wine": (load_wine, 100, 78),
}
RATES = (0.1, 0.2)
METHODS = ("loss_oos", "loss_in", "knn_shapley", "data_oob", "tmc_shapley", "beta_shapley", "banzhaf")
SAMPLED = ("tmc_shapley", "beta_shapley", "banzhaf")
# OpenDataVal reports no number for these three tables (see NOTE); its own example notebooks give
# numbers for other tabular sets at 20 % label noise, quoted in ODV_ROWS with their exact source.
OPENDATAVAL = "none for this table (see below)"


def prepare(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardised (and for digits PCA-16) train/validation split of one bundled dataset."""
    loader, n_train, n_val = DATASETS[name]
    x, y = loader(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    train, val = order[:n_train], order[n_train : n_train + n_val]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-9
    x = (x - mean) / std
    if name == "digits":
        _, _, vt = np.linalg.svd(x[train], full_matrices=False)
        x = x @ vt[:16].T
    return x[train], y[train], x[val], y[val]


def flip(y: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ``rate * n`` rows moved to a different random class, and the flipped-row mask."""
    rng = np.random.default_rng(seed + 1000)
    classes = np.unique(y)
    rows = rng.choice(len(y), size=round(rate * len(y)), replace=False)
    noisy = y.copy()
    shift = rng.integers(1, len(classes), size=len(rows))
    position = np.searchsorted(classes, y[rows])
    noisy[rows] = classes[(position + shift) % len(classes)]
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rows] = True
    return noisy, flipped


def row_log_loss(proba: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per-row negative log probability of the (possibly flipped) label."""
    column = np.searchsorted(classes, labels)
    return -np.log(np.maximum(proba[np.arange(len(labels)), column], 1e-12))


def score_all(x, y, vx, vy, seed: int, n_jobs: int) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Suspicion scores (higher = more suspicious) of every method, seconds, and MTM checks."""
    scores, seconds, mtm = {}, {}, {}
    classes = np.unique(y)

    def timed(name: str, fn: Callable[[], np.ndarray]) -> None:
        start = time.perf_counter()
        scores[name] = fn()
        seconds[name] = time.perf_counter() - start

    model = LogisticRegression(max_iter=1000)
    timed(
        "loss_oos",
        lambda: row_log_loss(cross_val_predict(model, x, y, cv=5, method="predict_proba"), y, classes),
    )
    timed(
        "loss_in",
        lambda: row_log_loss(LogisticRegression(max_iter=1000).fit(x, y).predict_proba(x), y, classes),
    )
    timed("knn_shapley", lambda: as_harm(knn_shapley(x, y, vx, vy, k=10)))
    timed("data_oob", lambda: as_harm(data_oob(x, y, n_estimators=100, seed=seed)))
    utility = LogisticUtility(x, y, vx, vy, metric="accuracy")
    common = {"seed": seed, "n_jobs": n_jobs, "record": 300}
    runs = {
        "tmc_shapley": lambda: tmc_shapley(
            utility, max_permutations=60, min_permutations=20, check_every=5, **common
        ),
        "beta_shapley": lambda: beta_shapley(
            utility, max_permutations=60, min_permutations=20, check_every=5, **common
        ),
        "banzhaf": lambda: banzhaf(utility, max_samples=1000, min_samples=400, check_every=100, **common),
    }
    for name, run in runs.items():
        start = time.perf_counter()
        result = run()
        seconds[name] = time.perf_counter() - start
        scores[name] = as_harm(result.values)
        mtm[name] = mtm_check(result.values, result.subsets, result.utilities).r2_heldout
    return scores, seconds, mtm


def detection(score: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    """AUROC and F1 at k = number of flipped rows."""
    k = int(flipped.sum())
    hits = float(top_k_hits_rows(score[None, :], flipped[None, :], np.array([k]))[0])
    return float(auroc(score, flipped)), hits / k


def interval(values: list[float]) -> str:
    """``mean +- half-width`` of a 95 % t-interval (just the mean for one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.3f}"
    half = t_critical(0.95, len(values)) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return f"{mean:.3f} ± {half:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shapley_real.md")
    args = parser.parse_args()
    began = time.perf_counter()
    results: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name in args.datasets:
        for rate in RATES:
            for seed in range(args.seeds):
                x, y, vx, vy = prepare(name, seed)
                noisy, flipped = flip(y, rate, seed)
                scores, seconds, mtm = score_all(x, noisy, vx, vy, seed, args.n_jobs)
                for method in METHODS:
                    au, f1 = detection(scores[method], flipped)
                    cell = results[(name, rate, method)]
                    cell["auroc"].append(au)
                    cell["f1"].append(f1)
                    cell["seconds"].append(seconds[method])
                    if method in mtm:
                        cell["mtm"].append(mtm[method])
                print(
                    f"{name} rate={rate} seed={seed} done at {time.perf_counter() - began:.0f} s", flush=True
                )
    write_table(args, results, time.perf_counter() - began)


def write_table(args: argparse.Namespace, results: dict, total: float) -> None:
    lines = [
        "# Label-flip detection by Shapley-family values (scikit-learn bundled real tables)",
        "",
        "Written by `benchmarks/shapley_real.py`. Lower value = more suspicious (`as_harm`); raw-loss",
        "baselines rank by loss. AUROC over all training rows; F1 when the k lowest-value rows are",
        "flagged, k = number of flipped rows (so F1 = precision = recall; random flagging gives F1 = rate).",
        f"Mean ± 95 % t-interval over {args.seeds} seeds (seed also changes the train/validation split).",
        "Training / validation rows: breast_cancer 100 / 200, digits 100 / 300 (16 PCA components),",
        "wine 100 / 78. Proxy utility: one-vs-rest logistic regression, validation accuracy.",
        "TMC and Beta(16,1): truncation 0.01, Gelman-Rubin stop (R-hat < 1.05), 20-60 permutations over",
        "4 chains; Banzhaf MSR: 400-1000 subsets. `MTM R²` is the held-out R² of `mtm_check` on each",
        "method's own recorded subsets (1 = utility is a monotone function of summed values).",
        f"Total wall time {total:.0f} s on a shared 2-core machine, n_jobs={args.n_jobs}.",
        "",
    ]
    header = "| dataset | flip rate | method | AUROC | F1@k | MTM R² (held-out) | seconds/run | OpenDataVal (reported) |"
    lines += [header, "|" + "---|" * 8]
    for name in args.datasets:
        for rate in RATES:
            for method in METHODS:
                cell = results[(name, rate, method)]
                mtm = interval(cell["mtm"]) if cell.get("mtm") else "-"
                lines.append(
                    f"| {name} | {rate:.0%} | {method} | {interval(cell['auroc'])} | {interval(cell['f1'])} | "
                    f"{mtm} | {np.mean(cell['seconds']):.2f} | {OPENDATAVAL} |"
                )
    lines += ["", *summary(args.datasets, results), "", *opendataval_section()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print("\n".join(lines))


def summary(datasets: list[str], results: dict) -> list[str]:
    """Which method leads each setting by mean F1 and mean AUROC, computed from the table above."""
    lines = ["## Leaders per setting (means over seeds; overlapping intervals mean no clear winner)", ""]
    for name in datasets:
        for rate in RATES:
            best = {
                metric: max(METHODS, key=lambda m, metric=metric: np.mean(results[(name, rate, m)][metric]))
                for metric in ("f1", "auroc")
            }
            lines.append(f"- {name} {rate:.0%}: best F1 `{best['f1']}`, best AUROC `{best['auroc']}`")
    return lines


ODV_COMMIT = "09cddc6c7dbbaa07184a10715ef072a5362acebc"
ODV_URL = "https://github.com/opendataval/opendataval/blob/" + ODV_COMMIT + "/examples/{}"
#: (dataset, notebook, base model, method as printed there, OpenDataVal's ``kmeans_f1``); read from the
#: saved output of the ``exper_med.evaluate(noisy_detection)`` cell of each notebook at ODV_COMMIT.
ODV_ROWS = [
    (
        "adult",
        "adult_classification.ipynb",
        "sklearn LogisticRegression",
        "KNNShapley(k_neighbors=100)",
        0.577617,
    ),
    (
        "adult",
        "adult_classification.ipynb",
        "sklearn LogisticRegression",
        "DataOob(num_models=1000)",
        0.596050,
    ),
    (
        "adult",
        "adult_classification.ipynb",
        "sklearn LogisticRegression",
        "DataShapley(gr_threshold=1.05, mc_epochs=300)",
        0.478161,
    ),
    (
        "adult",
        "adult_classification.ipynb",
        "sklearn LogisticRegression",
        "BetaShapley(gr_threshold=1.05, mc_epochs=300)",
        0.483871,
    ),
    (
        "adult",
        "adult_classification.ipynb",
        "sklearn LogisticRegression",
        "DataBanzhaf(num_models=1000)",
        0.311321,
    ),
    ("adult", "adult_classification.ipynb", "sklearn LogisticRegression", "RandomEvaluator()", 0.280057),
    (
        "pol",
        "pol_classification.ipynb",
        "sklearn GradientBoostingClassifier",
        "KNNShapley(k_neighbors=100)",
        0.430508,
    ),
    (
        "pol",
        "pol_classification.ipynb",
        "sklearn GradientBoostingClassifier",
        "DataOob(num_models=1000)",
        0.841163,
    ),
    ("pol", "pol_classification.ipynb", "sklearn GradientBoostingClassifier", "RandomEvaluator()", 0.276074),
]


def opendataval_section() -> list[str]:
    """The OpenDataVal numbers that could be read here, with their source and how their setting differs."""
    lines = [
        "## Comparison with OpenDataVal",
        "",
        "OpenDataVal (Jiang et al., NeurIPS 2023 Datasets & Benchmarks, arXiv 2306.10577) benchmarks",
        "KNN-Shapley, Data-OOB, Data (TMC) Shapley, Beta Shapley and Data Banzhaf on noisy-label detection",
        "by F1. **No OpenDataVal number exists here for breast cancer, digits or wine**, hence the column",
        "above. What was searched: the stored web pages (arXiv 2306.10577v1 HTML and ar5iv: only the",
        "abstract and introduction are readable, not the result figures or tables), GitHub issues, code",
        "search, and the repository opendataval/opendataval: README.md, docs/paper.rst and",
        "docs/leaderboards.rst (the leaderboard table is filled in the browser from a remote sheet, so the",
        "repository holds no leaderboard numbers), opendataval/dataloader/datasets/datasets.py (it",
        "registers `breast_cancer` and `digits` but not wine) and the example notebooks. The paper's own",
        "per-dataset F1 values could not be read with these tools and are not quoted.",
        "",
        "The only OpenDataVal-produced F1 values found are the saved outputs of two example notebooks",
        f"of the repository at commit `{ODV_COMMIT}` (one run each, no seeds or intervals):",
        "",
        "| dataset | base model | OpenDataVal method | F1 (OpenDataVal `noisy_detection`) | source |",
        "|---|---|---|---|---|",
    ]
    for dataset, notebook, model, method, f1 in ODV_ROWS:
        lines.append(
            f"| {dataset} | {model} | `{method}` | {f1:.3f} | [examples/{notebook}]({ODV_URL.format(notebook)}) |"
        )
    lines += [
        "",
        "How that setting differs from the table above, so the numbers are context, not a head-to-head:",
        "",
        "- data: adult (UCI income) and pol (OpenML 722), 1,000 training / 100 validation rows (here: 100",
        "  training rows of breast cancer, digits, wine);",
        "- noise: `mix_labels` at 20 % (compare the 20 % rows above);",
        "- metric: OpenDataVal's F1 flags the rows that a 2-means clustering of the values puts in the",
        "  low-value cluster, so the number flagged is chosen by the clustering; here F1@k flags exactly",
        "  k = number of flipped rows. Random values score 0.28 there (the clustering flags about half",
        "  the rows) and about the flip rate (0.2) here;",
        "- methods: KNN-Shapley with k = 100 (here 10), Data-OOB with 1,000 bags (here 100), Data/Beta",
        "  Shapley with Gelman-Rubin 1.05 and up to 300 epochs, Banzhaf with 1,000 models; utility models",
        "  are the notebooks' base models (logistic regression on adult, gradient boosting on pol), here a",
        "  one-vs-rest logistic regression on standardised features;",
        "- the pol notebook ran only KNN-Shapley, Data-OOB and a few non-Shapley methods.",
        "",
        "Qualitatively the F1 values above are mostly higher than these; small, nearly separable tables with a",
        "clean validation set make uniform flips easy to spot, so that is no evidence that these",
        "implementations beat OpenDataVal's.",
    ]
    return lines


if __name__ == "__main__":
    main()
