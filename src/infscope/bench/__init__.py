"""Benchmarks: cross datasets x noise x models x seeds, run each through the pipeline, tabulate.

- :mod:`~infscope.bench.config`: YAML spec -> validated :class:`BenchSpec` -> list of
  :class:`Combination` (one :class:`~infscope.pipeline.PipelineConfig` and run directory each).
- :mod:`~infscope.bench.specs`: the built-in specs ``quick``, ``demo`` and ``datainf-paper``.
- :mod:`~infscope.bench.runner`: :func:`run_bench` runs or resumes every combination.
- :mod:`~infscope.bench.results`: the per-run results table and its aggregate over seeds.
- :mod:`~infscope.bench.summary`: the rich summary table printed at the end and by ``bench show``.
"""

from infscope.bench.config import BenchSpec, Combination, expand_spec, load_spec, parse_seeds, parse_spec
from infscope.bench.specs import BUILTIN_SPECS

__all__ = [
    "BUILTIN_SPECS",
    "BenchSpec",
    "Combination",
    "expand_spec",
    "load_spec",
    "parse_seeds",
    "parse_spec",
]
