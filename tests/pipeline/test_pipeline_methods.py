"""The pipeline scores each task's defaults and passes named methods through to scoring's checks."""

from __future__ import annotations

from infscope.defaults import DEFAULT_METHODS
from infscope.pipeline import methods_for_task


def test_defaults_of_the_other_task_are_left_out():
    assert "xprompt" in methods_for_task(DEFAULT_METHODS, "instruction")
    assert "text_oof" not in methods_for_task(DEFAULT_METHODS, "instruction")
    assert "text_oof" in methods_for_task(DEFAULT_METHODS, "classification")
    assert "xprompt" not in methods_for_task(DEFAULT_METHODS, "classification")
    assert methods_for_task(("datainf", "loss", "all"), "classification") == ["datainf", "loss", "all"]
    # a method the user named is kept even when it does not fit: scoring refuses it with its one line
    assert methods_for_task(("label_margin",), "instruction") == ["label_margin"]
