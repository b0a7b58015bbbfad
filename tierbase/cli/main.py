"""`tierbase` CLI. Exit codes: 0 ok, 1 error, 2 refused by a rule (with the reasons).

This module is the console script's entry point and stays tiny: `tierbase --version` answers
without importing click, and so do the hot commands (cli/hot.py: `branch create`, `delete`, ...)
when cli/fast.py can parse the argv; every other call builds the root group (cli/base.py, which
registers every command) and runs it. ``from tierbase.cli.main import cli`` gives that group.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: `tierbase --version` imports nothing it does not print
if TYPE_CHECKING:
    from typing import Any

    import click

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:  # what scripts and agents ask first: no reason to load the whole CLI
        from .. import __version__

        print(f"tierbase, version {__version__}")
        return
    from .fast import run

    if run(args):  # a hot command (cli/hot.py) the fast parser is sure of: done without importing click
        return
    from .base import invoked, root

    # the one command this process runs, if the table names it (--help and typos see them all)
    root(only=invoked(args))(args=args, prog_name="tierbase")


def __getattr__(name: str) -> Any:
    if name == "cli":
        from .base import root

        return root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    cli: click.Group

if __name__ == "__main__":
    main()
