"""`tierbase` CLI. Exit codes: 0 ok, 1 error, 2 refused by a rule (with the reasons)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from .. import __version__
from ..errors import NotRunning
from ..home import Home, default_home
from .base import LazyGroup, as_json, client, command, home_of
from .render import branch_details, branch_tree, emit_json, out

if TYPE_CHECKING:
    from ..api.client import Client

__all__ = ["as_json", "cli", "client", "command", "home_of", "main"]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="TIERBASE_HOME", type=click.Path(file_okay=False, readable=False), default=None,
              help="Data dir of the platform (env TIERBASE_HOME).")
@click.option("--api", "api", envvar="TIERBASE_API", default=None, metavar="URL",
              help="URL of the service's API, e.g. http://127.0.0.1:25430 (env TIERBASE_API); with "
                   "TIERBASE_TOKEN, for clients that cannot read the data dir (other OS users, agents).")
@click.version_option(version=__version__, prog_name="tierbase")
@click.pass_context
def cli(ctx: click.Context, home: str | None, api: str | None) -> None:
    """tierbase: copy-on-write branches of a real PostgreSQL."""
    ctx.obj = {"home": str(Path(home).absolute()) if home else str(default_home()), "api": api or None}


# -- platform ------------------------------------------------------------------------
@cli.command()
@click.option("--storage", type=click.Choice(["auto", "btrfs", "copy"]), default="auto", show_default=True)
@click.option("--btrfs-size", default="20G", show_default=True, help="Size of the loop-mounted btrfs image.")
@click.option("--api-port", type=int, default=None, help="HTTP API port (default 25430; below the kernel's "
              "ephemeral port range).")
@click.option("--proxy-port", type=int, default=None, help="Postgres proxy port (default 25431).")
@click.option("--idle-timeout", type=int, default=None, help="Seconds before an idle compute is suspended "
              "(default 300; 0 never).")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="tierbase.toml declaring tiers, roles and masking (creates missing tiers).")
@click.option("--import-limit", default=None, help="Largest dump `tierbase import` accepts, e.g. 512M, 8G "
              "(default 4G).")
@command
@click.pass_context
def up(ctx: click.Context, storage: str, btrfs_size: str, api_port: int | None, proxy_port: int | None,
       idle_timeout: int | None, config: str | None, import_limit: str | None) -> None:
    """Start the platform for the data dir (initialising it on first use).

    As root, root only mounts the storage; the service and the computes run as the compute user.
    """
    os.umask(0o077)  # nothing up makes (as root, before the hand-over) is for other users' eyes
    from ..app import Tierbase
    from ..compute import compute_user
    from ..launch import spawn_service

    tb = Tierbase(home_of(ctx))
    said = tb.init(storage=storage, btrfs_size=btrfs_size, api_port=api_port, proxy_port=proxy_port,
                   config=config)
    if idle_timeout is not None:
        tb.store.set_setting("idle_timeout", idle_timeout)
    if import_limit is not None:
        tb.set_import_limit(import_limit)
    driver, user = tb.driver, compute_user()
    tb.close()
    tb.home.hand_over(user)
    info = _running_service(tb.home)
    if info is None:
        info = spawn_service(tb.home, user)
        said.append(f"started the service as OS user {user.name!r} (pid {info['pid']})")
    else:
        said.append(f"the service is already running (pid {info['pid']})")
    result = {"home": str(tb.home.root), "driver": driver.name, "copy_on_write": driver.copy_on_write,
              "api_url": info["api_url"], "proxy_port": info["proxy_port"], "service_user": user.name,
              "said": said}
    if as_json():
        emit_json(result)
        return
    for line in said:
        out.print(f"- {line}")
    out.print(f"API {info['api_url']}  proxy 127.0.0.1:{info['proxy_port']}  data dir {tb.home.root}")
    out.print("Next: `tierbase branch create my-feature` then `psql \"$(tierbase branch url my-feature)\"`")


def _running_service(home: Home) -> dict[str, Any] | None:
    import httpx

    from ..api.client import service_info
    from ..procs import pid_alive

    info = service_info(home)
    if info is None or not pid_alive(int(info.get("pid", 0))):
        home.service.unlink(missing_ok=True)
        return None
    try:
        httpx.get(f"{info['api_url']}/v1/health", timeout=5).raise_for_status()
    except httpx.HTTPError:
        return None
    return info


@cli.command()
@click.option("--purge", is_flag=True, help="Also delete every branch, the data dir, mounts and loop devices.")
@command
@click.pass_context
def down(ctx: click.Context, purge: bool) -> None:
    """Stop the service and every compute; --purge removes all data."""
    from ..api.client import service_info
    from ..procs import pid_alive

    home = Home(home_of(ctx))
    said = []
    info = service_info(home)
    if info is not None and pid_alive(int(info["pid"])):
        pid = int(info["pid"])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        said.append(f"stopped the service (pid {pid})")
    home.service.unlink(missing_ok=True)
    from ..app import Tierbase

    said += Tierbase(home.root).down(purge=purge)
    if as_json():
        emit_json({"home": str(home.root), "purged": purge, "said": said})
    else:
        for line in said or ["nothing was running"]:
            out.print(f"- {line}")


@cli.command()
@command
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show whether the platform runs, its storage driver and computes."""
    home = Home(home_of(ctx))
    if ctx.obj.get("api") is None and _running_service(home) is None:
        raise NotRunning(f"tierbase is not running for the data dir {home.root}", "Start it with `tierbase up`")
    data = client(ctx).status()
    if as_json():
        emit_json({"running": True, **data})
        return
    for k, v in data.items():
        out.print(f"{k:>16}: {v}")


