"""What every CLI command shares: the root group, --json and the one error path, the SDK client.

Commands are registered explicitly: the root group names each command's module and object
(``COMMANDS``) and imports it when it is invoked (or listed by --help), so `tierbase --version` and
every command import only what they use. The idea is click's documented lazy group.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import TierbaseError

if TYPE_CHECKING:
    from ..api.client import Client

F = Callable[..., Any]

#: command name -> "module:object" of the commands defined outside main.py
COMMANDS = {
    "principal": "tierbase.cli.governance:principal",
    "policy": "tierbase.cli.governance:policy",
    "audit": "tierbase.cli.governance:audit",
    "migrate": "tierbase.cli.migrate:migrate",
    "promote": "tierbase.cli.migrate:promote",
    "rollback": "tierbase.cli.migrate:rollback",
    "promotions": "tierbase.cli.migrate:promotions",
    "rollbacks": "tierbase.cli.migrate:rollbacks",
    "diff": "tierbase.cli.migrate:diff",
    "git": "tierbase.cli.scm:git_group",
    "ci": "tierbase.cli.scm:ci_group",
    "init": "tierbase.cli.workflow:init",
    "flow": "tierbase.cli.workflow:flow_group",
    "tdd": "tierbase.cli.workflow:tdd_group",
}


class LazyGroup(click.Group):
    """A group whose commands from other modules are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            module, _, attr = COMMANDS[cmd_name].partition(":")
            got = getattr(importlib.import_module(module), attr)
            if not isinstance(got, click.Command):
                raise TypeError(f"{COMMANDS[cmd_name]} is not a click command")
            self.add_command(got, cmd_name)
        return super().get_command(ctx, cmd_name)


def command(fn: F) -> F:
    """Give a command --json and the one error path: message + hint on stderr, exit 1 or 2."""

    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        ctx.meta["json"] = as_json
        try:
            fn(*args, **kwargs)
        except TierbaseError as e:
            from .render import emit_json, err

            if as_json:
                emit_json({"error": e.to_dict()})
            err.print(f"Error: {e.message}." + (f" {e.hint}." if e.hint else ""), markup=False)
            sys.exit(e.exit_code)

    return wrapper


def as_json() -> bool:
    return bool(click.get_current_context().meta.get("json"))


def home_of(ctx: click.Context) -> Path:
    return Path(ctx.obj["home"])


def client(ctx: click.Context) -> Client:
    """One SDK client per command (so that acting as the data dir's owner is said once)."""
    from ..api.client import Client

    root = ctx.find_root()
    if root.obj.get("client") is None:
        root.obj["client"] = Client(home_of(ctx), url=root.obj.get("api"))
    return root.obj["client"]  # type: ignore[no-any-return]
