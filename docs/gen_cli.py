"""Write docs/cli.md, the command line's reference, from fedforge's argparse parser.

`make docs` runs it before the build; tests/test_docs.py checks that docs/cli.md is what it writes,
so the page cannot drift from the flags. Run: `python docs/gen_cli.py` (or `--check`: exit 1 if stale).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PAGE = Path(__file__).parent / "cli.md"

HEADER = """# The command line

<!-- Written by docs/gen_cli.py from fedforge.cli's parser (make docs); do not edit by hand. -->

Every setting of `fedforge run`, `compare`, `server` and `client` is also a key of its `--config`
TOML file (`--local-epochs 2` is `local_epochs = 2`, at the top or in its group's table, here
`[client]`); a flag overrides the file. Command-only flags, not keys: `--config`, `--resume`, and
compare's `--strategies`, `--runs`, `--target`, `--x-axis`, `--jobs`. An unknown flag or key is refused, naming
the close one. Bad input is one line naming the value and what is allowed, exit status 2. Every
command also takes `-h`, `--help`.
"""


def _cell(text: str) -> str:
    """`text` fit for one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.option_strings and action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction):
        metavar = action.metavar or action.dest.upper()
        names += f" `{metavar}`" + (" ..." if action.nargs in ("+", "*") else "")
    return names


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:  # argparse's own expansion, as --help shows it
        text = text % {**vars(action), "default": action.default, "prog": "fedforge"}
    if action.choices and not action.option_strings:
        text += f" ({', '.join(map(str, action.choices))})"
    return _cell(text)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each subcommand's name, one-line help and parser, in the parser's order."""
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in sub._choices_actions}
    return {name: (helps.get(name, ""), p) for name, p in sub.choices.items()}


def render(parser: argparse.ArgumentParser) -> str:
    """The page: an overview of the subcommands, then a table of each one's arguments."""
    commands = _subcommands(parser)
    lines = [HEADER, "| command | what it does |", "| --- | --- |"]
    lines += [f"| [`fedforge {name}`](#fedforge-{name}) | {_cell(help_)} |" for name, (help_, _) in commands.items()]
    for name, (help_, sub) in commands.items():
        lines += ["", f"## fedforge {name}", "", _cell(help_) + ".", "", "| argument | meaning |", "| --- | --- |"]
        lines += [
            f"| {_flag(action)} | {_help(action)} |"
            for action in sub._actions
            if not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).parent.parent / "src"))  # the checkout's fedforge, installed or not
    from fedforge.cli import build_parser

    text = render(build_parser())
    if argv[1:] == ["--check"]:
        if PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
