"""The CLI talks HTTP: importing it must not pull in the facade, psycopg or the API server."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from tierbase.cli.base import COMMANDS

HEAVY = ("psycopg", "fastapi", "httpx", "h11", "tierbase.app", "uvicorn", "rich", "jsonschema", "pglast")


def loaded_after(code: str, modules: tuple[str, ...] = HEAVY) -> list[str]:
    probe = f"import json, sys; {code}; print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return list(json.loads(got.stdout.strip().splitlines()[-1]))  # the last line: what was loaded


def test_the_cli_imports_neither_psycopg_nor_fastapi_nor_httpx() -> None:
    code = ("import sys, tierbase.cli.main; "
            "print(sorted(m for m in ('psycopg', 'fastapi', 'httpx', 'tierbase.app', 'uvicorn') if m in sys.modules))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]", got.stdout


def test_the_entry_point_imports_not_even_click_and_version_needs_nothing_more() -> None:
    assert loaded_after("import tierbase.cli.main", ("click", *HEAVY)) == []
    assert loaded_after("import tierbase.cli.main as m; m.main(['--version'])", ("click", *HEAVY)) == []


def test_a_command_imports_only_the_light_transport() -> None:
    """What `tierbase branch create` loads: every command registered, the SDK client, api/wire.py; no httpx, rich."""
    assert loaded_after("from tierbase.cli.main import cli; import tierbase.api.client, tierbase.api.wire") == []


def test_every_command_is_registered_without_importing_its_module_first() -> None:
    from tierbase.cli.main import cli

    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    for expected in ("up", "down", "branch", "route", "tls", "principal", "policy", "audit", "migrate", "promote",
                     "rollback", "diff", "git", "ci", "init", "flow", "tdd"):
        assert expected in names
        assert isinstance(cli.get_command(ctx, expected), click.Command), expected
    # eager: the root group holds every command of the table, nothing is resolved on lookup
    assert sorted(cli.commands) == sorted(COMMANDS)


def test_the_process_builds_only_the_command_it_runs() -> None:
    run = ("import tierbase.cli.main as m\ntry:\n    m.main(['--home', '/nonexistent', 'branch', '--help'])\n"
           "except SystemExit:\n    pass")
    modules = ("tierbase.cli.branches", "tierbase.cli.workflow", "tierbase.cli.scm")
    assert loaded_after(f"exec({run!r})", modules) == ["tierbase.cli.branches"]


@pytest.mark.parametrize(("argv", "name"), [
    (["branch", "create", "x"], "branch"), (["--home", "/h", "--api=http://x", "init"], "init"),
    (["--home=/h", "up"], "up"), (["--help"], None), (["brnch"], None), ([], None),
])
def test_the_command_an_argv_names(argv: list[str], name: str | None) -> None:
    from tierbase.cli.base import invoked

    assert invoked(argv) == name


def test_a_hot_command_runs_without_click_even_when_it_fails() -> None:
    """`branch create` parsed by cli/fast.py: neither the request nor the error path loads click."""
    run = ("import tierbase.cli.main as m\ntry:\n    m.main(['--api', 'http://127.0.0.1:9', 'branch', 'create', 'x'])\n"
           "except SystemExit as e:\n    assert e.code == 1, e.code")
    light = ("click", "typing", "dataclasses", "inspect", *HEAVY)
    at_start = set(loaded_after("pass", light))  # a site hook may load some itself (this container's loads typing)
    assert set(loaded_after(f"exec({run!r})", light)) - at_start == set()
