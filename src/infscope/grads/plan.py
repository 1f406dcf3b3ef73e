"""Plan a gradient collection before running it: sizes, peak memory and time per stage.

Sizes are exact arithmetic on the LoRA shapes: a LoRA pair on ``nn.Linear(in, out)`` with rank ``r``
has ``A (r, in)`` and ``B (out, r)``, so one row's gradient has ``r (in + out)`` entries per adapted
module. With ``--project D`` each block wider than ``D`` becomes ``D`` wide (the
:class:`~infscope.grads.projection.BlockProjector` rule: D is *per block*).

Memory per stage is an estimate, labelled as such: weights are ``params x bytes``; activations of a
batch follow the usual transformer count (per layer about ``34 h + 5 a t`` bytes per token at 16 bits
with eager attention, Korthikanti et al. 2022) plus the logits in float32; a store shard is
``shard_rows x row bytes``; store-based scoring holds one block of all rows in float32 twice; streamed
scoring holds one batch of gradients in float64 and a few vectors.

Time comes from a probe on this machine (:func:`probe`): 32 rows of random tokens at ``seq_len``
through one fine-tuning step and one per-example gradient pass of the model with LoRA, and the
DataInf arithmetic on a random block. Per-row seconds are multiplied by the rows. For a model that is
not on disk, a smaller *probe model* measures this machine's throughput in FLOP/s and the target's
time follows from its FLOPs per row (``4 x params x tokens``: a forward pass and the input-gradient
half of the backward pass, since frozen base weights get no weight gradient). GPU times use an
*assumed* effective throughput per GPU (``gpu_tflops``) and perfect data-parallel scaling: nothing
here measures a GPU.

:func:`check_plan` warns before a store is written if the disk or memory is too small.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infscope.errors import InfscopeError

STORE_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
MEMINFO = Path("/proc/meminfo")
DEFAULT_GPU_TFLOPS = 125.0  # assumption: an A100-class GPU at ~40 % of its 312 TFLOP/s bf16 peak


@dataclass(frozen=True)
class Architecture:
    """The shapes of a decoder-only transformer that set gradient sizes, memory and FLOPs."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shape(self, target: str) -> tuple[int, int]:
        """``(in, out)`` of a Llama-style linear module named ``target``."""
        kv = self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, self.heads * self.head_dim),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (self.heads * self.head_dim, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        if target not in shapes:
            raise InfscopeError(
                f"unknown target module {target!r} for a Llama-style model; use {', '.join(shapes)}"
            )
        return shapes[target]

    def params(self) -> int:
        """Parameter count (embeddings, attention, MLP, norms, and an untied output head)."""
        attn = sum(i * o for i, o in (self.linear_shape(t) for t in ("q_proj", "k_proj", "v_proj", "o_proj")))
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head

    def forward_flops(self, tokens: int) -> float:
        """FLOPs of one forward pass over one row of ``tokens`` tokens.

        ``2 x`` the linear-layer weights per token (attention and MLP projections, and the output
        head over the vocabulary), plus causal attention scores and their weighted sum
        (``2 x 2 x hidden`` per query-key pair, half of the ``tokens^2`` pairs).
        """
        linear = sum(
            i * o for i, o in (self.linear_shape(t) for t in ("q_proj", "k_proj", "v_proj", "o_proj"))
        )
        linear += 3 * self.hidden * self.intermediate
        per_token = 2.0 * (self.layers * linear + self.vocab * self.hidden)
        attention = 2.0 * tokens * tokens * self.hidden * self.layers
        return per_token * tokens + attention


# Published configs of the models users ask about most (hidden, layers, intermediate, vocab, heads, kv).
KNOWN: dict[str, Architecture] = {
    "llama-2-7b": Architecture("llama-2-7b", 4096, 32, 11008, 32000, 32, 32),
    "llama-3-8b": Architecture("llama-3-8b", 4096, 32, 14336, 128256, 32, 8),
    "smollm2-135m": Architecture("smollm2-135m", 576, 30, 1536, 49152, 9, 3, tied_embeddings=True),
}
_ALIASES = {
    "llama-2-7b": ("llama-2-7b", "llama2-7b"),
    "llama-3-8b": ("llama-3-8b", "llama3-8b", "meta-llama-3-8b", "llama-3.1-8b"),
    "smollm2-135m": ("smollm2-135m",),
}


def known_architecture(name: str) -> Architecture | None:
    """The table entry whose name or alias occurs in ``name`` (case-insensitive), else ``None``."""
    key = name.lower().replace("_", "-")
    for arch, aliases in _ALIASES.items():
        if any(alias in key for alias in aliases):
            return KNOWN[arch]
    return None


def architecture_of(model: Any, name: str) -> Architecture:
    """The :class:`Architecture` of a loaded transformers model (from its config)."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    return Architecture(
        name=name,
        hidden=int(cfg.hidden_size),
        layers=int(cfg.num_hidden_layers),
        intermediate=int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
        vocab=int(cfg.vocab_size),
        heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def lora_block_dims(
    arch: Architecture,
    rank: int,
    targets: Sequence[str],
    layers: Sequence[int] | None,
    block_by: str = "matrix",
) -> dict[str, int]:
    """Block name -> per-row gradient dim of the LoRA matrices, grouped as the store would group them."""
    if rank < 1:
        raise InfscopeError(f"LoRA rank must be at least 1, got {rank}; pass --rank 8 or similar")
    chosen = range(arch.layers) if layers is None else layers
    dims: dict[str, int] = {}
    for layer in chosen:
        for target in targets:
            fan_in, fan_out = arch.linear_shape(target)
            parts = {"lora_A": rank * fan_in, "lora_B": fan_out * rank}
            for matrix, d in parts.items():
                key = {
                    "matrix": f"layers.{layer}.{target}.{matrix}",
                    "module": f"layers.{layer}.{target}",
                    "layer": f"layers.{layer}",
                }.get(block_by)
                if key is None:
                    raise InfscopeError(f"unknown block_by {block_by!r}; use matrix, module or layer")
                dims[key] = dims.get(key, 0) + d
    return dims


def projected_dims(dims: dict[str, int], project: int | None) -> dict[str, int]:
    """Block dims after a per-block projection to ``project`` columns (blocks not wider are kept)."""
    if project is None:
        return dict(dims)
    if project < 1:
        raise InfscopeError(f"--project must be >= 1, got {project}")
    return {name: min(d, project) for name, d in dims.items()}


def scoring_bytes(n_rows: int, dims: dict[str, int], compute_bytes: int = 4) -> int:
    """Peak memory of store-based scoring: one block of all rows, loaded and converted (2 copies)."""
    return 2 * n_rows * max(dims.values(), default=0) * compute_bytes


def activation_bytes(arch: Architecture, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
    """Estimated activation memory of a forward+backward on ``batch`` rows of ``seq_len`` tokens."""
    per_layer = seq_len * batch * arch.hidden * (34 + 5 * arch.heads * seq_len / arch.hidden)
    logits = 3 * batch * seq_len * arch.vocab * 4
    return int(arch.layers * per_layer * dtype_bytes / 2 + logits)


def available_memory(meminfo: Path = MEMINFO) -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (``None`` where there is no such file)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (its first existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


def human(num_bytes: float) -> str:
    """Bytes in B/KiB/MiB/GiB/TiB with 3 significant figures."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"  # pragma: no cover


def check_plan(store_bytes: int, path: str | Path, *, scoring_memory: int | None = None) -> list[str]:
    """Warn (one line each) when the disk at ``path`` cannot hold the store or memory the scoring stage.

    Returns the warning lines (empty when everything fits); never raises for lack of space.
    """
    messages = []
    free = free_disk(path)
    if store_bytes > free:
        messages.append(
            f"the gradient store needs {human(store_bytes)} but only {human(free)} is free at {path}; "
            "project the gradients (--project D) or store them in 16 bits (--grad-dtype bfloat16)"
        )
    memory = available_memory()
    if scoring_memory is not None and memory is not None and scoring_memory > memory:
        messages.append(
            f"scoring will need about {human(scoring_memory)} of memory but {human(memory)} is available; "
            "project the gradients (--project D) or stream the scores (infscope.grads.streaming)"
        )
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    return messages


@dataclass
class ProbeResult:
    """Seconds per row measured on this machine, and the model's FLOPs per row at ``seq_len``."""

    model: str
    rows: int
    seq_len: int
    batch_size: int
    finetune_s_per_row: float
    grads_s_per_row: float
    score_s_per_row_dim: float
    flops_per_row: float

    @property
    def flops_per_s(self) -> float:
        """Achieved FLOP/s of the gradient pass on this machine."""
        return self.flops_per_row / self.grads_s_per_row


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def probe(
    model_name: str,
    *,
    rank: int = 8,
    targets: Sequence[str] | None = None,
    lora_layers: str | None = None,
    seq_len: int = 256,
    rows: int = 32,
    batch_size: int = 8,
    block_by: str = "matrix",
    seed: int = 0,
) -> tuple[ProbeResult, Architecture, dict[str, int]]:
    """Time one fine-tuning pass and one gradient pass over ``rows`` random rows of ``seq_len`` tokens.

    Returns the timings, the model's architecture and its exact LoRA block dims. One batch runs
    first untimed (warm-up).
    """
    # The model stack is imported here: sizes-only plans need neither transformers nor peft.
    from infscope.grads.hooks import PerExampleGradients, iter_gradients
    from infscope.grads.losses import causal_lm_loss
    from infscope.models.config import LoraSpec
    from infscope.models.lora import attach_lora
    from infscope.models.registry import load_model

    loaded = load_model(model_name, seed=seed)
    arch = architecture_of(loaded.model, model_name)
    model = attach_lora(
        loaded, LoraSpec(r=rank, target_modules=list(targets) if targets else None, layers=lora_layers)
    )
    dims = PerExampleGradients(model, None).layout(block_by).dims
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, arch.vocab, (rows + batch_size, seq_len), generator=gen)
    data = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens.clone()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def finetune(lo: int, hi: int) -> None:
        model.train()
        for start in range(lo, hi, batch_size):
            batch = {k: v[start : min(hi, start + batch_size)] for k, v in data.items()}
            causal_lm_loss(model, batch).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()

    def gradients(lo: int, hi: int) -> None:
        part = {k: v[lo:hi] for k, v in data.items()}
        for _ in iter_gradients(model, part, block_by=block_by, batch_size=batch_size, nan_check=False):
            pass

    finetune(0, batch_size)
    gradients(0, batch_size)
    t_grads = _timed(lambda: gradients(batch_size, batch_size + rows))
    t_finetune = _timed(lambda: finetune(batch_size, batch_size + rows))
    per_dim = _score_cost(sum(dims.values()))
    flops = 2 * arch.forward_flops(seq_len)
    result = ProbeResult(
        model_name, rows, seq_len, batch_size, t_finetune / rows, t_grads / rows, per_dim, flops
    )
    return result, arch, dims


