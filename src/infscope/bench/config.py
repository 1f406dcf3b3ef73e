"""Benchmark specs: parse and validate a YAML spec, then expand its grids into pipeline runs.

A spec crosses datasets x noise settings x models x seeds (all runs scored by the same list of
methods) and names every run's directory ``<dataset>/<noise>/<model>/seed-<s>`` from short labels,
so a benchmark directory is readable and a rerun finds its finished runs again::

    name: quick
    description: what it measures
    axes:                         # one grid; or `grids: [{...}, ...]` with `axes` as shared defaults
      datasets: [{name: sentence_transform, classes: 2, train_per_class: 6, val_per_class: 2}]
      noise: [{strategy: balanced, ratio: [0.1, 0.2]}]   # or {weights: {label: 1}, ratio: 0.2}
      models: [{name: tiny-llama, epochs: 1, max_length: 64}]
      methods: [datainf, loss]                            # or [default] or [all]
      seeds: [0, 1]
      attribution: false

Every mistake raises :class:`InfscopeError` with one line naming the bad key (with its path in the
spec) and the valid keys, before anything runs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError

SPEC_KEYS = ("name", "description", "axes", "grids", "device")
AXES_KEYS = ("datasets", "noise", "models", "methods", "seeds", "attribution", "peers")
DATASET_KEYS = ("name", "label", "classes", "train_per_class", "val_per_class", "paraphrase")
NOISE_KEYS = ("strategy", "weights", "ratio", "label")
MODEL_KEYS = (
    "name",
    "label",
    "rank",
    "alpha",
    "target_modules",
    "lora_layers",
    "epochs",
    "lr",
    "batch_size",
    "max_length",
    "checkpoint",
)
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
CLEAN_LABEL = "clean"


@dataclass(frozen=True)
class DatasetAxis:
    """One built-in dataset with its size options; ``label`` names its directory."""

    name: str
    label: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class NoiseAxis:
    """One noise setting: a strategy or custom weights (``"label=1"``) at one ratio (0 = clean)."""

    strategy: str
    weights: str | None
    ratio: float
    label: str


@dataclass(frozen=True)
class ModelAxis:
    """One model with its LoRA / training overrides; ``label`` names its directory."""

    name: str
    label: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Grid:
    """One cross product: every dataset x noise x model x seed, each scored by ``methods``."""

    datasets: tuple[DatasetAxis, ...]
    noise: tuple[NoiseAxis, ...]
    models: tuple[ModelAxis, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    attribution: bool
    peers: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Number of runs this grid expands to."""
        return len(self.datasets) * len(self.noise) * len(self.models) * len(self.seeds)


@dataclass(frozen=True)
class BenchSpec:
    """A validated benchmark spec: its name, description, where it came from and its grids."""

    name: str
    description: str
    source: str
    grids: tuple[Grid, ...]
    device: str = "cpu"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Combination:
    """One run of a benchmark: the labels that name its directory and the full pipeline config."""

    dataset: str
    noise: str
    model: str
    seed: int
    config: Any  # infscope.pipeline.PipelineConfig (imported lazily: it pulls in torch)
    grid: int = 0
    peers: tuple[str, ...] = ()  # peers run on the finished run (infscope.peers), compared with ours

    @property
    def relpath(self) -> Path:
        """Run directory relative to the benchmark directory."""
        return Path(self.dataset, self.noise, self.model, f"seed-{self.seed}")

    def key(self) -> dict[str, Any]:
        """The identifying columns of this run in the results table."""
        cfg = self.config
        return {
            "dataset": self.dataset,
            "noise": self.noise,
            "strategy": "custom" if cfg.noise_weights else cfg.noise_strategy,
            "weights": cfg.noise_weights or "",
            "ratio": float(cfg.noise_ratio),
            "model": self.model,
            "seed": int(self.seed),
            "run": self.relpath.as_posix(),
        }


# ---------------------------------------------------------------- small validators


def _fail(where: str, problem: str) -> InfscopeError:
    return InfscopeError(f"{where}: {problem}")


