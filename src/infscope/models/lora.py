"""Attach LoRA adapters (peft), reload saved adapters, and name the LoRA layers gradients are taken on.

Gradients and influence scores are computed on the LoRA ``A``/``B`` matrices only, so
:func:`lora_layer_names` is how later stages find their blocks. For classifiers the new head is
trained in full (peft ``modules_to_save``) and :func:`head_names` reports it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infscope.errors import InfscopeError
from infscope.models.config import LoraSpec, parse_layers

# Default LoRA targets per ``config.model_type``: the attention query and value projections.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}
# Names classification heads go by in transformers, tried in this order.
HEAD_CANDIDATES = ("classifier", "score")


def _layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def _unwrap(loaded_or_model: Any) -> nn.Module:
    return loaded_or_model.model if hasattr(loaded_or_model, "tokenizer") else loaded_or_model


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def default_targets(model: nn.Module) -> list[str]:
    """The default LoRA target module names for ``model``'s architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise InfscopeError(
            f"no default LoRA targets for model type {model_type!r}; pass --target-modules (e.g. q_proj,v_proj)"
        )
    return list(DEFAULT_TARGETS[model_type])


def _head_name(model: nn.Module) -> str:
    for name in HEAD_CANDIDATES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise InfscopeError(
        f"cannot find the classification head of {type(model).__name__}; use a *ForSequenceClassification model"
    )


def attach_lora(loaded_or_model: Any, spec: LoraSpec | None = None, *, seed: int = 0) -> nn.Module:
    """Wrap a model with fresh LoRA adapters (seeded init) and return the peft model.

    Accepts a :class:`~infscope.models.registry.LoadedModel` (whose ``model`` is replaced by the
    peft model) or a bare model. Only LoRA weights (and a classifier's head) are trainable.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    spec = spec or LoraSpec()
    model = _unwrap(loaded_or_model)
    if hasattr(model, "peft_config"):
        raise InfscopeError(
            "the model already has LoRA adapters; load a fresh base model before attaching LoRA"
        )
    classifier = _is_classifier(model)
    targets = spec.target_modules or default_targets(model)
    n_layers = _layer_count(model)
    layers = parse_layers(spec.layers, n_layers)
    if layers is not None and n_layers is None:
        raise InfscopeError("cannot tell how many layers this model has; leave --lora-layers at all")
    config = LoraConfig(
        layers_to_transform=layers,
        r=int(spec.r),
        lora_alpha=float(spec.alpha),
        lora_dropout=float(spec.dropout),
        target_modules=targets,
        task_type=TaskType.SEQ_CLS if classifier else TaskType.CAUSAL_LM,
        modules_to_save=[_head_name(model)] if classifier else None,
    )
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers helper
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise InfscopeError(
            f"cannot attach LoRA to {', '.join(targets)}: {str(exc).splitlines()[0]}; check --target-modules"
        ) from None
    if hasattr(loaded_or_model, "tokenizer"):
        loaded_or_model.model = peft_model
    return peft_model


def _adapter_config(path: Path) -> dict[str, Any]:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise InfscopeError(
            f"{path} holds no LoRA adapter (adapter_config.json missing); pass a checkpoint directory"
        )
    try:
        return json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InfscopeError(
            f"cannot read {config_file} ({exc}); the checkpoint is damaged, re-run finetune"
        ) from None


# peft prefixes every saved adapter key with this (``base_model.model.`` + the module path).
_PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _saved_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter (safetensors first, as peft does), on the CPU."""
    from safetensors.torch import load_file

    for name in ADAPTER_WEIGHTS:
        file = path / name
        if file.is_file():
            try:
                if name.endswith(".safetensors"):
                    return load_file(str(file), device="cpu")
                return torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:  # safetensors and pickle raise assorted types; all mean a damaged file
                raise InfscopeError(
                    f"cannot read {file} ({type(exc).__name__}); save the adapter again"
                ) from None
    raise InfscopeError(
        f"{path} has adapter_config.json but no {' or '.join(ADAPTER_WEIGHTS)}; save the adapter again"
    )


def _lora_keys(keys: Any) -> set[str]:
    return {k for k in keys if ".lora_A." in k or ".lora_B." in k}


def _module_path(key: str) -> str:
    return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key


