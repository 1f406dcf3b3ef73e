"""``--method default`` gives each run the defaults of its task, never a method that would refuse it."""

from __future__ import annotations

from types import SimpleNamespace

from infscope.defaults import DEFAULT_METHODS
from infscope.estimators.registry import get_method
from infscope.scoring import parse_methods


def test_default_methods_follow_the_task():
    for task in ("instruction", "classification"):
        names = parse_methods("default", SimpleNamespace(task=task))
        assert names == [m for m in DEFAULT_METHODS if task in get_method(m).tasks]
        assert all(task in get_method(m).tasks for m in names)
    assert "xprompt" in parse_methods("default", SimpleNamespace(task="instruction"))
    assert "xprompt" not in parse_methods("default", SimpleNamespace(task="classification"))
    assert "text_oof" in parse_methods("default", SimpleNamespace(task="classification"))
    assert "text_oof" not in parse_methods("default", SimpleNamespace(task="instruction"))
    assert parse_methods("default") == list(DEFAULT_METHODS)  # no run yet: the whole list
