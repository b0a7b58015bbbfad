"""Rendering helpers: plain text, a rich table only where one is drawn, or JSON with --json.

rich costs tens of milliseconds to import, more than most commands take end to end, and click almost
as much: text goes out through ``echo`` (click.echo's rule for text, without click, so that the fast
path of cli/fast.py prints byte for byte what the click command prints), and rich is imported by the
few renderers that draw (the branch tree).
"""

from __future__ import annotations

import json
import re
import sys

TYPE_CHECKING = False  # not typing's: the fast path (cli/fast.py) renders through this module
if TYPE_CHECKING:
    from typing import Any

    from rich.console import Console
    from rich.table import Table

    from ..errors import TierbaseError

#: click.echo strips these (ANSI styles) from text written to anything but a terminal
_ANSI = re.compile(r"\033\[[;?0-9]*[a-zA-Z]")


def echo(text: str, err: bool = False) -> None:
    """click.echo(text, err=err) for text: a newline added, ANSI styles stripped unless the stream is a
    terminal, flushed."""
    stream = sys.stderr if err else sys.stdout
    if not stream.isatty():
        text = _ANSI.sub("", text)
    stream.write(text + "\n")
    stream.flush()


def fail(e: TierbaseError, as_json: bool) -> int:
    """The one error path of every command: the envelope on stdout with --json, ``Error: <what
    happened>. <what to do>.`` on stderr; returns the exit code (1 error, 2 refused)."""
    if as_json:
        emit_json({"error": e.to_dict()})
    echo(f"Error: {e.message}." + (f" {e.hint}." if e.hint else ""), err=True)
    return e.exit_code


class Printer:
    """``out.print(text)`` as before; text is printed as it is (no markup), renderables through rich."""

    def __init__(self, stderr: bool = False) -> None:
        self.stderr = stderr
        self._console: Console | None = None

    def print(self, obj: Any, *, markup: bool = False) -> None:
        if isinstance(obj, str):
            echo(obj, err=self.stderr)
            return
        self.console.print(obj)

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self.stderr, highlight=False, soft_wrap=True)
        return self._console


out = Printer()
err = Printer(stderr=True)


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def branch_tree(branches: list[dict[str, Any]]) -> Table:
    """Branches as a table whose name column draws the parent/child tree."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("branch", no_wrap=True)
    for col in ("kind", "compute", "age", "expires in", "own bytes", "port"):
        table.add_column(col, no_wrap=True)
    kids: dict[str | None, list[dict[str, Any]]] = {}
    names = {b["name"] for b in branches}
    for b in branches:
        kids.setdefault(b["parent"] if b["parent"] in names else None, []).append(b)

    def walk(parent: str | None, prefix: str) -> None:
        items = kids.get(parent, [])
        for i, b in enumerate(items):
            last = i == len(items) - 1
            glyph = "" if parent is None else ("└─ " if last else "├─ ")
            flags = " [protected]" if b.get("protected") else ""
            compute = "suspended" if b["compute"] == "stopped" else b["compute"]
            table.add_row(escape(f"{prefix}{glyph}{b['name']}{flags}"), b["kind"], compute, b["age"],
                          b.get("expires_in") or "-", human_bytes(b.get("own_bytes")), str(b["port"]))
            walk(b["name"], prefix + ("" if parent is None else ("   " if last else "│  ")))

    walk(None, "")
    return table


def branch_details(b: dict[str, Any]) -> None:
    keys = ("name", "parent", "kind", "state", "compute", "pid", "port", "protected", "creator", "age",
            "fork_lsn", "expires_in", "own_bytes", "driver", "sessions")
    for k in keys:
        if k in b:
            value = human_bytes(b[k]) if k == "own_bytes" else b[k]
            out.print(f"{k:>10}: {'-' if value is None else value}")


def space_line(space: dict[str, Any]) -> None:
    """The pool's free space (under the branch tree, in status); a warning on stderr when it is low."""
    out.print(f"pool: {space['free'] / 1024 ** 2:,.0f} MiB free of {space['total'] / 1024 ** 2:,.0f} MiB "
              f"(reserve for tiers {space['reserve'] / 1024 ** 2:,.0f} MiB)")
    if space.get("warning"):
        echo(f"Warning: {space['warning']}", err=True)
