"""A command declared once: its arguments, options, help and what it does, without click.

click costs ~45 ms to import on this machine's kind, more than half of what `tierbase branch create`
may take end to end. The commands that agents and scripts call in loops are therefore declared here as
plain data: ``base.from_spec`` builds the click command from a declaration (``--help``, completion, every
argv the fast parser does not take), and ``cli/fast.py`` parses the same declaration without click. A
declaration is the only list of a command's options: nothing is written twice.
"""

from __future__ import annotations

import os

from ..settings import setting

TYPE_CHECKING = False  # not typing's: this module is on the path of every fast command
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..api.client import Client

    #: what a command does: (the SDK client, --json given, the parsed values by parameter name)
    Run = Callable[..., None]


class Param:
    """An argument (``opt`` empty) or an option of a command; ``flag``: an option without a value."""

    __slots__ = ("default", "env", "flag", "help", "name", "opt")

    def __init__(self, name: str, opt: str = "", *, flag: bool = False, default: str | None = None,
                 help: str = "", env: str | None = None) -> None:
        self.name, self.opt, self.flag, self.default, self.help = name, opt, flag, default, help
        #: the environment variable that gives the value when the argv does not (click's envvar)
        self.env = env

    def initial(self) -> Any:
        """The value when the argv does not give it (click's: False for a flag, else the default)."""
        return False if self.flag else self.default


def argument(name: str) -> Param:
    return Param(name)


def option(name: str, opt: str, help: str, default: str | None = None) -> Param:
    return Param(name, opt, default=default, help=help)


def flag(name: str, opt: str, help: str) -> Param:
    return Param(name, opt, flag=True, help=help)


class Command:
    """``tierbase GROUP NAME ...``: parameters in the order of the usage line and --help, and ``run``.

    ``run(sdk, json, **values)`` makes the one SDK call and renders its answer (text, or JSON when
    ``json``); a TierbaseError it raises is rendered by the one error path (render.fail)."""

    __slots__ = ("doc", "group", "name", "params", "run")

    def __init__(self, group: str, name: str, run: Run, *params: Param, doc: str) -> None:
        self.group, self.name, self.run, self.params, self.doc = group, name, run, params, doc

    def call(self, sdk: Client, as_json: bool, values: dict[str, Any]) -> None:
        self.run(sdk, as_json, **values)


#: the root group's options (cli/base.py's ``_root``): which platform a command talks to
HOME = Param("home", "--home", help="Data dir of the platform (env TIERBASE_HOME).", env=setting("home").env)
API = Param("api", "--api", help="URL of the service's API, e.g. http://127.0.0.1:25430 (env TIERBASE_API); with "
            "TIERBASE_TOKEN, for clients that cannot read the data dir (other OS users, agents).",
            env=setting("api").env)
ROOT = (HOME, API)
#: every command has --json (base.command adds it to a click command; cli/fast.py parses it)
JSON = flag("as_json", "--json", "Print machine-readable JSON.")
#: shared by several commands (base.ttl_option is this one, built by click)
TTL = option("ttl", "--ttl", "Delete automatically after this long (e.g. 2h, 7d).")


def where(home: str | None, api: str | None) -> dict[str, Any]:
    """What the root keeps of --home and --api (``ctx.obj`` of base's ``_root``; cli/fast.py the same)."""
    return {"home": os.path.abspath(home) if home else None, "api": api or None}


def open_client(where: dict[str, Any]) -> Client:
    """The SDK client a command talks through, for the root's ``where`` (the default data dir if none)."""
    from ..api.client import Client
    from ..home import default_home

    home = where.get("home")
    return Client(default_home() if home is None else home, url=where.get("api"))
