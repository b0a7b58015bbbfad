"""The background service of one data dir: HTTP API, proxy, TTL sweeper, idle suspend.

Started by `tierbase up` as ``python -m tierbase.service HOME``, as the
unprivileged compute user (never root); writes ``service.json`` once every
port is bound and removes it on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import uvicorn

from .api.server import create_app
from .app import Tierbase
from .control.store import Kind
from .errors import PolicyDenied, TierbaseError
from .proxy import Proxy, RouteError, Target
from .proxy.auth import Verifier
from .proxy.tls import TlsFiles, ensure_certificates

log = logging.getLogger("tierbase.service")


class Resolver:
    """Route name -> the branch serving it, waking its compute on the way."""

    def __init__(self, tb: Tierbase) -> None:
        self.tb = tb

    async def resolve(self, route: str) -> Target:
        branch = self.tb.store.resolve_route(route)  # SQLite reads inline: see PlatformAuthority
        if branch is None:
            raise RouteError(f'route "{route}" does not exist',
                             "Run `tierbase branch list` (or `tierbase route list`) to see the routes")
        b = self.tb.store.get(branch)
        if b.kind is Kind.SYSTEM:  # the audit trail's SQL mirror: bring it up to date for this reader
            await asyncio.to_thread(self.tb.audit_sync)
        if b.kind is Kind.SNAPSHOT:
            raise RouteError(f'branch "{branch}" is a read-only snapshot and has no compute',
                             f"Create a branch from it: `tierbase branch create NAME --parent {branch}`")
        sockets = str(self.tb.branches.provider.sockets)
        if self.tb.branches.provider.running_pid(b.volume) is not None:
            return Target(branch, sockets, b.port)  # the common case: no lock, no thread
        try:
            await asyncio.to_thread(self.tb.branches.start, branch)
        except TierbaseError as err:
            raise RouteError(err.message, err.hint, sqlstate="57P03") from err
        return Target(branch, sockets, b.port)


class PlatformAuthority:
    """The proxy's questions (who is this, what may it do) answered by the facade.

    They are answered on the event loop itself: each is a few SQLite reads (tens of microseconds,
    and readers never wait for writers in WAL mode), cheaper than a hop to a worker thread, which
    cost the proxy ~3 ms per connection under load. Only the audit's write goes to a thread.
    """

    def __init__(self, tb: Tierbase) -> None:
        self.tb = tb
        self._writes: set[asyncio.Future[None]] = set()

    async def verifier(self, user: str) -> Verifier | None:
        text = self.tb.login_verifier(user)
        return Verifier.parse(text) if text else None

    async def authorize(self, user: str, route: str, branch: str, peer: str) -> str:
        try:
            return self.tb.connect_role(user, branch, later=self._in_thread)
        except PolicyDenied as err:
            raise RouteError(f'permission denied for branch "{branch}": {err.data.get("reason", err.message)}',
                             "Ask a platform engineer, or see `tierbase policy explain`", sqlstate="42501") from err

    def _in_thread(self, write: Callable[[], None]) -> None:
        fut = asyncio.get_running_loop().run_in_executor(None, write)
        self._writes.add(fut)
        fut.add_done_callback(self._writes.discard)

    async def failed(self, user: str, peer: str, reason: str) -> None:
        # folded per source and minute by the audit log: a storm cannot grow the trail without bound
        await asyncio.to_thread(self.tb.gate.audit.note_failure, peer, "anonymous", "proxy.login",
                                f"authentication failed for user {user!r}: {reason}")


def make_proxy(tb: Tierbase, *, port: int | None = None) -> Proxy:
    """The proxy as the service runs it: the platform's resolver and authority, TLS with its certificates."""
    cert, key = tb.store.get_setting("tls_cert"), tb.store.get_setting("tls_key")
    tls = TlsFiles(Path(cert), Path(cert), Path(key)) if cert and key else ensure_certificates(tb.home.root / "tls")
    return Proxy(Resolver(tb), PlatformAuthority(tb), host="127.0.0.1",
                 port=tb.proxy_port if port is None else port, tls=tls,
                 plain_loopback=bool(tb.store.get_setting("plain_loopback", True)),
                 decoy_key=tb.home.read_secret(tb.home.root / "audit.key", create=True).encode())


