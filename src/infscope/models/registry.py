"""Load a base model and its tokenizer by built-in name, local path or Hugging Face Hub name.

:func:`load_model` is the single entry point. Built-in names (see
:data:`infscope.models.builtin.BUILTIN_MODELS`) resolve to local checkpoints; any other local
directory is loaded with ``AutoModelForCausalLM`` or ``AutoModelForSequenceClassification``; a
``org/name`` string is tried in the local Hugging Face cache, then on the Hub. Offline, a Hub name
fails at once with a one-line error instead of the Hub client's long retry loop.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infscope.errors import InfscopeError
from infscope.models.builtin import BUILTIN_MODELS, builtin_path

TASKS = ("causal", "classification")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model ready for LoRA, its tokenizer, the name it was loaded by and its task.

    ``model`` is replaced by the peft wrapper when LoRA is attached; ``path`` is the local
    checkpoint directory (``None`` for Hub models) and ``num_labels`` is set for classifiers.
    """

    model: Any
    tokenizer: Any
    name: str
    task: str
    path: Path | None = None
    num_labels: int | None = None

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter."""
        return next(self.model.parameters()).device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InfscopeError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """Check that ``device`` exists on this machine and return it."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InfscopeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InfscopeError(f"device {device!r} requested but CUDA is not available; pass --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InfscopeError(f"device {device!r} requested but MPS is not available; pass --device cpu")
    return dev


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (e.g. 'newly initialised classifier') for one block."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers on its HTTPS port (a quick check before a Hub load)."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _builtin_list() -> str:
    return ", ".join(BUILTIN_MODELS)


def _resolve_source(name_or_path: str, task: str, seed: int) -> tuple[str, Path | None]:
    """Map a name or path to ``(source for from_pretrained, local dir or None)``."""
    if name_or_path in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name_or_path]
        if task not in spec.tasks:
            raise InfscopeError(
                f"built-in model {name_or_path!r} does not support task {task!r} (it supports "
                f"{', '.join(spec.tasks)}); pick another model or task"
            )
        path = builtin_path(name_or_path, seed=seed)
        return str(path), path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InfscopeError(
                f"{path} has no config.json, so it is not a model checkpoint; pass a model directory"
            )
        return str(path), path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or not _HUB_NAME.match(name_or_path):
        raise InfscopeError(
            f"unknown model {name_or_path!r} (not a built-in name, model directory or Hub name); use one of "
            f"{_builtin_list()} or pass a local checkpoint directory"
        )
    return name_or_path, None


def _from_pretrained(auto_cls: Any, source: str, local: bool, **kwargs: Any) -> Any:
    """Call ``auto_cls.from_pretrained``: local cache first for Hub names, the Hub only if reachable."""
    if local:
        return auto_cls.from_pretrained(source, **kwargs)
    try:
        return auto_cls.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise InfscopeError(
            f"cannot reach the Hugging Face Hub to download {source!r} and it is not in the local cache; "
            f"pass a local checkpoint directory or a built-in name ({_builtin_list()})"
        )
    return auto_cls.from_pretrained(source, **kwargs)


def load_model(
    name_or_path: str,
    *,
    task: str = "causal",
    num_labels: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a causal LM or a sequence classifier with its tokenizer, in eval mode on ``device``.

    ``seed`` fixes the weights of tiny built-ins and of any newly initialised head (the
    classifier of an encoder), so two loads with the same arguments give the same model.
    ``attn_implementation="eager"`` is needed for double-backward (Hessian-vector products).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task not in TASKS:
        raise InfscopeError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task == "classification":
        num_labels = 2 if num_labels is None else int(num_labels)
        if num_labels < 2:
            raise InfscopeError(
                f"num_labels must be at least 2, got {num_labels}; pass the number of classes"
            )
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    with quiet_transformers():
        source, local_dir = _resolve_source(str(name_or_path), task, seed)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with quiet_transformers(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tokenizer = _from_pretrained(AutoTokenizer, source, local_dir is not None)
            if task == "causal":
                model = _from_pretrained(AutoModelForCausalLM, source, local_dir is not None, **kwargs)
            else:
                model = _from_pretrained(
                    AutoModelForSequenceClassification,
                    source,
                    local_dir is not None,
                    num_labels=num_labels,
                    **kwargs,
                )
    except InfscopeError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(f"model {name_or_path!r}", exc) from None
    _ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=str(name_or_path),
        task=task,
        path=local_dir,
        num_labels=num_labels,
    )


def load_spec(spec: Any, *, attn_implementation: str | None = None) -> LoadedModel:
    """The base model a run's :class:`~infscope.runs.record.ModelSpec` describes (no adapter), seeded.

    A classification run needs its label names (the number of classes sizes the head).
    """
    num_labels = None
    if spec.model_task == "classification":
        if not spec.label_names:
            raise InfscopeError(
                "this classification run records no label names; fine-tune it again with infscope "
                "(labels are recorded at fine-tuning) or pass the labels through the data's label names"
            )
        num_labels = len(spec.label_names)
    torch.manual_seed(spec.seed)
    return load_model(
        spec.name,
        task=spec.model_task,
        num_labels=num_labels,
        device=spec.device,
        dtype=spec.dtype,
        seed=spec.seed,
        attn_implementation=attn_implementation,
    )


def load_tokenizer(spec: Any) -> Any:
    """The tokenizer of the base model a run's :class:`~infscope.runs.record.ModelSpec` names, alone.

    Resolved like :func:`load_model` (built-in name, local directory, Hub cache, then the Hub) and
    given the same pad token, so rows encode exactly as in fine-tuning; no model weights are read,
    which keeps commands that only encode rows (peers, reports) light.
    """
    from transformers import AutoTokenizer

    task = spec.model_task
    if task not in TASKS:
        raise InfscopeError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    with quiet_transformers():
        source, local_dir = _resolve_source(str(spec.name), task, spec.seed)
    try:
        with quiet_transformers():
            tokenizer = _from_pretrained(AutoTokenizer, source, local_dir is not None)
    except InfscopeError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(f"the tokenizer of {spec.name!r}", exc) from None
    _ensure_pad_token(tokenizer)
    return tokenizer


def _load_error(what: str, exc: Exception) -> InfscopeError:
    """One line for a model or tokenizer that transformers could not load."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InfscopeError(f"could not load {what}: {first}; pass a valid checkpoint directory")


def _ensure_pad_token(tokenizer: Any) -> None:
    """Batches need padding: fall back to the EOS (or UNK) token when the tokenizer has no pad token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
