"""Every scoring method by name, with what it needs; gradient estimator classes by name.

A :class:`Method` is one row of the method table: its name, the inputs it needs (see
:mod:`infscope.estimators.inputs`), and ``compute(inputs, options) -> Scores``. Baselines and
TracIn are methods like any other, so scoring never dispatches on a method's name.
:func:`get_estimator` still builds a gradient estimator class directly (``fit`` / ``score``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infscope.errors import InfscopeError
from infscope.estimators import baselines, dynamics
from infscope.estimators.base import Estimator
from infscope.estimators.cosine import DataInfCosine, GradCosine
from infscope.estimators.datainf import DataInf
from infscope.estimators.exact import Exact
from infscope.estimators.fusion import choose_fusion, fusion_scores
from infscope.estimators.hessian_free import HessianFree
from infscope.estimators.inputs import (
    ALL_CHECKPOINTS,
    CANARIES,
    DYNAMICS,
    LOSSES,
    MODEL,
    OPTIMIZER_STATE,
    QUERY_GRADS,
    TRAIN_GRADS,
    MethodInputs,
)
from infscope.estimators.less import LESS, TrackStar
from infscope.estimators.lissa import LiSSA
from infscope.estimators.method import Compute, Method, check_options
from infscope.estimators.pair import PAIR_SCORES, pair_options
from infscope.estimators.scores import Scores

ESTIMATORS: dict[str, type] = {
    "datainf": DataInf,
    "lissa": LiSSA,
    "exact": Exact,
    "hessian_free": HessianFree,
    "grad_cos": GradCosine,
    "datainf_cos": DataInfCosine,
}
ALIASES = {"hessian-free": "hessian_free", "base-loss": "base_loss", "tracin-cp": "tracin"}


def get_estimator(name: str, **kwargs: Any) -> Estimator:
    """A new gradient estimator by registry name, with keyword options checked against its constructor."""
    key = name.strip().lower().replace("-", "_")
    if key not in ESTIMATORS:
        raise InfscopeError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    cls = ESTIMATORS[key]
    check_options(key, cls, kwargs)
    return cls(**kwargs)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the table (a name registered twice is a programming error)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called ``name`` (aliases such as ``hessian-free`` accepted)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key).replace("-", "_")
    if key not in METHODS:
        raise InfscopeError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (or 'all')")
    return METHODS[key]


def _gradient_method(name: str, summary: str, **defaults: Any) -> Method:
    cls = ESTIMATORS[name]

    def compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
        merged = {**defaults, **options}
        check_options(name, cls.__init__, merged)
        estimator = cls(**merged).fit(inputs.train_grads())
        return estimator.score(inputs.query_grads(), aggregate=inputs.aggregate)

    return Method(name, (TRAIN_GRADS, QUERY_GRADS), compute, summary, per_query=True, options=defaults)


def _loss_column(column: str) -> Compute:
    def compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
        check_options(column, lambda: None, options)
        frame = inputs.losses().set_index("id").loc[inputs.train_ids]
        return baselines.from_values(frame[column].to_numpy(), inputs.train_ids, column)

    return compute


def _grad_norm(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    check_options("grad_norm", lambda: None, options)
    return baselines.grad_norm_scores(inputs.train_grads())


def _random(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    check_options("random", lambda seed=None: None, options)
    return baselines.random_scores(inputs.train_ids, seed=int(options.get("seed", inputs.seed)))


def _tracin(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    """TracIn-CP: ``sum_c lr_c (-v_c . g_{z,c})`` over every saved checkpoint."""
    check_options("tracin", lambda: None, options)
    ckpts = inputs.checkpoints()
    pairs = [(c.train, c.lr) for c in ckpts]
    scores = HessianFree().fit(pairs).score([c.query for c in ckpts], aggregate=inputs.aggregate)
    scores.method = "tracin"
    scores.meta.update(checkpoints=[c.path for c in ckpts], checkpoint_weights=[c.lr for c in ckpts])
    return scores


def _optimizer_aware(name: str, cls: type) -> Compute:
    """LESS / TrackStar: every checkpoint's gradients with its Adam moments, lr-weighted cosines."""

    def compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
        check_options(name, cls.__init__, options)
        ckpts = inputs.checkpoints()
        fitted = cls(**{"seed": inputs.seed, **options}).fit(
            [(c.train, c.query, inputs.block_moments(c), c.lr) for c in ckpts]
        )
        scores = fitted.score(aggregate=inputs.aggregate)
        scores.meta.update(checkpoints=[c.path for c in ckpts], checkpoint_weights=[c.lr for c in ckpts])
        return scores

    return compute


