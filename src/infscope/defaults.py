"""Defaults several layers share, importable without torch (the command line reads them at start-up)."""

from __future__ import annotations

#: What ``--method default`` (and ``infscope demo``) scores: the influence methods, the pair-consistency
#: detector that beats the training loss on swapped responses (benchmarks/detectors.py), and the baselines.
DEFAULT_METHODS = (
    "datainf",
    "lissa",
    "exact",
    "hessian_free",
    "xprompt",
    "loss",
    "base_loss",
    "grad_norm",
    "random",
)
