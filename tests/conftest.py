"""Shared test settings: one torch thread (tiny models gain nothing from more, and shared CI cores
slow down several-fold when threads compete) and no transformers deprecation noise."""

from __future__ import annotations

import warnings

import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
