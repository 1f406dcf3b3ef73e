"""Influence estimators and baselines under one sign convention: higher = more harmful.

Every gradient method follows :class:`~infscope.estimators.base.Estimator`: ``fit(train)`` once,
then ``score(query, aggregate=True|False)`` and ``self_score()``, each returning
:class:`~infscope.estimators.scores.Scores`. Get one by name with :func:`get_estimator`.
"""

from infscope.estimators.base import Estimator
from infscope.estimators.registry import ESTIMATORS, get_estimator
from infscope.estimators.scores import Scores, results_table, write_table

__all__ = ["ESTIMATORS", "Estimator", "Scores", "get_estimator", "results_table", "write_table"]
