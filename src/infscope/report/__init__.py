"""The human report of a run: one self-contained HTML page plus PNG figures.

:func:`collect` gathers every number and flagged row from a run directory into a JSON-ready dict;
:func:`write_report` renders it to ``RUN/report.html`` (and ``RUN/report_files/*.png``).
"""

from __future__ import annotations

from infscope.report.collect import collect
from infscope.report.html import render_html, write_report

__all__ = ["collect", "render_html", "write_report"]
