"""README.md tells the truth: its method table is the registry's, and every command it shows exists."""

from __future__ import annotations

import re
from pathlib import Path

from infscope.cli import app, main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_methods_table_is_generated_from_the_registry(capsys):
    text = README.read_text()
    table = re.search(r"<!-- methods-table[^>]*-->\n(.*?)\n<!-- /methods-table -->", text, re.S).group(1)
    assert main(["methods", "--markdown"]) == 0
    assert table.strip() == capsys.readouterr().out.strip(), "regenerate with `infscope methods --markdown`"


def test_every_command_in_the_readme_exists():
    from infscope.cli import _register_commands

    _register_commands()
    known = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    used = {m for block in blocks for m in re.findall(r"(?:^|&& )infscope ([a-z]+)", block, re.M)}
    assert used and used <= known, sorted(used - known)
