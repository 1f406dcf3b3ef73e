"""The settings of one end-to-end run (``infscope demo``, bench specs), importable without torch.

The command line takes its defaults from :class:`PipelineConfig`; importing torch costs seconds, so
the settings live apart from the stages (:mod:`infscope.pipeline`), which re-export them. Method names
are checked against the registry when a config is made (that import is deferred to then).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from infscope.defaults import DEFAULT_METHODS
from infscope.errors import InfscopeError

#: Which checkpoint is scored: lowest validation loss, the last, every one, or each method's best on canaries.
CHECKPOINT_CHOICES = ("best", "last", "all", "canary")
#: What ``infscope score --checkpoint`` takes besides ``epoch-N``: the above, and ``inrun`` (or
#: ``inrun:EPOCH``), the gradients captured during fine-tuning (``infscope finetune --capture``).
#: The demo does not capture, so it keeps :data:`CHECKPOINT_CHOICES`.
SCORE_CHECKPOINT_CHOICES = (*CHECKPOINT_CHOICES, "inrun")
#: The demo's noise: label-preserving grammar and quality noise, semantic noise, and enough
#: label-changing response swaps (mismatched instruction/response pairs) to measure each family.
DEMO_NOISE = "grammar=0.3,quality=0.2,response_swap=0.3,semantic=0.2"


@dataclass
class PipelineConfig:
    """Everything one end-to-end run depends on; stored in ``run.json`` so reuse can be checked.

    The defaults are the ``infscope demo`` setting: the built-in sentence-transformation task
    (10 classes, 12 training and 2 validation rows each), 20 % noise (:data:`DEMO_NOISE`), SmolLM2-135M with
    LoRA r=8 on q_proj/v_proj, 2 epochs at lr 2e-3, scored at the checkpoint with the lowest validation loss.
    ``noise_ratio=0`` skips noise (attribution experiments); ``noise_weights=None`` uses ``noise_strategy``.
    """

    dataset: str = "sentence_transform"
    classes: int = 10
    train_per_class: int = 12
    val_per_class: int = 2
    paraphrase: bool = False
    noise_ratio: float = 0.2
    noise_strategy: str = "balanced"
    noise_weights: str | None = DEMO_NOISE
    model: str = "smollm2-135m"
    rank: int = 8
    alpha: int = 16
    target_modules: str | None = None
    lora_layers: str | None = None
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 8
    max_length: int = 128
    methods: tuple[str, ...] = DEFAULT_METHODS
    checkpoint: str = "best"
    attribution: bool = False
    canaries: float | None = None
    canary_noise: str | None = None
    canary_source: str = "auto"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    grad_dtype: str = "float32"

    def __post_init__(self) -> None:
        from infscope.noise.canaries import canary_count, check_canary_source, check_validation_left
        from infscope.scoring.methods import parse_methods  # deferred: the registry imports torch

        self.methods = tuple(parse_methods(list(self.methods), keep_all=True))
        if not 0 <= self.noise_ratio <= 1:
            raise InfscopeError(f"noise ratio {self.noise_ratio} is outside [0, 1]; pass e.g. --ratio 0.2")
        if self.checkpoint == "canary" and not self.canaries:
            raise InfscopeError(
                "checkpoint 'canary' needs canaries; pass --canaries 0.05 (or choose best, last, all)"
            )
        check_canary_source(self.canary_source)
        if self.canaries and self.canary_source == "validation":  # built-in sizes are known: refuse now
            check_validation_left(
                canary_count(self.canaries, self.classes * self.train_per_class),
                self.classes * self.val_per_class,
            )
        if self.checkpoint not in CHECKPOINT_CHOICES:
            raise InfscopeError(
                f"checkpoint {self.checkpoint!r} is not one of {', '.join(CHECKPOINT_CHOICES)}"
            )
        for name in ("classes", "train_per_class", "val_per_class", "epochs", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise InfscopeError(
                    f"{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})"
                )

    def as_args(self) -> dict[str, Any]:
        """JSON-ready arguments for ``run.json``."""
        args = asdict(self)
        args["methods"] = list(self.methods)
        if not self.canaries:  # recorded only when it matters, so runs made before it existed still match
            args["canary_source"] = None
        return args
