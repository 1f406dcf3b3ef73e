"""``python -m infscope`` runs the CLI."""

from infscope.cli import run

run()
