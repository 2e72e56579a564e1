"""The documentation site says what the code does: its command-line page is the parser's."""

import argparse
import importlib.util
from pathlib import Path

from fedforge.cli import build_parser

DOCS = Path(__file__).parent.parent / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_line_page_is_written_from_the_parser():
    # Stale after a flag changed: `python docs/gen_cli.py` (make docs) writes it again.
    assert (DOCS / "cli.md").read_text() == _generator().render(build_parser())


def test_the_command_line_page_lists_every_flag():
    page = (DOCS / "cli.md").read_text()
    for name, sub in _generator()._subcommands(build_parser()).items():
        assert f"## fedforge {name}" in page
        for action in sub[1]._actions:
            if isinstance(action, argparse._HelpAction):  # every command has -h, the page says so once
                continue
            assert all(f"`{flag}`" in page for flag in action.option_strings), action.option_strings