@cli.command("import")
@click.argument("dump", type=click.Path(dir_okay=True))
@click.option("--branch", default="production", show_default=True)
@click.option("--database", default="postgres", show_default=True)
@command
@click.pass_context
def import_(ctx: click.Context, dump: str, branch: str, database: str) -> None:
    """Restore a pg_dump output (plain SQL, -Fc, -Ft, or a -Fd directory) into a branch.

    The file is read here and its bytes are sent to the service, which opens no path of yours."""
    data = client(ctx).import_dump(dump, branch, database)
    emit_json(data) if as_json() else out.print(f"restored {dump} into {branch}/{database} in {data['seconds']} s")


# -- branches ------------------------------------------------------------------------
@cli.group()
def branch() -> None:
    """Create, list, reset and delete branches."""


@branch.command("create")
@click.argument("name")
@click.option("--parent", default=None, help="Branch to fork (default: production).")
@click.option("--ttl", default=None, help="Delete automatically after this long (e.g. 2h, 7d).")
@click.option("--snapshot", is_flag=True, help="A read-only snapshot instead of a writable branch.")
@click.option("--start", is_flag=True, help="Start its compute right away.")
@click.option("--at", default=None, help="PARENT as it was then: ISO 8601 with a zone, or -5m, -1h30m.")
@click.option("--lsn", default=None, help="PARENT as it was at this WAL position (e.g. 0/1A2B3C4).")
@click.option("--exclusive", is_flag=True, help="With --at/--lsn: leave out a commit exactly at the target.")
@command
@click.pass_context
def branch_create(ctx: click.Context, name: str, parent: str | None, ttl: str | None, snapshot: bool,
                  start: bool, at: str | None, lsn: str | None, exclusive: bool) -> None:
    """Create NAME as a copy-on-write branch of PARENT's current state (or of a past one: --at/--lsn)."""
    b = client(ctx).create_branch(name, parent, ttl=ttl, snapshot=snapshot, start=start, at=at, lsn=lsn,
                                  inclusive=not exclusive)
    if as_json():
        emit_json(b)
        return
    if b.get("target"):
        when = b["target"]["time"] or f"LSN {b['target']['lsn']}"
        out.print(f"created branch {b['name']!r} from {b['parent']!r} as of {when} in {b['elapsed_ms']} ms "
                  f"(base snapshot + WAL replayed to {b['fork_lsn']})")
        return
    how = "copy-on-write snapshot" if b["copy_on_write"] else "FULL COPY (copy driver, O(size))"
    out.print(f"created {b['kind']} branch {b['name']!r} from {b['parent']!r} in {b['elapsed_ms']} ms ({how})")


