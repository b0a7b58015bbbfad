"""The CLI talks HTTP: importing it must not pull in the facade, psycopg or the API server."""

from __future__ import annotations

import subprocess
import sys

import click


def test_the_cli_imports_neither_psycopg_nor_fastapi_nor_httpx() -> None:
    code = ("import sys, tierbase.cli.main; "
            "print(sorted(m for m in ('psycopg', 'fastapi', 'httpx', 'tierbase.app', 'uvicorn') if m in sys.modules))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]", got.stdout


def test_every_command_is_registered_without_importing_its_module_first() -> None:
    from tierbase.cli.main import cli

    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    for expected in ("up", "down", "branch", "route", "tls", "principal", "policy", "audit", "migrate", "promote",
                     "rollback", "diff", "git", "ci", "init", "flow", "tdd"):
        assert expected in names
        assert isinstance(cli.get_command(ctx, expected), click.Command), expected