def _key_fix(saved: set[str], expected: set[str]) -> tuple[str, str] | None:
    """A ``(drop, add)`` rewrite of the module path that maps every saved LoRA key onto the model's.

    Adapters saved from the bare backbone (``layers.0...``) onto a ``*ForCausalLM`` (``model.layers.0...``),
    or the other way round, or saved without peft's ``base_model.model.`` prefix, differ from the model's
    keys by one leading module path; any other difference is a different model.
    """
    saved_paths = {_module_path(k) for k in saved}
    expected_paths = {_module_path(k) for k in expected}
    if not saved_paths or len(saved_paths) != len(expected_paths):
        return None
    probe = min(saved_paths)
    candidates = set()
    for target in expected_paths:
        if target == probe:
            candidates.add(("", ""))
        elif target.endswith("." + probe):
            candidates.add(("", target[: -len(probe)]))
        elif probe.endswith("." + target):
            candidates.add((probe[: -len(target)], ""))
    for drop, add in sorted(candidates):
        renamed = {add + p[len(drop) :] for p in saved_paths if p.startswith(drop)}
        if len(renamed) == len(saved_paths) and renamed == expected_paths:
            return drop, add
    return None


def _check_or_fix_keys(peft_model: nn.Module, path: Path) -> None:
    """Make sure every LoRA weight of the adapter file landed in the model, fixing a shifted module path.

    peft loads adapter weights non-strictly: weights whose names do not match the model are skipped
    (a warning at most) and the adapter silently stays at its initialisation. This compares the file's
    LoRA keys with the model's; a consistent prefix shift is repaired by loading the renamed weights,
    anything else raises.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = _saved_weights(path)
    saved_keys = _lora_keys(saved)
    expected = _lora_keys(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    if saved_keys == expected:
        return
    fix = _key_fix(saved_keys, expected)
    if fix is None:
        missing, extra = sorted(expected - saved_keys), sorted(saved_keys - expected)
        example = _module_path((extra or missing)[0]) if (extra or missing) else ""
        raise InfscopeError(
            f"adapter {path} does not match the base model ({len(missing)} LoRA weights missing, "
            f"{len(extra)} unexpected, e.g. {example}); load it onto the model it was trained from"
        )
    drop, add = fix
    renamed = {}
    for key, value in saved.items():
        module = _module_path(key)
        if module.startswith(drop):
            module = add + module[len(drop) :]
        renamed[_PEFT_PREFIX + module] = value
    result = set_peft_model_state_dict(peft_model, renamed)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise InfscopeError(
            f"adapter {path} has weights the base model lacks (e.g. {unexpected[0]}); "
            "load it onto the model it was trained from"
        )


def load_adapter(loaded_or_model: Any, path: str | Path, *, trainable: bool = False) -> nn.Module:
    """Load a saved LoRA adapter onto a base model and return the peft model (eval mode).

    Reads adapters saved by infscope, by ``PeftModel.save_pretrained`` and by ``transformers.Trainer``
    / TRL (``checkpoint-N`` folders). Every LoRA weight in the file must land in the model: an adapter
    made for another base model (missing target modules, other shapes, other layers) raises a
    one-line :class:`InfscopeError`; one whose keys differ only by a leading module path (saved from
    the bare backbone, or without peft's prefix) is renamed to fit.
    """
    from peft import PeftModel

    path = Path(path)
    _adapter_config(path)
    model = _unwrap(loaded_or_model)
    if hasattr(model, "peft_config"):
        raise InfscopeError("the model already has LoRA adapters; load the adapter onto a fresh base model")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers helper
            # missing keys are checked (and fixed or refused) below, so peft's own warning is noise
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
        _check_or_fix_keys(peft_model, path)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        first = " ".join(lines[:2])[:240] if lines else type(exc).__name__
        raise InfscopeError(
            f"adapter {path} does not match the base model ({first}); load it onto the model it was trained from"
        ) from None
    peft_model.eval()
    if hasattr(loaded_or_model, "tokenizer"):
        loaded_or_model.model = peft_model
    return peft_model


def lora_layer_names(loaded_or_model: Any) -> list[str]:
    """Names of the LoRA ``A`` and ``B`` ``nn.Linear`` modules, in module order."""
    model = _unwrap(loaded_or_model)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name)
    ]
    if not names:
        raise InfscopeError(
            "no LoRA layers found in the model; attach LoRA (attach_lora) or load an adapter first"
        )
    return names


def head_names(loaded_or_model: Any) -> list[str]:
    """Names of the trainable copies of a classifier's head (``modules_to_save``), empty for causal LMs."""
    model = _unwrap(loaded_or_model)
    return [name for name, module in model.named_modules() if name.endswith("modules_to_save.default")]


def trainable_parameters(loaded_or_model: Any) -> dict[str, torch.nn.Parameter]:
    """Parameters that require gradients, by name."""
    return {n: p for n, p in _unwrap(loaded_or_model).named_parameters() if p.requires_grad}
