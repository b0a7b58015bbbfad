"""`tierbase session start|renew|end|list`: a branch leased to you, renewed by use, reclaimed when idle."""

from __future__ import annotations

from typing import Any

import click

from .base import as_json, client, command
from .render import emit_json, out


@click.group()
def session() -> None:
    """Leased branches: one per agent session, reclaimed by the sweeper when the lease runs out."""


def _show(s: dict[str, Any]) -> None:
    if as_json():
        emit_json(s)
        return
    state = f"expires in {s['expires_in']}" if s.get("live") else f"over ({s.get('end_reason') or 'gone'})"
    out.print(f"{s['id']}  branch {s['branch']}  ttl {s['ttl_seconds']}s  {state}", markup=False)


@session.command("start")
@click.option("--branch", default=None, help="Name of the leased branch (default: <you>-<hex>).")
@click.option("--parent", default=None, help="Branch off this (default: the entry tier).")
@click.option("--ttl", default=None, help="Lease, renewed by activity (default 30m), e.g. 2h.")
@command
@click.pass_context
def session_start(ctx: click.Context, branch: str | None, parent: str | None, ttl: str | None) -> None:
    """Lease a new branch; its URL comes with `tierbase branch url BRANCH`."""
    _show(client(ctx).session_start(branch, parent, ttl))


@session.command("renew")
@click.argument("session_id")
@click.option("--ttl", default=None, help="A new lease length (default: the session's own).")
@command
@click.pass_context
def session_renew(ctx: click.Context, session_id: str, ttl: str | None) -> None:
    """Push the lease's end to now + TTL."""
    _show(client(ctx).session_renew(session_id, ttl))


@session.command("end")
@click.argument("session_id")
@command
@click.pass_context
def session_end(ctx: click.Context, session_id: str) -> None:
    """End the lease and delete its branch."""
    got = client(ctx).session_end(session_id)
    emit_json(got) if as_json() else out.print(f"ended {got['id']}; deleted {', '.join(got['deleted']) or '-'}")


@session.command("list")
@click.option("--all", "everyone", is_flag=True, help="Everyone's sessions (platform engineers).")
@command
@click.pass_context
def session_list(ctx: click.Context, everyone: bool) -> None:
    """Your live sessions."""
    got = client(ctx).session_list(everyone=everyone)
    if as_json():
        emit_json(got)
        return
    for s in got:
        _show(s)
