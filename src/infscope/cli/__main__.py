"""``python -m infscope.cli`` (and ``torchrun -m infscope.cli``): the infscope command."""

from infscope.cli import run

run()
