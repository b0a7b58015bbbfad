"""CLI commands for the platform itself: up, down, status, import, tls."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import NotRunning
from .base import as_json, client, command, home_of
from .render import emit_json, out, space_line

if TYPE_CHECKING:
    from ..home import Home


# -- platform ------------------------------------------------------------------------
@click.command()
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
@click.option("--pool-port", type=int, default=None, help="The proxy's pooled port, transaction pooling "
              "(default: the proxy port - 2, 25429).")
@click.option("--space-reserve", default=None, help="Pool space kept for tiers, e.g. 2G (default 10% of the "
              "pool): feature branches together may not fill it, and `branch create` is refused below it.")
@command
@click.pass_context
def up(ctx: click.Context, storage: str, btrfs_size: str, api_port: int | None, proxy_port: int | None,
       idle_timeout: int | None, config: str | None, import_limit: str | None, space_reserve: str | None,
       pool_port: int | None) -> None:
    """Start the platform for the data dir (initialising it on first use).

    As root, root only mounts the storage; the service and the computes run as the compute user.
    """
    os.umask(0o077)  # nothing up makes (as root, before the hand-over) is for other users' eyes
    from ..app import Tierbase
    from ..launch import spawn_service
    from ..provider import compute_user

    tb = Tierbase(home_of(ctx))
    said = tb.init(storage=storage, btrfs_size=btrfs_size, api_port=api_port, proxy_port=proxy_port,
                   config=config, space_reserve=space_reserve)
    if idle_timeout is not None:
        tb.store.set_setting("idle_timeout", idle_timeout)
    if import_limit is not None:
        tb.set_import_limit(import_limit)
    if pool_port is not None:
        from ..provider import check_port

        tb.store.set_setting("pool_port", check_port(pool_port, "the pooled port", "--pool-port 25429"))
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
              "api_url": info["api_url"], "proxy_port": info["proxy_port"], "pool_port": info.get("pool_port"),
              "service_user": user.name,
              "said": said}
    if as_json():
        emit_json(result)
        return
    for line in said:
        out.print(f"- {line}")
    out.print(f"API {info['api_url']}  proxy 127.0.0.1:{info['proxy_port']}  data dir {tb.home.root}")
    out.print("Next: `tierbase branch create my-feature` then `psql \"$(tierbase branch url my-feature)\"`")


def _running_service(home: Home) -> dict[str, Any] | None:
    from ..api.client import service_info
    from ..api.wire import WireError, request
    from ..procs import pid_alive

    info = service_info(home)
    if info is None or not pid_alive(int(info.get("pid", 0))):
        home.service.unlink(missing_ok=True)
        return None
    try:
        healthy = request(str(info["api_url"]), "GET", "/v1/health", headers={}, timeout=5).status < 400
    except (WireError, ValueError):
        return None
    return info if healthy else None


@click.command()
@click.option("--purge", is_flag=True, help="Also delete every branch, the data dir, mounts and loop devices.")
@command
@click.pass_context
def down(ctx: click.Context, purge: bool) -> None:
    """Stop the service and every compute; --purge removes all data."""
    from ..api.client import service_info
    from ..home import Home
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


@click.command()
@command
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show whether the platform runs, its storage driver and computes."""
    from ..home import Home

    home = Home(home_of(ctx))
    if ctx.obj.get("api") is None and _running_service(home) is None:
        raise NotRunning(f"tierbase is not running for the data dir {home.root}", "Start it with `tierbase up`")
    data = client(ctx).status()
    if as_json():
        emit_json({"running": True, **data})
        return
    for k, v in data.items():
        if k not in ("space", "masked_images"):
            out.print(f"{k:>16}: {v}")
    if isinstance(data.get("space"), dict):
        space_line(data["space"])
    if data.get("masked_images"):
        from .masking import image_line

        for img in data["masked_images"]:
            out.print(f"{'masked image':>16}: {image_line(img)}")


@click.command("import")
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


@click.group()
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
