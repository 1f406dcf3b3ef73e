"""Measure scores against ground truth: how well they find injected noise, and where they point.

- :mod:`~infscope.evaluate.detection`: AUROC, AP, precision/recall at k, detection and ROC curves,
  overall and per noise family/operator; aligns scores to a noise manifest by id.
- :mod:`~infscope.evaluate.attribution`: class-detection AUC and recall of a query x train matrix.
- :mod:`~infscope.evaluate.aggregate`: mean, std and t interval over seeds; the leaderboard.
- :mod:`~infscope.evaluate.metrics`, :mod:`~infscope.evaluate.curves`, :mod:`~infscope.evaluate.stats`:
  the vectorised primitives (average ranks, tie-aware top-k, curves, Student's t without scipy).

Convention everywhere: higher score = more suspicious / more harmful; ties never depend on row order.
"""
