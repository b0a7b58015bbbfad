"""CLI commands for migrations, promotion, rollback and schema diff."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import Refused
from .base import as_json, client, command
from .base import migrations_dir_option as DIR
from .render import emit_json, out


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


@click.group()
def migrate() -> None:
    """Versioned SQL migrations: status, apply, new, lint, verify."""


@migrate.command("status")
@click.option("--branch", default=None, help="Branch or tier (default: the entry tier).")
@DIR
@command
@click.pass_context
def migrate_status(ctx: click.Context, branch: str | None, migrations_dir: str | None) -> None:
    s = client(ctx).migrate_status(branch, _abs(migrations_dir))
    if as_json():
        emit_json(s)
        return
    out.print(f"branch {s['branch']}: {len(s['applied'])} applied, {len(s['pending'])} pending")
    for m in s["pending"]:
        out.print(f"  pending  {m['label']}")
    for d in s.get("drift", []):
        out.print(f"  DRIFT    {d['label']}: the file changed after it was applied")


@migrate.command("apply")
@click.option("--branch", required=True, help="The branch to migrate (tiers change only through promote).")
@DIR
@command
@click.pass_context
def migrate_apply(ctx: click.Context, branch: str, migrations_dir: str | None) -> None:
    got = client(ctx).migrate_apply(branch, _abs(migrations_dir))
    if as_json():
        emit_json(got)
        return
    for a in got["applied"]:
        out.print(f"applied V{a['version']:04d}__{a['name']} in {a['duration_ms']} ms")
    if not got["applied"]:
        out.print(f"{branch}: nothing to apply")


@migrate.command("new")
@click.argument("name")
@click.option("--undo", is_flag=True, help="Also write the undo file.")
@DIR
@command
@click.pass_context
def migrate_new(ctx: click.Context, name: str, undo: bool, migrations_dir: str | None) -> None:
    from ..migrate.files import new_migration

    target = migrations_dir or _project_migrations()
    paths = new_migration(Path(target), name, with_undo=undo)
    if as_json():
        emit_json({"created": [str(p) for p in paths]})
        return
    for p in paths:
        out.print(f"wrote {p}")


def _project_migrations() -> str:
    """[project] migrations of the tierbase.toml in the current directory (new works offline)."""
    import tomllib

    try:
        with open("tierbase.toml", "rb") as fh:
            return str(tomllib.load(fh).get("project", {}).get("migrations", "db/migrations"))
    except OSError:
        return "db/migrations"


@migrate.command("lint")
@DIR
@command
@click.pass_context
def migrate_lint(ctx: click.Context, migrations_dir: str | None) -> None:
    """squawk findings with file and line; exit 2 when a blocking rule fires."""
    rep = client(ctx).migrate_lint(_abs(migrations_dir))
    if as_json():
        emit_json(rep)
    else:
        for f in rep["findings"]:
            out.print(f"{f['file']}:{f['line']}: {f['level']} {f['rule']}: {f['message']}", markup=False)
        out.print(f"{len(rep['findings'])} finding(s), {len(rep['blocking'])} blocking")
    if rep["blocking"]:
        raise Refused(f"{len(rep['blocking'])} blocking lint finding(s)", "Fix them or change [migrations] lint_block")


@migrate.command("verify")
@click.option("--parent", default=None, help="Branch to verify on a throwaway copy of (default: the entry tier).")
@DIR
@command
@click.pass_context
def migrate_verify(ctx: click.Context, parent: str | None, migrations_dir: str | None) -> None:
    """Apply pending migrations on a throwaway branch: cleanly, idempotently, reversibly."""
    rep = client(ctx).migrate_verify(parent, _abs(migrations_dir))
    if as_json():
        emit_json(rep)
    else:
        for check, verdict in rep["checks"].items():
            out.print(f"{check:>12}: {verdict}", markup=False)
    if not rep["ok"]:
        raise Refused("migrations did not verify: " + "; ".join(rep["problems"]), "Fix the migrations and verify again")


@click.command()
@click.argument("tier")
@click.option("--from", "source", default=None, help="Source tier or feature branch (default: the child tier).")
@click.option("--rehearse", is_flag=True,
              help="First apply them to an O(1) branch of TIER under a write load; refuse over the tier's max_stall.")
@DIR
@command
@click.pass_context
def promote(ctx: click.Context, tier: str, source: str | None, rehearse: bool, migrations_dir: str | None) -> None:
    """Apply to TIER the migrations validated on the tier below it (snapshot first; rollback on failure)."""
    rec = client(ctx).promote(tier, source, _abs(migrations_dir), rehearse=rehearse)
    if as_json():
        emit_json(rec)
        return
    out.print(f"promoted {rec['source']} -> {tier} (#{rec['id']}): {', '.join(rec['migrations'])} "
              f"in {rec['duration_ms']} ms; snapshot {rec['snapshot']}")


@click.command()
@click.argument("tier")
@click.option("--to", "to", default=None, help="Snapshot to return to (default: the last pre-promotion snapshot).")
@click.option("--discard-writes", is_flag=True,
              help="Do not replay the writes made since the snapshot (they stay on the replaced branch only).")
@click.option("--yes", is_flag=True, help="Confirm a rollback past several promotions or of a rolled-back tier.")
@click.option("--dry-run", is_flag=True, help="Show the snapshot, its age and what would be undone; change nothing.")
@command
@click.pass_context
def rollback(ctx: click.Context, tier: str, to: str | None, discard_writes: bool, yes: bool, dry_run: bool) -> None:
    """Repoint TIER's route to a pre-promotion snapshot, replaying the writes made since; the replaced
    branch is kept under a route of its own."""
    rec = client(ctx).rollback(tier, to, discard_writes=discard_writes, yes=yes, dry_run=dry_run)
    left = rec.get("left_sql")
    if left and not dry_run:
        path = Path(f"{rec['replaced_route']}-left.sql")
        path.write_text(left)
        rec["left_sql_file"] = str(path.absolute())
    if as_json():
        emit_json(rec)
        return
    age = f"{rec['snapshot_age_s']:.0f} s old"
    undone = ", ".join(rec["migrations_undone"]) or "no promoted migration"
    if dry_run:
        out.print(f"rollback of {tier} would return to {rec['snapshot']} ({age}), served by {rec['serving']} now; "
                  f"undoes {undone}", markup=False)
        for why in rec["why_confirm"]:
            out.print(f"  needs --to {rec['snapshot']} --yes: {why}", markup=False)
        return
    out.print(f"{tier} now served by {rec['serving_now']} (from {rec['snapshot']}, {age}); undid {undone}; "
              f"first query after {rec['seconds_to_first_query']} s", markup=False)
    if rec["discard_writes"]:
        click.echo(f"WARNING: writes made on {rec['replaced']} since the snapshot were DISCARDED from {tier}", err=True)
    else:
        out.print(f"writes replayed: {rec['rows_replayed']} rows, left on the replaced branch: {rec['rows_left']} "
                  f"(+{rec['time_added_ms']} ms, route held {rec['hold_ms']} ms, "
                  f"by {rec.get('replay_method') or 'diff'})", markup=False)
        if rec.get("replay_fallback"):
            out.print(f"  data diff instead of logical decoding: {rec['replay_fallback']}", markup=False)
    if rec.get("left_sql_file"):
        out.print(f"SQL for the rows left: {rec['left_sql_file']}", markup=False)
    out.print(rec["hint"], markup=False)


@click.command()
@click.option("--tier", default=None)
@command
@click.pass_context
def promotions(ctx: click.Context, tier: str | None) -> None:
    """Promotion history: who, when, from/to, migrations, snapshot, result, duration."""
    rows = client(ctx).promotions(tier)
    if as_json():
        emit_json(rows)
        return
    for r in rows:
        out.print(f"#{r['id']:<4} {r['source']} -> {r['tier']:<12} {r['status']:<11} by {r['actor']:<12} "
                  f"{r['duration_ms'] or '-'} ms  {', '.join(r['migrations'])}  {r['reason'] or ''}", markup=False)


@click.command()
@click.option("--tier", default=None)
@command
@click.pass_context
def rollbacks(ctx: click.Context, tier: str | None) -> None:
    """Rollbacks: which snapshot, what they replaced (and its route), rows replayed and left, time added."""
    rows = client(ctx).rollbacks(tier)
    if as_json():
        emit_json(rows)
        return
    for r in rows:
        kept = f"kept as {r['replaced_route']}" if r["replaced_route"] else ""
        writes = "writes DISCARDED" if r["discard_writes"] else (
            f"{r['rows_replayed']} replayed ({r.get('replay_method') or 'diff'}), {r['rows_left']} left")
        out.print(f"#{r['rollback']:<4} {r['tier']:<12} {r['kind']:<9} {r['status']:<9} -> {r['snapshot']} "
                  f"({r['serving_now']}); {r['replaced']} {kept}; {writes}; +{r['time_added_ms']} ms", markup=False)


@click.command()
@click.argument("a")
@click.argument("b", required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json", "sql"]), default="text",
              help="markdown: schema only; sql: data only (statements that make A's rows B's).")
@click.option("--data", is_flag=True, help="Compare rows by primary key instead of the schema.")
@click.option("--table", "tables", multiple=True, help="With --data: only this table (repeatable).")
@command
@click.pass_context
def diff(ctx: click.Context, a: str, b: str | None, fmt: str, data: bool, tables: tuple[str, ...]) -> None:
    """Schema diff between two branches (default: A's parent -> A); rows with --data."""
    if data or tables or fmt == "sql":
        if b is None:
            raise click.UsageError("a data diff needs two branches: tierbase diff A B --data")
        d = client(ctx).data_diff(a, b, list(tables) or None, fmt)
        if as_json() or fmt == "json":
            emit_json(d)
        else:
            click.echo(d["text"], nl=fmt != "sql")
        return
    d = client(ctx).diff(a, b, fmt)
    if as_json() or fmt == "json":
        emit_json(d)
    else:
        click.echo(d["text"])