@branch.command("create-ci")
@click.argument("feature")
@click.option("--parent", default=None, help="Branch to fork (default: the entry tier).")
@click.option("--ttl", default=None, help="Delete automatically after this long (e.g. 2h, 7d).")
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
@command
@click.pass_context
def branch_list(ctx: click.Context, no_bytes: bool, prefix: str, names: bool) -> None:
    """The branch tree with kind, compute state, age, TTL and own bytes."""
    data = client(ctx).list_branches(with_bytes=not (no_bytes or names))
    data = [b for b in data if b["name"].startswith(prefix)]
    if as_json():
        emit_json(data)
    elif names:
        for b in data:
            click.echo(b["name"])
    else:
        out.print(branch_tree(data))


@branch.command("show")
@click.argument("name")
@command
@click.pass_context
def branch_show(ctx: click.Context, name: str) -> None:
    """Everything about one branch."""
    data = client(ctx).get_branch(name)
    emit_json(data) if as_json() else branch_details(data)


@branch.command("delete")
@click.argument("name")
@click.option("--recursive", is_flag=True, help="Also delete every descendant.")
@command
@click.pass_context
def branch_delete(ctx: click.Context, name: str, recursive: bool) -> None:
    """Delete a branch (and with --recursive its descendants)."""
    gone = client(ctx).delete_branch(name, recursive)
    emit_json({"deleted": gone}) if as_json() else out.print(f"deleted {', '.join(gone)}")


@branch.command("reset")
@click.argument("name")
@command
@click.pass_context
def branch_reset(ctx: click.Context, name: str) -> None:
    """Throw away NAME's changes: back to its parent's current state, same URL."""
    b = client(ctx).reset_branch(name)
    emit_json(b) if as_json() else out.print(f"reset {name!r} to the current state of {b['parent']!r}")


@branch.command("url")
@click.argument("name")
@click.option("--database", default="postgres", show_default=True)
@click.option("--direct", is_flag=True, help="The compute's own port instead of the proxy (platform engineers).")
@click.option("--sslmode", type=click.Choice(["disable", "prefer", "require", "verify-ca", "verify-full"]),
              default=None, help="TLS to the proxy; verify-* also fetch the platform's CA into ~/.config/tierbase.")
@command
@click.pass_context
def branch_url(ctx: click.Context, name: str, database: str, direct: bool, sslmode: str | None) -> None:
    """A postgresql:// URL for NAME with your own credentials (through the proxy, stable)."""
    sdk = client(ctx)
    url = sdk.branch_url(name, database, direct, sslmode=sslmode)
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


@cli.group()
def tls() -> None:
    """The proxy's TLS certificate."""


@tls.command("ca")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the PEM here (default: stdout).")
@command
@click.pass_context
def tls_ca(ctx: click.Context, out: str | None) -> None:
    """The CA certificate clients verify the proxy with (sslmode=verify-full sslrootcert=FILE)."""
    pem = client(ctx).tls_ca()["pem"]
    if out:
        Path(out).write_text(pem)
    if as_json():
        emit_json({"pem": pem, "file": out})
    elif not out:
        click.echo(pem, nl=False)


@branch.command("start")
@click.argument("name")
@command
@click.pass_context
def branch_start(ctx: click.Context, name: str) -> None:
    """Start NAME's compute."""
    b = client(ctx).start_branch(name)
    emit_json(b) if as_json() else out.print(f"{name}: compute {b['compute']} (pid {b['pid']}, port {b['port']})")


@branch.command("stop")
@click.argument("name")
@command
@click.pass_context
def branch_stop(ctx: click.Context, name: str) -> None:
    """Stop NAME's compute (it wakes again on the next connection)."""
    b = client(ctx).stop_branch(name)
    emit_json(b) if as_json() else out.print(f"{name}: compute {b['compute']}")


# -- routes --------------------------------------------------------------------------
@cli.group()
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


def main() -> None:
    cli(prog_name="tierbase")


if __name__ == "__main__":
    main()
