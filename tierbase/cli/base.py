"""What every CLI command shares: the root group, --json and the one error path, the SDK client,
option bundles; and the one table of commands.

Registration is eager and explicit: ``root()`` adds every command named in ``COMMANDS`` to the root
group, so ``from tierbase.cli.main import cli`` sees them all. That stays cheap because command modules
import only click and this module at the top; what a command needs (the SDK, the workflow kit, git)
it imports when it runs. `tierbase --version` does not even get here (cli/main.py).
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import __version__
from ..errors import TierbaseError
from .spec import API, HOME, JSON, TTL, Command, Param, open_client, where

if TYPE_CHECKING:
    from ..api.client import Client

F = Callable[..., Any]

#: command name -> "module:object" (every command of `tierbase`; --help lists them by name)
COMMANDS = {
    "up": "tierbase.cli.platform:up",
    "down": "tierbase.cli.platform:down",
    "status": "tierbase.cli.platform:status",
    "import": "tierbase.cli.platform:import_",
    "tls": "tierbase.cli.platform:tls",
    "branch": "tierbase.cli.branches:branch",
    "route": "tierbase.cli.branches:route",
    "principal": "tierbase.cli.governance:principal",
    "policy": "tierbase.cli.governance:policy",
    "audit": "tierbase.cli.governance:audit",
    "masking": "tierbase.cli.masking:masking",
    "migrate": "tierbase.cli.migrate:migrate",
    "promote": "tierbase.cli.migrate:promote",
    "rollback": "tierbase.cli.migrate:rollback",
    "restore": "tierbase.cli.pitr:restore",
    "history": "tierbase.cli.pitr:history",
    "promotions": "tierbase.cli.migrate:promotions",
    "rollbacks": "tierbase.cli.migrate:rollbacks",
    "diff": "tierbase.cli.migrate:diff",
    "git": "tierbase.cli.scm:git_group",
    "ci": "tierbase.cli.scm:ci_group",
    "init": "tierbase.cli.workflow:init",
    "flow": "tierbase.cli.workflow:flow_group",
    "tdd": "tierbase.cli.workflow:tdd_group",
    "mcp": "tierbase.cli.mcp:mcp",
    "session": "tierbase.cli.session:session",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(HOME.opt, HOME.name, envvar=HOME.env, type=click.Path(file_okay=False, readable=False), default=None,
              help=HOME.help)
@click.option(API.opt, API.name, envvar=API.env, default=None, metavar="URL", help=API.help)
@click.version_option(version=__version__, prog_name="tierbase")
@click.pass_context
def _root(ctx: click.Context, home: str | None, api: str | None) -> None:
    """tierbase: copy-on-write branches of a real PostgreSQL."""
    ctx.obj = where(home, api)


def root(only: str | None = None) -> click.Group:
    """The root group with every command of ``COMMANDS`` registered (once); with ``only``, that one.

    ``only`` is for the process entry point (cli/main.py), which runs one command: it skips building the
    other commands' click objects. Whoever imports the group gets it whole."""
    for name, spec in COMMANDS.items():
        if (only is None or name == only) and name not in _root.commands:
            module, _, attr = spec.partition(":")
            got = getattr(importlib.import_module(module), attr)
            if not isinstance(got, click.Command):
                raise TypeError(f"{spec} is not a click command")
            _root.add_command(got, name)
    return _root


def invoked(args: list[str]) -> str | None:
    """The command an argv names, if it is one of the table (past the root's own options); else None."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in (HOME.opt, API.opt):
            i += 2
        elif arg.startswith((f"{HOME.opt}=", f"{API.opt}=")):
            i += 1
        else:
            return arg if arg in COMMANDS else None
    return None


def command(fn: F) -> F:
    """Give a command --json and the one error path: message + hint on stderr, exit 1 or 2."""

    @param_of(JSON)
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        ctx.meta["json"] = as_json
        try:
            fn(*args, **kwargs)
        except TierbaseError as e:
            from .render import fail

            sys.exit(fail(e, as_json))

    return wrapper


def from_spec(spec: Command) -> click.Command:
    """The click command of a declaration (cli/spec.py): the same parameters, help and body that
    cli/fast.py runs without click, with --json and the error path of ``command``."""

    @click.pass_context
    def body(ctx: click.Context, /, **values: Any) -> None:
        spec.call(client(ctx), as_json(), values)

    body.__doc__ = spec.doc
    f: F = command(body)
    for p in reversed(spec.params):
        f = param_of(p)(f)
    return click.command(spec.name)(f)


def param_of(p: Param) -> Callable[[F], F]:
    """click's decorator for one declared parameter."""
    if not p.opt:
        return click.argument(p.name)
    if p.flag:
        return click.option(p.opt, p.name, is_flag=True, help=p.help)
    return click.option(p.opt, p.name, default=p.default, help=p.help)


# -- option bundles shared by several commands ------------------------------------------------
repo_option = click.option("--repo", type=click.Path(file_okay=False, exists=True), default=".",
                           show_default=True, help="The app repo (any directory inside it).")
ttl_option = param_of(TTL)
migrations_dir_option = click.option("--dir", "migrations_dir", type=click.Path(file_okay=False), default=None,
                                     help="Migrations directory (default: [project] migrations of tierbase.toml).")


def as_json() -> bool:
    return bool(click.get_current_context().meta.get("json"))


def home_of(ctx: click.Context) -> Path:
    """The data dir: --home / TIERBASE_HOME, else the default (looked up only when a command needs it)."""
    home = ctx.find_root().obj.get("home")
    if home is None:
        from ..home import default_home

        return default_home()
    return Path(home)


def client(ctx: click.Context) -> Client:
    """One SDK client per command (so that acting as the data dir's owner is said once)."""
    root = ctx.find_root()
    if root.obj.get("client") is None:
        root.obj["client"] = open_client(root.obj)
    return root.obj["client"]  # type: ignore[no-any-return]
