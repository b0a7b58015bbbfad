"""CLI commands for principals, policy and the audit trail."""

from __future__ import annotations

import json
import time

import click

from ..names import parse_ttl
from .base import as_json, client, command
from .render import emit_json, out


@click.group()
def principal() -> None:
    """Humans, agents and CI: who may do what, through which token."""


@principal.command("create")
@click.argument("name")
@click.option("--role", required=True, help="platform-engineer, developer, agent, ci, or a declared role.")
@command
@click.pass_context
def principal_create(ctx: click.Context, name: str, role: str) -> None:
    """Create a principal and print its token (shown once)."""
    p = client(ctx).create_principal(name, role)
    if as_json():
        emit_json(p)
        return
    out.print(f"created {p['role']} {p['name']!r}. Its token (shown once; keep it in TIERBASE_TOKEN):")
    click.echo(p["token"])


@principal.command("list")
@command
@click.pass_context
def principal_list(ctx: click.Context) -> None:
    data = client(ctx).list_principals()
    if as_json():
        emit_json(data)
        return
    for p in data:
        out.print(f"{p['name']:<24} {p['role']:<18} {'revoked' if p['revoked'] else 'active'}")


@principal.command("revoke")
@click.argument("name")
@command
@click.pass_context
def principal_revoke(ctx: click.Context, name: str) -> None:
    """Revoke NAME's token; its requests are refused from now on."""
    p = client(ctx).revoke_principal(name)
    emit_json(p) if as_json() else out.print(f"revoked {name!r}")


@click.group()
def policy() -> None:
    """The declared config (tierbase.toml) and the decisions it leads to."""


@policy.command("show")
@command
@click.pass_context
def policy_show(ctx: click.Context) -> None:
    data = client(ctx).show_config()
    if as_json():
        emit_json(data)
        return
    out.print(f"# {data['source'] or 'default config'} (sha256 {data['sha256'][:12]}, entry tier {data['entry']})")
    click.echo(data["text"])


@policy.command("reload")
@click.option("--file", "path", type=click.Path(dir_okay=False), default=None,
              help="The tierbase.toml to load (required: the platform never re-reads a file on its own).")
@click.option("--dry-run", is_flag=True, help="Validate it and show the diff; change nothing.")
@command
@click.pass_context
def policy_reload(ctx: click.Context, path: str | None, dry_run: bool) -> None:
    """Validate and load tierbase.toml, showing the diff (platform engineers only; audited with hash and diff)."""
    sdk = client(ctx)
    # without --file nothing is uploaded: the server decides (policy first, exit 2), then refuses to
    # re-read any stored file (exit 1, naming --file)
    data = sdk.reload_config(path, dry_run=dry_run) if path else sdk.apply_config(None, dry_run=dry_run)
    if as_json():
        emit_json(data)
        return
    click.echo(data["diff"] or "(no change to the config text)")
    for line in data["said"]:
        out.print(f"- {line}", markup=False)


@policy.command("explain")
@click.option("--as", "who", required=True, help="The principal to decide for.")
@click.option("--from", "source", default=None, help="For promote: the source tier or branch.")
@click.argument("action")
@click.argument("target")
@command
@click.pass_context
def policy_explain(ctx: click.Context, who: str, source: str | None, action: str, target: str) -> None:
    """Print the decision and the rule for ACTION on TARGET, without doing anything."""
    d = client(ctx).explain(who, action, target, source)
    if as_json():
        emit_json(d)
        return
    out.print(f"{'ALLOWED' if d['allowed'] else 'DENIED'}: {d['reason']} (rule {d['rule']})")


@click.group()
def audit() -> None:
    """The tamper-evident trail of every decision."""


@audit.command("log")
@click.option("--actor")
@click.option("--action")
@click.option("--target")
@click.option("--denied", is_flag=True, default=None, help="Only refusals.")
@click.option("--since", help="How far back, e.g. 1h or 7d.")
@click.option("--limit", type=int, default=200, show_default=True)
@click.option("--jsonl", is_flag=True, help="One JSON object per line (for export).")
@command
@click.pass_context
def audit_log(ctx: click.Context, actor: str | None, action: str | None, target: str | None, denied: bool | None,
              since: str | None, limit: int, jsonl: bool) -> None:
    """Audit records, oldest first, filtered."""
    after = time.time() - parse_ttl(since) if since else None
    rows = client(ctx).audit_log(actor=actor, action=action, target=target, denied=denied, since=after, limit=limit)
    if jsonl:
        for r in rows:
            click.echo(json.dumps(r, sort_keys=True))
    elif as_json():
        emit_json(rows)
    else:
        for r in rows:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"]))
            out.print(f"{r['id']:>5} {stamp} {r['actor']:<16} {r['action']:<16} {r['target']:<20} "
                      f"{r['decision']:<7} {r['outcome']:<8} {r['reason']}", markup=False)


@audit.command("url")
@command
@click.pass_context
def audit_url(ctx: click.Context) -> None:
    """A read-only postgresql:// URL (through the proxy) where the audit trail is the table audit_log."""
    url = client(ctx).audit_url()
    emit_json({"url": url}) if as_json() else click.echo(url)


@audit.command("verify")
@command
@click.pass_context
def audit_verify(ctx: click.Context) -> None:
    """Check the hash chain, its head outside meta.db and the SQL mirror; names what is missing. Exit 1 if broken."""
    v = client(ctx).audit_verify()
    if as_json() and v["ok"]:
        emit_json(v)
    elif v["ok"]:
        mirror = v.get("mirror")
        out.print(f"audit trail intact: {v['records']} records"
                  + (f"; the SQL mirror matches (up to record {mirror['synced_to']})" if mirror else ""),
                  markup=False)
        if v.get("note"):
            out.print(f"note: {v['note']}", markup=False)
    if not v["ok"]:
        from ..errors import TierbaseError

        where = f" at record {v['first_bad']}" if v.get("first_bad") else ""
        # with --json this is the one document printed: the error envelope, carrying the verdict
        raise TierbaseError(f"the audit trail is broken{where}: {v['problem']}",
                            "Investigate who changed meta.db, audit.head or the mirror; keep copies of all three",
                            verdict=v)