def _check_keys(mapping: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in valid:
            raise _fail(where, f"unknown key {key!r}; valid keys: {', '.join(valid)}")


def _mapping(value: Any, where: str, valid: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected a mapping with keys {', '.join(valid)}, got {type(value).__name__}")
    _check_keys(value, valid, where)
    return value


def _list(value: Any, where: str) -> list[Any]:
    """A YAML list (a single scalar or mapping counts as a list of one)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise _fail(where, "is empty; give at least one entry")
    return items


def _int(value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"must be a whole number >= {minimum} (got {value!r})")
    return int(value)


def _float(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _fail(where, f"must be a number in [{low:g}, {high:g}] (got {value!r})")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"must be true or false (got {value!r})")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"must be a non-empty string (got {value!r})")
    return value.strip()


def _label(value: Any, where: str) -> str:
    text = _str(value, where)
    if not _LABEL.match(text):
        raise _fail(where, f"label {text!r} is not a safe directory name; use letters, digits, . _ + -")
    return text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "x"


# ---------------------------------------------------------------- axes


def _dataset_task(name: str, where: str) -> str:
    from infscope.data.builtin import BUILTIN_DATASETS

    if name not in BUILTIN_DATASETS:
        raise _fail(where, f"unknown dataset {name!r}; built-in datasets: {', '.join(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name].task


def _parse_dataset(entry: Any, where: str) -> DatasetAxis:
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = _mapping(entry, where, DATASET_KEYS)
    if "name" not in entry:
        raise _fail(where, f"missing key 'name'; valid keys: {', '.join(DATASET_KEYS)}")
    name = _str(entry["name"], f"{where}.name")
    _dataset_task(name, f"{where}.name")
    options: dict[str, Any] = {}
    for key in ("classes", "train_per_class", "val_per_class"):
        if key in entry:
            options[key] = _int(entry[key], f"{where}.{key}")
    if "paraphrase" in entry:
        options["paraphrase"] = _bool(entry["paraphrase"], f"{where}.paraphrase")
    label = _label(entry.get("label", name), f"{where}.label")
    return DatasetAxis(name=name, label=label, options=tuple(sorted(options.items())))


def _weights_text(value: Any, where: str) -> str:
    """Custom noise weights as a canonical ``"a=0.5,b=0.5"`` string (validated, sorted, unnormalised)."""
    from infscope.noise.strategies import normalise, parse_weights

    if not isinstance(value, (str, Mapping)):
        raise _fail(where, f"write weights as a mapping like {{label: 1}} or 'label=1' (got {value!r})")
    try:
        raw = parse_weights(value)
        normalise(raw)
    except InfscopeError as exc:
        raise _fail(where, str(exc)) from None
    return ",".join(f"{key}={raw[key]:g}" for key in sorted(raw))


def _parse_noise(entry: Any, where: str) -> list[NoiseAxis]:
    from infscope.noise.strategies import STRATEGIES

    entry = _mapping(entry, where, NOISE_KEYS)
    if "ratio" not in entry:
        raise _fail(where, f"missing key 'ratio' (0 = no noise); valid keys: {', '.join(NOISE_KEYS)}")
    if "strategy" in entry and "weights" in entry:
        raise _fail(where, "give either 'strategy' or 'weights', not both")
    weights = _weights_text(entry["weights"], f"{where}.weights") if "weights" in entry else None
    strategy = _str(entry.get("strategy", "balanced"), f"{where}.strategy")
    if strategy not in STRATEGIES:
        raise _fail(
            f"{where}.strategy", f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}"
        )
    ratios = [_float(r, f"{where}.ratio", 0.0, 1.0) for r in _list(entry["ratio"], f"{where}.ratio")]
    if len(ratios) > 1 and "label" in entry:
        raise _fail(f"{where}.label", "a label names one ratio; split the entry or drop the label")
    out = []
    for ratio in ratios:
        if ratio == 0:  # no noise: the strategy is irrelevant, so every clean entry is the same run
            label = _label(entry["label"], f"{where}.label") if "label" in entry else CLEAN_LABEL
            out.append(NoiseAxis(strategy="balanced", weights=None, ratio=0.0, label=label))
            continue
        if "label" in entry:
            label = _label(entry["label"], f"{where}.label")
        else:
            kind = f"custom-{_slug(weights.replace('=', '').replace(',', '+'))}" if weights else strategy
            label = f"{kind}-{ratio:g}"
        out.append(NoiseAxis(strategy=strategy, weights=weights, ratio=ratio, label=label))
    return out


def _model_tasks(name: str) -> tuple[str, ...] | None:
    """Tasks a built-in model serves; None for a local path or Hub name (checked when loaded)."""
    from infscope.models.builtin import BUILTIN_MODELS

    return BUILTIN_MODELS[name].tasks if name in BUILTIN_MODELS else None


def _parse_model(entry: Any, where: str) -> ModelAxis:
    from infscope.models.builtin import BUILTIN_MODELS
    from infscope.pipeline import CHECKPOINT_CHOICES

    if isinstance(entry, str):
        entry = {"name": entry}
    entry = _mapping(entry, where, MODEL_KEYS)
    if "name" not in entry:
        raise _fail(where, f"missing key 'name'; valid keys: {', '.join(MODEL_KEYS)}")
    name = _str(entry["name"], f"{where}.name")
    is_path = Path(name).expanduser().exists()
    if name not in BUILTIN_MODELS and not is_path and not re.match(r"^[\w.-]+/[\w.-]+$", name):
        raise _fail(
            f"{where}.name",
            f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)} "
            "(or a local path / Hub name)",
        )
    options: dict[str, Any] = {}
    for key in ("rank", "alpha", "epochs", "batch_size", "max_length"):
        if key in entry:
            options[key] = _int(entry[key], f"{where}.{key}")
    if "lr" in entry:
        lr = entry["lr"]
        if isinstance(lr, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                lr = float(lr)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise _fail(f"{where}.lr", f"must be a positive number like 1e-3 (got {lr!r})")
        options["lr"] = float(lr)
    if "target_modules" in entry:
        targets = entry["target_modules"]
        names = targets if isinstance(targets, (list, tuple)) else str(targets).split(",")
        options["target_modules"] = ",".join(_str(t, f"{where}.target_modules") for t in names)
    if "lora_layers" in entry:
        from infscope.models.lora import LoraSpec

        raw_layers = entry["lora_layers"]
        layers = (
            ",".join(str(v) for v in raw_layers) if isinstance(raw_layers, (list, tuple)) else str(raw_layers)
        )
        try:
            LoraSpec(layers=layers)
        except InfscopeError as exc:
            raise _fail(f"{where}.lora_layers", str(exc)) from None
        options["lora_layers"] = layers
    if "checkpoint" in entry:
        checkpoint = _str(entry["checkpoint"], f"{where}.checkpoint")
        if checkpoint not in CHECKPOINT_CHOICES:
            raise _fail(f"{where}.checkpoint", f"must be one of {', '.join(CHECKPOINT_CHOICES)}")
        options["checkpoint"] = checkpoint
    default_label = Path(name).name if is_path else name.replace("/", "--")
    label = _label(entry.get("label", default_label), f"{where}.label")
    return ModelAxis(name=name, label=label, options=tuple(sorted(options.items())))


def _parse_methods(value: Any, where: str) -> tuple[str, ...]:
    from infscope.scoring.methods import parse_methods

    items = value.split(",") if isinstance(value, str) else _list(value, where)
    try:
        return tuple(parse_methods([_str(m, where) for m in items], keep_all=True))
    except InfscopeError as exc:
        raise _fail(where, str(exc)) from None


def _parse_peers(value: Any, where: str) -> tuple[str, ...]:
    from infscope.peers.suite import peer_names

    if value is None or value == []:
        return ()
    items = value if isinstance(value, str) else [_str(p, where) for p in _list(value, where)]
    try:
        return tuple(peer_names(items))
    except InfscopeError as exc:
        raise _fail(where, str(exc)) from None


def _parse_seeds(value: Any, where: str) -> tuple[int, ...]:
    seeds = [_int(s, where, minimum=0) for s in _list(value, where)]
    if len(set(seeds)) != len(seeds):
        raise _fail(where, f"repeats a seed ({seeds}); list each seed once")
    return tuple(seeds)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` (from ``--seeds``) as a tuple of distinct non-negative ints."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InfscopeError(
            f"--seeds {text!r} is not a comma-separated list of whole numbers; e.g. --seeds 0,1"
        ) from None
    if not values:
        raise InfscopeError("--seeds is empty; pass e.g. --seeds 0,1")
    return _parse_seeds(values, "--seeds")


def _unique_labels(items: Sequence[Any], where: str, what: str) -> None:
    seen: dict[str, Any] = {}
    for item in items:
        if item.label in seen and seen[item.label] != item:
            raise _fail(
                where, f"two {what} share the directory label {item.label!r}; give each a distinct 'label'"
            )
        seen[item.label] = item


def _parse_grid(axes: Mapping[str, Any], where: str) -> Grid:
    """Validate one merged axes mapping into a :class:`Grid` (defaults follow ``PipelineConfig``)."""
    for key in ("datasets", "models"):
        if key not in axes:
            raise _fail(where, f"missing key {key!r}; axes keys: {', '.join(AXES_KEYS)}")
    datasets = tuple(
        dict.fromkeys(
            _parse_dataset(d, f"{where}.datasets[{i}]")
            for i, d in enumerate(_list(axes["datasets"], f"{where}.datasets"))
        )
    )
    noise_entries = _list(axes.get("noise", [{"strategy": "balanced", "ratio": 0.2}]), f"{where}.noise")
    noise = tuple(
        dict.fromkeys(n for i, e in enumerate(noise_entries) for n in _parse_noise(e, f"{where}.noise[{i}]"))
    )
    models = tuple(
        dict.fromkeys(
            _parse_model(m, f"{where}.models[{i}]")
            for i, m in enumerate(_list(axes["models"], f"{where}.models"))
        )
    )
    _unique_labels(datasets, f"{where}.datasets", "datasets")
    _unique_labels(noise, f"{where}.noise", "noise settings")
    _unique_labels(models, f"{where}.models", "models")
    for dataset in datasets:
        task = "causal" if _dataset_task(dataset.name, where) == "instruction" else "classification"
        for model in models:
            tasks = _model_tasks(model.name)
            if tasks is not None and task not in tasks:
                raise _fail(
                    f"{where}.models",
                    f"model {model.name!r} cannot do {task} (dataset {dataset.name!r} needs it); "
                    "put them in separate grids",
                )
    return Grid(
        datasets=datasets,
        noise=noise,
        models=models,
        methods=_parse_methods(axes.get("methods", ["default"]), f"{where}.methods"),
        seeds=_parse_seeds(axes.get("seeds", [0]), f"{where}.seeds"),
        attribution=_bool(axes.get("attribution", False), f"{where}.attribution"),
        peers=_parse_peers(axes.get("peers", []), f"{where}.peers"),
    )


def parse_spec(data: Any, *, source: str = "<spec>") -> BenchSpec:
    """Validate a spec (the mapping read from YAML) into a :class:`BenchSpec`."""
    where = f"spec {source}"
    data = _mapping(data, where, SPEC_KEYS)
    name = _label(data.get("name", Path(source).stem), f"{where}: name")
    where = f"spec {name}"
    if "axes" not in data and "grids" not in data:
        raise _fail(where, "needs 'axes' (one grid) or 'grids' (a list of grids); see `infscope bench list`")
    shared = dict(_mapping(data.get("axes", {}), f"{where}: axes", AXES_KEYS))
    if "grids" in data:
        entries = _list(data["grids"], f"{where}: grids")
        merged = [{**shared, **_mapping(g, f"{where}: grids[{i}]", AXES_KEYS)} for i, g in enumerate(entries)]
        grids = tuple(_parse_grid(m, f"{where}: grids[{i}]") for i, m in enumerate(merged))
    else:
        grids = (_parse_grid(shared, f"{where}: axes"),)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(where, "description must be text")
    device = _str(data.get("device", "cpu"), f"{where}: device")
    return BenchSpec(
        name=name, description=description.strip(), source=source, grids=grids, device=device, raw=dict(data)
    )


def load_spec(spec: str | Path) -> BenchSpec:
    """A built-in spec by name, or a YAML file by path."""
    import yaml

    from infscope.bench.specs import BUILTIN_SPECS

    text_name = str(spec)
    if text_name in BUILTIN_SPECS:
        return parse_spec(yaml.safe_load(BUILTIN_SPECS[text_name]), source=f"builtin:{text_name}")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InfscopeError(
            f"no built-in spec or file named {text_name!r}; built-in specs: {', '.join(BUILTIN_SPECS)} "
            "(or pass a YAML file path)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InfscopeError(f"cannot read spec {path}: {exc}; pass a readable YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InfscopeError(f"spec {path} is not valid YAML{at}; fix the syntax") from None
    return parse_spec(data, source=str(path))


# ---------------------------------------------------------------- expansion


def expand_spec(spec: BenchSpec, *, seeds: Sequence[int] | None = None) -> list[Combination]:
    """Every run of ``spec`` in a fixed order (grid, dataset, noise, model, seed).

    ``seeds`` replaces every grid's seeds. Two runs may share a directory only if their configs are
    identical (the duplicate is dropped); otherwise the error asks for distinct labels.
    """
    from infscope.pipeline import PipelineConfig

    seed_override = _parse_seeds(list(seeds), "--seeds") if seeds is not None else None
    combos: dict[Path, Combination] = {}
    for index, grid in enumerate(spec.grids):
        for dataset, noise, model, seed in itertools.product(
            grid.datasets, grid.noise, grid.models, seed_override or grid.seeds
        ):
            config = PipelineConfig(
                dataset=dataset.name,
                **dict(dataset.options),
                noise_ratio=noise.ratio,
                noise_strategy=noise.strategy,
                noise_weights=noise.weights,
                model=model.name,
                **dict(model.options),
                methods=grid.methods,
                attribution=grid.attribution,
                seed=seed,
                device=spec.device,
            )
            combo = Combination(dataset.label, noise.label, model.label, seed, config, index, grid.peers)
            previous = combos.get(combo.relpath)
            if previous is not None and previous.config != config:
                raise InfscopeError(
                    f"spec {spec.name}: grids {previous.grid} and {index} both write {combo.relpath} with "
                    "different settings; give the datasets, noise or models distinct 'label's"
                )
            combos.setdefault(combo.relpath, combo)
    return list(combos.values())
