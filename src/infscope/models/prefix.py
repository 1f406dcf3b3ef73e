"""Run the frozen bottom of a decoder once per row, and only the LoRA-tuned top layers after that.

When LoRA sits only on the top layers of a decoder (``--lora-layers top:N``), everything below
the first tuned layer is frozen: its output for a given row never changes, through every epoch,
every validation pass, the gradient pass and the loss passes. :func:`frozen_prefix` caches the
hidden state entering the first tuned layer per row (keyed by the row's token ids) and, while it is
active, runs the model's forward from there. On SmolLM2-135M with LoRA on the top 10 of 30 layers a
training step or gradient pass costs about 40 % of one with LoRA on every layer (``benchmarks/prefix_speed.py``).

Why it is exact: batches are right-padded, and a decoder is causal, so the hidden state of a real
token depends only on the real tokens before it; the cached per-row states equal those of any
padded batch. Padding positions get zero states; nothing downstream reads them (they are masked
as keys and carry no loss). The first batch is checked against the full model and the cache
switches itself off (with a warning) for an architecture where the two disagree, e.g. one that
rescales its input embeddings inside ``forward``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")


def decoder_stack(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The module that holds the decoder layers (``model.layers`` in Llama-style models) and its attribute.

    Returns ``None`` for architectures without a ``layers`` ModuleList next to input embeddings.
    """
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and hasattr(module, "embed_tokens"):
            return module, "layers"
    return None


def first_tuned_layer(model: nn.Module) -> int | None:
    """Index of the lowest decoder layer with a trainable parameter (``None``: none, or not a decoder)."""
    found = decoder_stack(model)
    if found is None:
        return None
    stack, attr = found
    for index, layer in enumerate(getattr(stack, attr)):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return None


def lora_layer_indices(names: list[str]) -> list[int]:
    """Decoder layer indices named in module names such as ``...layers.12.self_attn.q_proj``."""
    return sorted({int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n + "."))})