def _score_cost(dim: int, rows: int = 256) -> float:
    """Seconds per (row x gradient dim) of DataInf's arithmetic (norms, two mat-vecs, a weighted sum)."""
    width = max(1, min(dim, 2**20 // rows * 4))
    G = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    v = torch.randn(width, generator=torch.Generator().manual_seed(1))

    def work() -> None:
        a = G @ v
        q = torch.linalg.vector_norm(G, dim=1).square()
        u = v - ((a / (q + 1.0)) @ G) / rows
        G @ u

    work()
    return _timed(work) / (rows * width)


@dataclass
class Stage:
    """One line of the plan: a stage, its peak memory and its time (``None`` when not measured)."""

    name: str
    memory: int
    seconds: float | None
    note: str = ""


@dataclass
class Plan:
    """Everything ``infscope plan`` prints."""

    model: str
    rows: int
    rank: int
    targets: list[str]
    seq_len: int
    batch_size: int
    project: int | None
    arch: Architecture
    block_dims: dict[str, int]
    probe: ProbeResult | None = None
    probe_note: str = "no probe: sizes only"
    stages: list[Stage] = field(default_factory=list)
    gpu_tflops: float = DEFAULT_GPU_TFLOPS
    gpus: tuple[int, ...] = (1, 8, 64)
    epochs: int = 1

    @property
    def row_dim(self) -> int:
        return sum(self.block_dims.values())

    def store_bytes(self, dtype: str, project: int | None) -> int:
        dims = projected_dims(self.block_dims, project)
        return self.rows * sum(dims.values()) * STORE_DTYPES[dtype]


def build_plan(
    model: str,
    rows: int,
    *,
    rank: int = 8,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    project: int | None = None,
    lora_layers: str | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    shard_rows: int = 256,
    epochs: int = 1,
    arch: Architecture | None = None,
    probe_model: str | None = None,
    run_probe: bool = True,
    probe_rows: int = 32,
    gpus: Sequence[int] = (1, 8, 64),
    gpu_tflops: float = DEFAULT_GPU_TFLOPS,
    weight_bytes: int = 4,
) -> Plan:
    """Sizes, memory and (when probed) time of collecting and scoring ``rows`` rows on ``model``.

    ``arch`` (or the known-architecture table) sizes a model that is not on disk. A model that
    loads (a built-in or a local directory) is probed itself unless ``run_probe=False``;
    ``probe_model`` probes that model instead and scales by FLOPs.
    """
    from infscope.models.config import parse_layers

    if rows < 1:
        raise InfscopeError(f"--rows must be >= 1, got {rows}")
    if gpu_tflops <= 0:
        raise InfscopeError(f"--gpu-tflops must be positive, got {gpu_tflops}")
    targets = [t.strip() for t in targets if t.strip()]
    arch = arch or known_architecture(model)
    result = None
    block_dims: dict[str, int] | None = None
    note = "no probe: sizes only"
    on_disk = arch is None or Path(model).expanduser().is_dir()
    if run_probe and (probe_model or on_disk):
        name = probe_model or model
        try:
            result, probed_arch, probed_dims = probe(
                name,
                rank=rank,
                targets=targets,
                lora_layers=lora_layers,
                seq_len=seq_len,
                rows=probe_rows,
                batch_size=batch_size,
            )
        except InfscopeError as exc:
            if arch is None:
                raise InfscopeError(
                    f"cannot size {model!r} ({exc}); pass --hidden/--layers/--intermediate/--vocab "
                    "or a known architecture (llama-2-7b, llama-3-8b, smollm2-135m)"
                ) from None
            note = f"no probe ({exc}): sizes only"
        else:
            if probe_model:
                note = f"times scaled by FLOPs from a {probe_rows}-row probe of {probe_model} on this machine"
                arch = arch or probed_arch
            else:
                arch, block_dims = probed_arch, probed_dims
                note = f"times from a {probe_rows}-row probe of {model} on this machine"
    if arch is None:
        raise InfscopeError(
            f"unknown architecture for {model!r}; pass --hidden/--layers/--intermediate/--vocab "
            "or a known name (llama-2-7b, llama-3-8b, smollm2-135m)"
        )
    if block_dims is None:
        block_dims = lora_block_dims(arch, rank, targets, parse_layers(lora_layers, arch.layers))
    plan = Plan(
        model,
        rows,
        rank,
        targets,
        seq_len,
        batch_size,
        project,
        arch,
        block_dims,
        probe=result,
        probe_note=note,
        gpu_tflops=gpu_tflops,
        gpus=tuple(gpus),
        epochs=epochs,
    )
    plan.stages = _stages(plan, shard_rows, weight_bytes)
    return plan


def _stages(plan: Plan, shard_rows: int, weight_bytes: int) -> list[Stage]:
    arch, n, b = plan.arch, plan.rows, plan.batch_size
    dims = projected_dims(plan.block_dims, plan.project)
    row_bytes = sum(dims.values()) * 4
    weights = arch.params() * weight_bytes
    acts = activation_bytes(arch, b, plan.seq_len, weight_bytes)
    lora_state = plan.row_dim * 4 * 4  # weights, gradient, two Adam moments
    grad_batch = b * plan.row_dim * 4 * 2  # per-example gradients of a batch (+ projection output)
    scale = _time_scale(plan)

    def seconds(per_row: float | None, count: float) -> float | None:
        return None if per_row is None else per_row * count * scale

    p = plan.probe
    score_cost = None if p is None else p.score_s_per_row_dim * n * sum(dims.values())
    return [
        Stage("model weights", weights, None, f"{count(arch.params())} params x {weight_bytes} B"),
        Stage(
            "fine-tune",
            weights + acts + lora_state,
            seconds(p and p.finetune_s_per_row, n * plan.epochs),
            f"{plan.epochs} epoch(s), batch {b}",
        ),
        Stage(
            "gradient pass",
            weights + acts + grad_batch + shard_rows * row_bytes,
            seconds(p and p.grads_s_per_row, n),
            f"+ store shard of {shard_rows} rows ({human(shard_rows * row_bytes)})",
        ),
        Stage(
            "scoring (store)",
            scoring_bytes(n, dims),
            score_cost,
            "largest block, all rows, float32 x2; time: arithmetic only (+ reading the store)",
        ),
        Stage(
            "scoring (streamed)",
            weights + acts + b * sum(dims.values()) * 8 + 4 * sum(dims.values()) * 8 + 6 * n * 8,
            seconds(p and p.grads_s_per_row, 3 * n),
            "DataInf: 3 gradient passes, no store",
        ),
    ]


def _time_scale(plan: Plan) -> float:
    """Factor from probe seconds to the planned model: 1, or the FLOPs ratio for a probe model."""
    p = plan.probe
    if p is None or p.model == plan.model:
        return 1.0
    return plan.arch.forward_flops(plan.seq_len) * 2 / p.flops_per_row


def gpu_seconds(plan: Plan, stage: str, gpus: int) -> float:
    """Assumed time of a stage on ``gpus`` GPUs: FLOPs / (gpus x gpu_tflops), perfect data parallel."""
    passes = {"fine-tune": plan.epochs, "gradient pass": 1, "scoring (streamed)": 3}[stage]
    flops = 2 * plan.arch.forward_flops(plan.seq_len) * plan.rows * passes
    return flops / (gpus * plan.gpu_tflops * 1e12)


def count(value: float) -> str:
    """A parameter count as 590K, 135M or 6.74B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    if seconds < 172800:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} d"


def format_plan(plan: Plan) -> str:
    """The plan as plain text: sizes, store per dtype and projection, memory and time per stage."""
    arch = plan.arch
    lines = [
        f"plan: {plan.model}, {plan.rows:,} rows, LoRA r={plan.rank} on {','.join(plan.targets)}, "
        f"seq_len {plan.seq_len}, batch {plan.batch_size}",
        f"architecture: hidden {arch.hidden}, layers {arch.layers}, intermediate {arch.intermediate}, "
        f"vocab {arch.vocab}, heads {arch.heads}/{arch.kv_heads} kv, {count(arch.params())} params",
        f"per-row gradient: {plan.row_dim:,} values in {len(plan.block_dims)} blocks "
        f"(largest {max(plan.block_dims.values()):,}) = {human(plan.row_dim * 4)} float32",
        "",
        "store size        float32      float16      bfloat16",
    ]
    projections: list[int | None] = [None] + ([plan.project] if plan.project else [])
    for project in projections:
        dims = projected_dims(plan.block_dims, project)
        label = "full" if project is None else f"D={project}/block"
        sizes = "  ".join(f"{human(plan.store_bytes(dt, project)):>11}" for dt in STORE_DTYPES)
        lines.append(f"{label:<16}{sizes}   ({sum(dims.values()):,} values/row)")
    lines += ["", f"stage               peak memory    time here   ({plan.probe_note})"]
    for stage in plan.stages:
        lines.append(
            f"{stage.name:<20}{human(stage.memory):>11}  {_duration(stage.seconds):>11}   {stage.note}"
        )
    p = plan.probe
    if p is not None:
        lines += [
            "",
            f"probe: {p.model}, {p.rows} rows x {p.seq_len} tokens: fine-tune {p.finetune_s_per_row:.3g} s/row, "
            f"gradients {p.grads_s_per_row:.3g} s/row ({p.flops_per_s / 1e9:.3g} GFLOP/s achieved), "
            f"scoring {p.score_s_per_row_dim * 1e9:.3g} ns per row x dim",
        ]
    head = "  ".join(f"{g:>3} GPU{'s' if g > 1 else ' '}" for g in plan.gpus)
    lines += [
        "",
        f"on GPUs (ASSUMED {plan.gpu_tflops:g} TFLOP/s effective per GPU, perfect data-parallel scaling, "
        f"{2 * arch.forward_flops(plan.seq_len) / 1e12:.3g} TFLOP per row per pass):",
        f"stage               {head}",
    ]
    for stage in ("fine-tune", "gradient pass", "scoring (streamed)"):
        cells = "  ".join(f"{_duration(gpu_seconds(plan, stage, g)):>8}" for g in plan.gpus)
        lines.append(f"{stage:<20}{cells}")
    return "\n".join(lines)


def parse_gpus(text: str) -> tuple[int, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)``."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InfscopeError(f"--gpus {text!r} is not a list of counts; pass e.g. 1,8,64") from None
    if not values or min(values) < 1:
        raise InfscopeError(f"--gpus {text!r} needs positive counts; pass e.g. 1,8,64")
    return values