def _dynamics(name: str, fn: Callable[..., Any]) -> Compute:
    def compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
        check_options(name, fn, {k: v for k, v in options.items()})
        values = fn(inputs.dynamics(), inputs.train_ids, **options)
        return baselines.from_values(values, inputs.train_ids, name, {"family": "dynamics"})

    return compute


def _pair(name: str, score: str, which: str, defaults: dict[str, Any] | None = None) -> Compute:
    """A pair-consistency score (:mod:`infscope.estimators.pair`) of the tuned (or base) model."""

    def compute(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
        options = {**(defaults or {}), **options}
        allowed = [o for o in pair_options(score) if o not in ("embeddings", "label_names")]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise InfscopeError(
                f"method {name!r} has no option {unknown[0]!r}; its options are {', '.join(allowed)}"
            )
        loaded = inputs.model(which)
        encode = inputs.encode_options()
        kwargs: dict[str, Any] = {
            "max_length": encode["max_length"],
            "batch_size": encode["batch_size"],
            "response_only": encode["response_only"],
            **options,
        }
        if score == "label_margin":
            kwargs["label_names"] = encode["label_names"]
        elif "seed" in pair_options(score):
            kwargs.setdefault("seed", inputs.seed)
        if kwargs.get("competitors") == "response":
            from infscope.estimators.pair import response_words

            kwargs["embeddings"] = response_words(inputs.rows())
        elif kwargs.get("competitors") == "nearest":
            from infscope.models.pair_losses import prompt_embeddings

            kwargs["embeddings"] = prompt_embeddings(
                loaded.model,
                loaded.tokenizer,
                inputs.rows(),
                max_length=encode["max_length"],
                batch_size=encode["batch_size"],
            )
        values = PAIR_SCORES[score](loaded.model, loaded.tokenizer, inputs.rows(), **kwargs)
        meta = {"family": "pair", "model": which, **{k: v for k, v in kwargs.items() if k != "embeddings"}}
        return baselines.from_values(values, inputs.train_ids, name, meta)

    return compute


def _pair_method(name: str, score: str, which: str, summary: str, **defaults: Any) -> Method:
    task = "classification" if score == "label_margin" else "instruction"
    compute = _pair(name, score, which, defaults)
    return Method(name, (MODEL,), compute, summary, family="pair", tasks=(task,), options=defaults)


#: Methods the ``fusion`` detector chooses among by default (those the run can feed): cheap, and
#: each strong somewhere (pair scores on swapped pairs, dynamics and margins on label flips).
FUSION_POOL = (
    "loss",
    "base_loss",
    "xprompt",
    "xresponse",
    "pmi",
    "ifd",
    "grad_cos",
    "datainf",
    "hessian_free",
    "cartography",
    "el2n",
    "label_margin",
    "aum",
    "text_oof",
    "answer_loss",
)


def _fusion(inputs: MethodInputs, options: dict[str, Any]) -> Scores:
    """Rank fusion (or the single method) that ranks the canaries highest; see :mod:`infscope.estimators.fusion`."""
    check_options("fusion", lambda members=None, max_members=3, top=6, grid=0.25: None, options)
    pool = options.get("members") or FUSION_POOL
    pool = pool.split(",") if isinstance(pool, str) else list(pool)
    members = [
        get_method(m).name
        for m in pool
        if inputs.task in get_method(m).tasks and all(inputs.available(n) for n in get_method(m).needs)
    ]
    if not members:
        raise InfscopeError("fusion has no method to choose from on this run; pass --method with others")
    scores = inputs.scores_of(members)
    ids = inputs.train_ids
    mask = [i in set(inputs.canary_ids) for i in ids]
    choice = choose_fusion(
        {m: scores[m].vector() for m in members},
        mask,
        **{k: v for k, v in options.items() if k in ("max_members", "top", "grid")},
    )
    fused = fusion_scores(choice, scores)
    fused.meta.update(family="fusion", pool=members)
    return fused


for _method in (
    _gradient_method(
        "datainf", "DataInf: closed-form inverse of each block's damped Fisher (Kwon et al. 2024)"
    ),
    _gradient_method("lissa", "LiSSA: iterative inverse-Hessian-vector product per block"),
    _gradient_method("exact", "exact damped inverse per block (Woodbury + Cholesky)"),
    _gradient_method("hessian_free", "raw gradient dot product with the query gradient (H = I)"),
    Method(
        "tracin",
        (ALL_CHECKPOINTS,),
        _tracin,
        "TracIn-CP: dot products summed over every checkpoint, lr-weighted",
        per_query=True,
    ),
    Method(
        "loss", (LOSSES,), _loss_column("loss"), "training loss at the scored checkpoint", family="baseline"
    ),
    Method("base_loss", (LOSSES,), _loss_column("base_loss"), "loss under the base model", family="baseline"),
    Method("grad_norm", (TRAIN_GRADS,), _grad_norm, "norm of the per-example gradient", family="baseline"),
    Method("random", (), _random, "seeded random scores: the floor", family="baseline"),
    _gradient_method(
        "grad_cos", "cosine of each row's gradient with the mean query gradient (unit-normalised)"
    ),
    _gradient_method("datainf_cos", "cosine with DataInf's preconditioned query direction"),
    Method(
        "less",
        (ALL_CHECKPOINTS, OPTIMIZER_STATE),
        _optimizer_aware("less", LESS),
        "LESS: Adam-preconditioned, projected, cosine, lr-weighted over checkpoints (Xia et al. 2024)",
    ),
    Method(
        "trackstar",
        (ALL_CHECKPOINTS, OPTIMIZER_STATE),
        _optimizer_aware("trackstar", TrackStar),
        "TrackStar: second-moment-corrected, projected, cosine over checkpoints (Chang et al. 2024)",
    ),
    _pair_method("pmi", "pmi", "checkpoint", "L(y|x) - L(y|no instruction) at the tuned model"),
    _pair_method("ifd", "ifd", "checkpoint", "L(y|x) / L(y|no instruction) at the tuned model (IFD)"),
    _pair_method("base_pmi", "pmi", "base", "pmi under the base model"),
    _pair_method("base_ifd", "ifd", "base", "ifd under the base model"),
    # competitors: the rows whose responses read most like this one; aggregate: the best (lowest)
    # competitor loss. Both chosen on seeds 0-2 of benchmarks/detectors.py (response swaps): the
    # response-similar rows beat random and prompt-embedding neighbours, and ``min`` was at or above
    # ``mean`` for every competitor kind; seeds 3-5 are the held-out check (detectors_analysis.md).
    _pair_method(
        "xprompt",
        "xprompt",
        "checkpoint",
        "own-instruction loss minus the lowest loss under the instructions of the K=3 rows with the most similar responses",
        k=3,
        competitors="response",
        aggregate="min",
    ),
    _pair_method(
        "xresponse", "xresponse", "checkpoint", "does this instruction fit other rows' responses as well"
    ),
    _pair_method(
        "label_margin", "label_margin", "checkpoint", "best other label's logit minus the given label's"
    ),
    Method(
        "fusion",
        (CANARIES,),
        _fusion,
        "the method or rank fusion that ranks the run's canaries highest (no labels needed)",
        family="fusion",
    ),
    Method(
        "cartography",
        (DYNAMICS,),
        _dynamics("cartography", dynamics.cartography),
        "minus the mean p(gold) over epochs (dataset cartography)",
        family="dynamics",
    ),
    Method(
        "aum",
        (DYNAMICS,),
        _dynamics("aum", dynamics.aum),
        "minus the area under the margin (classification)",
        family="dynamics",
        tasks=("classification",),
    ),
    Method(
        "forgetting",
        (DYNAMICS,),
        _dynamics("forgetting", dynamics.forgetting),
        "forgetting events over epochs (classification)",
        family="dynamics",
        tasks=("classification",),
    ),
    Method(
        "el2n",
        (DYNAMICS,),
        _dynamics("el2n", dynamics.el2n),
        "mean error L2 norm over early epochs",
        family="dynamics",
    ),
):
    register(_method)


def _discover() -> None:
    """Register the ``REGISTER`` list of :class:`Method` rows of every other module in this package.

    A new method lives in its own module (``estimators/<name>.py``) with ``REGISTER = [Method(...)]``;
    nothing else changes. Modules are visited in name order, after the table above.
    """
    import importlib
    import pkgutil

    import infscope.estimators as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name == "registry":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for method in getattr(module, "REGISTER", ()):
            register(method)


_discover()
