"""Peers side by side on a finished run: AUROC, agreement with ours, seconds and speed ratio.

Usage (make a run first, e.g. ``infscope demo --model tiny-llama --out RUN``)::

    python3 benchmarks/peers.py RUN [--peers kronfluence_ekfac,dattri_datainf] [--out RUN/peers]

The same as ``infscope peers RUN ...`` (this script only calls the command). Columns: method,
AUROC / AP against the run's manifest, ``vs`` (our method it is compared with), Spearman vs that
method and vs our DataInf, ``rel_diff`` (max relative difference, only where the peer computes the
same quantity), seconds, ``ratio`` (peer seconds / our scoring seconds for ``vs``, measured in this
process), peak MB, error. Our rows (``ours:<method>``) time scoring only; gradients were collected
once by the run (stage ``gradients:<checkpoint>`` of ``run.json``), while peers compute their own
gradients inside their time.
"""

from __future__ import annotations

import sys

from infscope.cli import main

if __name__ == "__main__":
    sys.exit(main(["peers", *sys.argv[1:]]))