class PrefixStates:
    """Hidden states entering layer ``depth`` per row, keyed by the row's real token ids.

    Kept in memory up to ``max_bytes`` (rows beyond that are recomputed each time). One instance
    can serve the base model and the same base model with adapters, as long as ``depth`` is at or
    below the first tuned layer of both.
    """

    def __init__(self, depth: int, max_bytes: int = 2 << 30) -> None:
        self.depth = int(depth)
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._states: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.checked = False
        self.disabled = False

    def __len__(self) -> int:
        return len(self._states)

    @staticmethod
    def key(ids: torch.Tensor) -> bytes:
        return ids.detach().to("cpu", torch.int64).numpy().tobytes()

    def get(self, key: bytes) -> torch.Tensor | None:
        return self._states.get(key)

    def put(self, key: bytes, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if self.bytes + size <= self.max_bytes:
            self._states[key] = states.detach().clone()  # a view would keep its whole padded batch alive
            self.bytes += size


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _PrefixRunner:
    """Swaps the decoder's layer list around one forward call; see :func:`frozen_prefix`."""

    def __init__(self, stack: nn.Module, attr: str, cache: PrefixStates) -> None:
        self.stack, self.attr, self.cache = stack, attr, cache
        self.layers: nn.ModuleList = getattr(stack, attr)
        self.original_forward = stack.forward
        self.bottom = nn.ModuleList(list(self.layers)[: cache.depth])
        self.top = nn.ModuleList(list(self.layers)[cache.depth :])

    @contextmanager
    def _layers(self, layers: nn.ModuleList) -> Iterator[None]:
        setattr(self.stack, self.attr, layers)
        try:
            yield
        finally:
            setattr(self.stack, self.attr, self.layers)

    def _bottom_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen layers for a right-padded batch (causal mask only)."""
        captured: list[torch.Tensor] = []
        hook = self.bottom[-1].register_forward_hook(lambda m, a, out: captured.append(_layer_output(out)))
        try:
            with torch.no_grad(), self._layers(self.bottom):
                self.original_forward(input_ids=input_ids, use_cache=False)
        finally:
            hook.remove()
        return captured[-1]

    def _prefix_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(dim=1).tolist()
        ids = input_ids.detach().to("cpu", torch.int64)  # one device transfer for the batch's keys
        keys = [self.cache.key(ids[j, : int(n)]) for j, n in enumerate(lengths)]
        found = [self.cache.get(k) for k in keys]
        missing = [j for j, s in enumerate(found) if s is None]
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            computed = self._bottom_states(input_ids[missing])
            for pos, j in enumerate(missing):
                found[j] = computed[pos, : int(lengths[j])]
                self.cache.put(keys[j], found[j])
        states = pad_sequence(found, batch_first=True)  # zero states on padding positions
        return F.pad(states, (0, 0, 0, input_ids.shape[1] - states.shape[1]))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        usable = (
            not self.cache.disabled
            and input_ids is not None
            and kwargs.get("inputs_embeds") is None
            and kwargs.get("position_ids") is None
            and not kwargs.get("use_cache")
            and (attention_mask is None or attention_mask.dim() == 2)
            and not (self.stack.training and getattr(self.stack, "gradient_checkpointing", False))
        )
        if not usable:
            return self.original_forward(*args, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all()):
            return self.original_forward(*args, **kwargs)  # not right-padded: run the full model
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "inputs_embeds")}
        states = self._prefix_batch(input_ids, attention_mask)
        with self._layers(self.top):
            output = self.original_forward(inputs_embeds=states, **rest)
        if not self.cache.checked:
            self.cache.checked = True
            self._check(states, rest, input_ids, attention_mask)
            if self.cache.disabled:  # this batch too comes from the full model
                return self.original_forward(*args, **kwargs)
        return output

    def _check(self, states: torch.Tensor, rest: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Compare the first batch with the full model; switch the cache off if they disagree.

        Both runs are repeated in eval mode, so dropout in training cannot pass for a disagreement.
        """
        was_training = self.stack.training
        self.stack.eval()
        try:
            with torch.no_grad():
                full = self.original_forward(**{**rest, "input_ids": input_ids}).last_hidden_state
                with self._layers(self.top):
                    fast = self.original_forward(inputs_embeds=states, **rest).last_hidden_state
        finally:
            self.stack.train(was_training)
        real = mask.bool()
        scale = full[real].abs().max().clamp_min(1e-6)
        error = float(((full - fast)[real]).abs().max() / scale)
        tolerance = 1e-4 if fast.dtype == torch.float32 else 5e-2
        if not error <= tolerance:
            self.cache.disabled = True
            warnings.warn(
                f"frozen-prefix cache disagrees with the full model (relative error {error:.1e}); "
                "running the full model instead",
                RuntimeWarning,
                stacklevel=3,
            )


@contextmanager
def frozen_prefix(model: nn.Module, cache: PrefixStates | None = None, *, depth: int | None = None):
    """Within the block, run ``model`` from cached states entering its first tuned decoder layer.

    ``depth`` defaults to the first layer with trainable parameters; the cache is a no-op
    (yields ``None``) when that is layer 0, when nothing below ``depth`` may change (a trainable
    parameter below it), or when the model has no Llama-style decoder stack. Pass the same
    ``cache`` to share states between calls (e.g. base-model loss, then gradients with the adapter).
    Inside an active block, a nested ``frozen_prefix`` on the same model changes nothing and yields
    the active cache.
    """
    found = decoder_stack(model)
    if found is None:
        yield None
        return
    stack, attr = found
    active = getattr(stack.__dict__.get("forward"), "__self__", None)
    if isinstance(active, _PrefixRunner):  # already inside a frozen_prefix block: it keeps serving
        yield active.cache
        return
    if depth is None:
        depth = cache.depth if cache is not None else first_tuned_layer(model)
    n_layers = len(getattr(stack, attr))
    below = list(getattr(stack, attr))[: depth or 0]
    trainable_below = any(p.requires_grad for layer in below for p in layer.parameters()) or any(
        p.requires_grad for p in stack.embed_tokens.parameters()
    )
    if not depth or depth >= n_layers or trainable_below:
        yield None
        return
    cache = cache if cache is not None and cache.depth == depth else PrefixStates(depth)
    runner = _PrefixRunner(stack, attr, cache)
    previous = stack.__dict__.get("forward")  # another library's wrapper, put back on exit
    stack.forward = runner.forward
    try:
        yield cache
    finally:
        if previous is None:
            del stack.forward  # back to the class's forward
        else:
            stack.forward = previous


def adapter_first_layer(checkpoint: Any) -> int | None:
    """Lowest decoder layer a saved adapter tunes (``layers_to_transform``), ``None`` for all layers."""
    import json
    from pathlib import Path

    config_file = Path(checkpoint) / "adapter_config.json"
    try:
        layers = json.loads(config_file.read_text()).get("layers_to_transform")
    except (OSError, ValueError):
        return None
    if isinstance(layers, int):
        return layers
    return min(layers) if layers else None
