"""CLI commands for branches and routes: one SDK call each, rendered as text or --json."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import click

from .base import as_json, client, command, from_spec, ttl_option
from .hot import HOT
from .render import branch_tree, emit_json, out, space_line

if TYPE_CHECKING:
    from ..api.client import Client


# -- branches ------------------------------------------------------------------------
@click.group()
def branch() -> None:
    """Create, list, reset and delete branches."""


# the hot commands are declared in cli/hot.py (their fast path runs without click)
for _spec in HOT.values():
    branch.add_command(from_spec(_spec))


@branch.command("create-ci")
@click.argument("feature")
@click.option("--parent", default=None, help="Branch to fork (default: the entry tier).")
@ttl_option
@command
@click.pass_context
def branch_create_ci(ctx: click.Context, feature: str, parent: str | None, ttl: str | None) -> None:
    """Create the CI branch of FEATURE, ci-FEATURE (a name the platform reserves, so it makes it)."""
    b = client(ctx).create_ci_branch(feature, parent, ttl=ttl)
    emit_json(b) if as_json() else out.print(f"created {b['name']!r} from {b['parent']!r} in {b['elapsed_ms']} ms")


@branch.command("list")
@click.option("--no-bytes", is_flag=True, help="Skip measuring each branch's own bytes.")
@click.option("--prefix", default="", help="Only branches whose name starts with this.")
@click.option("--names", is_flag=True, help="Only the names, one per line (for scripts).")
@click.option("--mine", is_flag=True, help="Only the branches you (the token's principal) created.")
@command
@click.pass_context
def branch_list(ctx: click.Context, no_bytes: bool, prefix: str, names: bool, mine: bool) -> None:
    """The branch tree with kind, compute state, age, TTL and own bytes."""
    data = client(ctx).list_branches(with_bytes=not (no_bytes or names))
    data = [b for b in data if b["name"].startswith(prefix)]
    if mine:
        me = client(ctx).whoami()["name"]
        data = [b for b in data if b["creator"] == me]
    if as_json():
        emit_json(data)
    elif names:
        for b in data:
            click.echo(b["name"])
    else:
        out.print(branch_tree(data))
        space_line(client(ctx).space())


@branch.command("url")
@click.argument("name")
@click.option("--database", default="postgres", show_default=True)
@click.option("--direct", is_flag=True, help="The compute's own port instead of the proxy (platform engineers).")
@click.option("--sslmode", type=click.Choice(["disable", "prefer", "require", "verify-ca", "verify-full"]),
              default=None, help="TLS to the proxy; verify-* also fetch the platform's CA into ~/.config/tierbase.")
@click.option("--pooled", is_flag=True, help="Transaction pooling (PgBouncer behind the proxy's pooled port): "
              "for many short connections; no session state across transactions.")
@command
@click.pass_context
def branch_url(ctx: click.Context, name: str, database: str, direct: bool, sslmode: str | None,
               pooled: bool) -> None:
    """A postgresql:// URL for NAME with your own credentials (through the proxy, stable)."""
    sdk = client(ctx)
    url = sdk.branch_url(name, database, direct, sslmode=sslmode, pooled=pooled)
    if sslmode in ("verify-ca", "verify-full"):
        url += f"&sslrootcert={quote(str(_save_ca(sdk)), safe='/')}"
    emit_json({"name": name, "url": url}) if as_json() else click.echo(url)


def _save_ca(sdk: Client) -> Path:
    """The platform's CA certificate, kept where the caller's own libpq can read it."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tierbase"
    base.mkdir(parents=True, exist_ok=True)
    path = base / "ca.crt"
    path.write_text(sdk.tls_ca()["pem"])
    return path


# -- routes --------------------------------------------------------------------------
@click.group()
def route() -> None:
    """Stable names clients connect to, and where they point."""


@route.command("list")
@command
@click.pass_context
def route_list(ctx: click.Context) -> None:
    data = client(ctx).list_routes()
    if as_json():
        emit_json(data)
        return
    for r in data:
        out.print(f"{r['route']:<30} -> {r['branch']}" + ("" if r["movable"] else "  (own)"))


@route.command("set")
@click.argument("route_name", metavar="ROUTE")
@click.argument("branch_name", metavar="BRANCH")
@click.option("--drain", type=float, default=0.0, help="Seconds to let old sessions finish before ending them.")
@command
@click.pass_context
def route_set(ctx: click.Context, route_name: str, branch_name: str, drain: float) -> None:
    """Point ROUTE at BRANCH atomically; sessions on the old target are ended."""
    data = client(ctx).set_route(route_name, branch_name, drain)
    if as_json():
        emit_json(data)
    else:
        out.print(f"{route_name} -> {branch_name} (was {data.get('previous')}); "
                  f"{data.get('sessions_ended', 0)} session(s) ended")
