"""The hot commands (cli/hot.py) without click: parse the argv from their declarations, call, render.

`tierbase branch create` must end within 100 ms, and importing click alone takes about half of that on
this machine's kind. The parser here takes only what it is sure click reads the same way: the root's
``--home``/``--api`` before the group, then the command's arguments and options in any order, each
option once, as ``--opt value`` (the next token, whatever it is, as click takes it) or ``--opt=value``.
Anything else (``--help``, an unknown or repeated option, a missing value, a wrong number of
arguments, shell completion, a --home that is a file) is left to click, which then parses, explains
and exits as it always did: a usage error or its exit code never comes from here. What runs is the
declaration's own body, with the SDK client made from the same values as ``base.client``, and the
same error path (render.fail).
tests/test_cli_fast.py holds both parsers to the same answers.
"""

from __future__ import annotations

import os
import sys

from .hot import HOT
from .spec import JSON, ROOT, open_client, where

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .spec import Command, Param

#: what parse() answers: the declaration, the root's values (home, api), the command's values, --json
Parsed = tuple["Command", dict[str, "Any"], dict[str, "Any"], bool]


def parse(args: list[str]) -> Parsed | None:
    """What ``args`` asks for, if it is a hot command this parser is sure of; else None (click's turn)."""
    root: dict[str, Any] = {}
    i = _options(ROOT, args, root, stop_at_argument=True)
    if i is None or len(args) < i + 2:
        return None
    cmd = HOT.get((args[i], args[i + 1]))
    if cmd is None:
        return None
    values: dict[str, Any] = {}
    params = (*cmd.params, JSON)
    if _options(params, args[i + 2:], values, stop_at_argument=False) is None:
        return None
    for p in ROOT:  # click's envvar: the environment's value when the argv gives none (empty = unset)
        if root.get(p.name) is None and p.env:
            root[p.name] = os.environ.get(p.env) or None
    if root["home"] and os.path.isfile(root["home"]):  # --home must be a directory: click.Path says so
        return None
    for p in params:
        values.setdefault(p.name, p.initial())
    return cmd, root, values, bool(values.pop(JSON.name))


def _options(params: tuple[Param, ...], tokens: list[str], into: dict[str, Any], *,
             stop_at_argument: bool) -> int | None:
    """Read ``tokens`` into ``into`` by ``params``; where the reading stopped (at the first argument if
    ``stop_at_argument``), or None when click should read them."""
    opts = {p.opt: p for p in params if p.opt}
    arguments = [p for p in params if not p.opt]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("-"):
            if stop_at_argument:
                return i
            if not arguments:
                return None  # one argument too many: click's usage error
            into[arguments.pop(0).name] = tok
            i += 1
            continue
        key, eq, value = tok.partition("=")
        p = opts.get(key)
        if p is None or p.name in into:  # -h, --help, --, an unknown option, one given twice
            return None
        if p.flag:
            if eq:  # `--start=yes`: click refuses it
                return None
            into[p.name] = True
            i += 1
            continue
        if not eq:
            if i + 1 == len(tokens):
                return None  # a missing value: click's usage error
            value = tokens[i + 1]  # whatever it is, as click's parser takes it (`--at -5m`)
            i += 1
        into[p.name] = value
        i += 1
    return None if arguments and not stop_at_argument else i


def run(args: list[str]) -> bool:
    """Run ``args`` if parse() takes it (exits non-zero on an error, as click's command does); False if
    click must."""
    if os.environ.get("_TIERBASE_COMPLETE"):  # click's shell completion
        return False
    parsed = parse(args)
    if parsed is None:
        return False
    cmd, root, values, as_json = parsed
    from ..errors import TierbaseError

    try:
        cmd.call(open_client(where(root["home"], root["api"])), as_json, values)
    except TierbaseError as e:
        from .render import fail

        sys.exit(fail(e, as_json))
    except (KeyboardInterrupt, EOFError):  # as click's main: a blank line, "Aborted!", exit 1
        print("\nAborted!", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # the reader went away (`| head`): quietly, exit 1, as click's main
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    return True
