"""CLI commands of time travel: restore a tier in place, show its history."""

from __future__ import annotations

import click

from .base import as_json, client, command
from .render import emit_json, out


@click.command()
@click.argument("tier")
@click.option("--at", default=None, help="The time to go back to: ISO 8601 with a zone, or -5m, -1h30m.")
@click.option("--lsn", default=None, help="The WAL position to go back to (e.g. 0/1A2B3C4).")
@click.option("--exclusive", is_flag=True, help="Leave out a commit exactly at the target.")
@command
@click.pass_context
def restore(ctx: click.Context, tier: str, at: str | None, lsn: str | None, exclusive: bool) -> None:
    """Serve TIER as it was at a past time or LSN; the state replaced is kept as TIER-before-restore-N."""
    rec = client(ctx).restore(tier, at=at, lsn=lsn, inclusive=not exclusive)
    if as_json():
        emit_json(rec)
        return
    when = rec["target"]["time"] or f"LSN {rec['target']['lsn']}"
    out.print(f"{tier} now serves its state as of {when} (to {rec['restored_to']}), first query after "
              f"{rec['seconds_to_first_query']} s")
    out.print(rec["hint"])


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024 ** 2:.1f} MiB"


@click.command()
@click.argument("tier")
@click.option("--no-bytes", is_flag=True, help="Skip measuring each base snapshot's own bytes.")
@command
@click.pass_context
def history(ctx: click.Context, tier: str, no_bytes: bool) -> None:
    """The points of TIER's past that can be reached: window, base snapshots, archived WAL."""
    h = client(ctx).history(tier, with_bytes=not no_bytes)
    if as_json():
        emit_json(h)
        return
    out.print(f"{tier} (served by {h['serving']}): history {h['window'] or 'none'}, "
              f"base snapshot every {h['base_interval']}")
    if not h.get("oldest"):
        out.print("nothing restorable yet (no base snapshot)")
        return
    newest = h["newest"] or {}
    out.print(f"restorable from {h['oldest']['time']} (LSN {h['oldest']['lsn']}) to {newest.get('time')}")
    for b in h["bases"]:
        out.print(f"  base #{b['id']}  {b['taken']}  LSN {b['lsn']}  timeline {b['timeline']}  {b['reason']}"
                  + (f"  {_size(b.get('own_bytes'))}" if "own_bytes" in b else ""))
    wal = h["wal"]
    out.print(f"WAL archived: {wal['segments']} segments, {_size(wal['bytes'])}"
              + (f" ({wal['oldest']} .. {wal['newest']}, timelines {wal['timelines']})" if wal["segments"] else ""))
    if h["kept_states"]:
        out.print(f"kept states: {', '.join(h['kept_states'])}")
