"""The names of every artifact of a cleaning directory (``infscope clean --out DIR``), in one place.

::

    run.json                       the loop's record: arguments (guarded), finished rounds and baselines
    rounds/round-N/                one fine-tuning run per round (a run directory, see RunLayout);
                                   round 0 trains on the input as given
    rounds/round-N.changes.jsonl   the changes made before round N trained (saved before training,
                                   so a resumed round acts exactly as the interrupted one)
    rounds/round-N.weights.json    row weights round N trained with (reweight only)
    baselines/<name>/              the baseline runs (random rows, the injected noise) and their changes
    cleaned.<ext>                  the cleaned rows of the kept round, in the input's format
    audit.jsonl                    header (input fingerprint and bytes) + one record per change
    rounds.json                    the round-by-round table
    clean_report.json              the section the report renders (gain curve, baselines, changes)
"""

from __future__ import annotations

import os
from pathlib import Path

from infscope.runs import RUN_FILE


class CleanLayout:
    """Paths of one cleaning directory (pure: creates nothing)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def record(self) -> Path:
        return self.root / RUN_FILE

    def round_dir(self, n: int) -> Path:
        return self.root / "rounds" / f"round-{n}"

    def round_changes(self, n: int) -> Path:
        return self.root / "rounds" / f"round-{n}.changes.jsonl"

    def round_weights(self, n: int) -> Path:
        return self.root / "rounds" / f"round-{n}.weights.json"

    def baseline_dir(self, name: str) -> Path:
        return self.root / "baselines" / name

    def baseline_changes(self, name: str) -> Path:
        return self.root / "baselines" / f"{name}.changes.jsonl"

    def baseline_weights(self, name: str) -> Path:
        return self.root / "baselines" / f"{name}.weights.json"

    def cleaned(self, suffix: str) -> Path:
        return self.root / f"cleaned{suffix}"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def rounds_table(self) -> Path:
        return self.root / "rounds.json"

    @property
    def report(self) -> Path:
        return self.root / "clean_report.json"
