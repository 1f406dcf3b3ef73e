"""Defaults several layers share, importable without torch (the command line reads them at start-up)."""

from __future__ import annotations

#: What ``--method default`` (and ``infscope demo``) scores: the influence methods, the detectors that beat
#: the training loss (benchmarks/detectors.py): the pair-consistency margin on instruction data, the
#: cross-fitted probe on labels; and the baselines. Each run gets the defaults of its task.
DEFAULT_METHODS = (
    "datainf",
    "lissa",
    "exact",
    "hessian_free",
    "xprompt",
    "text_oof",
    "loss",
    "base_loss",
    "grad_norm",
    "random",
)