class Service:
    def __init__(self, home: Path) -> None:
        self.tb = Tierbase(home)
        self.tb.router = self
        self.proxy = make_proxy(self.tb)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.idle_timeout = float(self.tb.store.get_setting("idle_timeout", 300))
        self.sweep_interval = float(os.environ.get("TIERBASE_SWEEP_INTERVAL", "30"))
        self._busy_at: dict[str, float] = {}

    # -- hooks for the API ------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"service_pid": os.getpid(), "api_port": self.tb.api_port, "proxy_port": self.proxy.port,
                "idle_timeout": self.idle_timeout}

    def after_switch(self, route: str, old: str, new: str) -> None:
        """A route was repointed by the platform itself (rollback): end the old target's sessions."""
        if self.loop is None or old == new:
            return
        msg = f'route "{route}" now points to branch "{new}"; reconnect'
        asyncio.run_coroutine_threadsafe(self.proxy.terminate(old, msg), self.loop).result()

    def sessions(self, branch: str) -> int:
        return self.proxy.sessions(branch)

    def repoint(self, me: Tierbase, route: str, branch: str, drain: float) -> dict[str, Any]:
        """Called from an API worker thread: switch the route atomically on the proxy's loop."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self._repoint(me, route, branch, drain), self.loop).result()

    async def _repoint(self, me: Tierbase, route: str, branch: str, drain: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        async with self.proxy.hold(route):
            out = await asyncio.to_thread(me.set_route, route, branch)
            old = out.get("previous")
            ended = 0
            if old and old != branch:
                ended = await self.proxy.terminate(
                    old, f'route "{route}" now points to branch "{branch}"; reconnect', drain=drain)
        out.update(sessions_ended=ended, switch_ms=round((time.perf_counter() - t0) * 1000, 1))
        return out

    # -- background duties ------------------------------------------------------
    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                gone = await asyncio.to_thread(self.tb.sweep)
                if gone:
                    log.info("expired and deleted: %s", ", ".join(gone))
            except Exception:
                log.exception("TTL sweep failed")

    async def suspender(self) -> None:
        if self.idle_timeout <= 0:
            return
        while True:
            await asyncio.sleep(min(10.0, max(self.idle_timeout / 4, 0.5)))
            try:
                await asyncio.to_thread(self.suspend_idle)
            except Exception:
                log.exception("idle suspend failed")

    def suspend_idle(self) -> list[str]:
        """Stop computes with no client for idle_timeout (proxied or direct: postgres tells)."""
        stopped, now = [], time.monotonic()
        provider = self.tb.branches.provider
        for b in self.tb.store.all():
            if provider.running_pid(b.volume) is None:
                self._busy_at.pop(b.name, None)
                continue
            if self.proxy.sessions(b.name) > 0 or _client_backends(provider.endpoint(b.port)) > 0:
                self._busy_at[b.name] = now
                continue
            since = max(self._busy_at.setdefault(b.name, now), self.proxy.last_active(b.name))
            if now - since >= self.idle_timeout:
                provider.stop(b.name, b.volume)
                self._busy_at.pop(b.name, None)
                stopped.append(b.name)
                log.info("suspended idle compute of %s", b.name)
        return stopped

    # -- main -------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        for line in await asyncio.to_thread(self.tb.reconcile):
            log.info("reconcile: %s", line)
        for name in await asyncio.to_thread(self.tb.clear_uploads):
            log.info("removed the upload %s left by a service that stopped mid-import", name)
        app = create_app(self.tb, hooks=self)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.tb.api_port, log_level="warning",
                                               lifespan="off"))
        # uvicorn re-raises SIGTERM once it stopped serving; under the default handler that would kill the
        # process before the finally below (the audit's pending counts, the proxy's sessions, service.json)
        signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
        await self.proxy.start()
        tasks = [asyncio.create_task(self.sweeper()), asyncio.create_task(self.suspender())]
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            await self.proxy.close()
            raise SystemExit(f"the API could not listen on 127.0.0.1:{self.tb.api_port}")
        self._write_info()
        try:
            await serving
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.to_thread(self.tb.gate.audit.flush)  # the counts of folded failures still open
            await self.proxy.close()
            self.tb.home.service.unlink(missing_ok=True)

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "api_url": f"http://127.0.0.1:{self.tb.api_port}",
                "proxy_port": self.proxy.port, "started_at": time.time()}
        tmp = self.tb.home.service.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.chmod(0o600)
        tmp.replace(self.tb.home.service)


def _client_backends(ep: Any) -> int:
    sql = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
           "AND pid <> pg_backend_pid()")
    try:
        with psycopg.connect(ep.dsn(), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(sql).fetchone()
    except psycopg.Error:
        return 1  # cannot tell: never stop what might be in use
    return int(row[0]) if row else 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.geteuid() == 0:
        # root mounts the storage in `tierbase up`; everything that serves requests runs unprivileged
        raise SystemExit("tierbase.service does not run as root. Start it with `tierbase up`, which runs it "
                         "as the compute user (TIERBASE_COMPUTE_USER, default postgres)")
    os.umask(0o077)  # every file the service or its computes make is the service user's alone
    home = Path(sys.argv[1])
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(Service(home).run())


if __name__ == "__main__":
    main()
