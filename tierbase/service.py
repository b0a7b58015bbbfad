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
from .control.lifecycle import State
from .control.store import Branch, Kind
from .errors import PolicyDenied, QuotaExceeded, TierbaseError, space_exhausted
from .proxy import Proxy, RouteError, Target
from .proxy.auth import Verifier
from .proxy.tls import TlsFiles, ensure_certificates
from .settings import default, value

log = logging.getLogger("tierbase.service")


class Resolver:
    """Route name -> the branch serving it, waking its compute on the way.

    The common case (the compute runs) takes no lock and no thread. It must not race the idle
    suspender: every resolution first marks the branch ``touched``, and the suspender, under the
    branch's lock, announces itself in ``stopping`` before it looks at ``touched`` one last time;
    a resolution that sees ``stopping`` takes the slow path (``Branches.start`` under the same
    lock, which waits for the stop and starts again). A reset holds that lock from its stop to its
    swap, so the slow path never starts the old volume: it re-reads the row under the lock.
    """

    def __init__(self, tb: Tierbase) -> None:
        self.tb = tb
        #: branch -> time.monotonic() of its last resolution (read by the idle suspender)
        self.touched: dict[str, float] = {}
        #: branches whose compute the idle suspender is deciding to stop, or stopping
        self.stopping: set[str] = set()

    async def resolve(self, route: str) -> Target:
        branch = self.tb.store.resolve_route(route)  # SQLite reads inline: see PlatformAuthority
        if branch is None:
            raise RouteError(f'route "{route}" does not exist',
                             "Run `tierbase branch list` (or `tierbase route list`) to see the routes")
        self.touched[branch] = time.monotonic()  # before the running check: see the class's comment
        b = self.tb.store.get(branch)
        if b.kind is Kind.SYSTEM:  # the audit trail's SQL mirror: bring it up to date for this reader
            await asyncio.to_thread(self.tb.audit_sync)
        if b.kind is Kind.SNAPSHOT:
            raise RouteError(f'branch "{branch}" is a read-only snapshot and has no compute',
                             f"Create a branch from it: `tierbase branch create NAME --parent {branch}`")
        provider = self.tb.provider
        if (branch not in self.stopping and b.state is State.READY
                and provider.ready(b.volume)):  # running and not still starting up
            return Target(branch, provider.endpoint(b.port).host, b.port)  # the common case: no lock, no thread
        try:
            await asyncio.to_thread(self._may_wake, b)
        except QuotaExceeded as err:  # 53400 configuration_limit_exceeded: the client sees the quota and the hint
            raise RouteError(err.message, err.hint, sqlstate="53400") from err
        try:
            await asyncio.to_thread(self.tb.branches.start, branch)
        except TierbaseError as err:
            if space_exhausted(err.message):  # its writes hit the features' limit or a full pool: 53100
                raise RouteError(f'branch "{branch}" is out of disk space: {err.message}',
                                 "Delete branches you no longer need (or reset this one); tiers are not "
                                 "affected", sqlstate="53100") from err
            raise RouteError(err.message, err.hint, sqlstate="57P03") from err
        b = await asyncio.to_thread(self.tb.store.get, branch)  # the start may have moved its port
        return Target(branch, provider.endpoint(b.port).host, b.port)


    def _may_wake(self, b: Branch) -> None:
        """A wake-up starts a compute that counts against its creator's quota (``quotas.ROLE.computes``)
        as ``branch start`` does: refused, and audited, when the creator runs as many as allowed already.
        Without this, a connection would be a way around the quota that the API enforces."""
        if b.kind is not Kind.FEATURE or self.tb.provider.running_pid(b.volume):
            return
        try:
            who = self.tb.gate.principal(b.creator)
        except TierbaseError:
            return  # a creator that is no longer a principal has no quota to count against
        try:
            self.tb.check_quota(who, compute=True)
        except QuotaExceeded as err:
            self.tb.gate.audit.append(actor=who.name, action="branch.start.proxy", target=b.name, allowed=False,
                                      reason=f"{err.data.get('rule')}: {err.message}", outcome="refused")
            raise


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


class PooledResolver:
    """The pooled port's resolver: the route's compute (woken as usual), then its PgBouncer in front."""

    def __init__(self, inner: Resolver) -> None:
        self.inner = inner
        tb = inner.tb
        self.poolers = tb.branches.provider.pooler()

    async def resolve(self, route: str) -> Target:
        target = await self.inner.resolve(route)
        try:
            sockets = await asyncio.to_thread(self.poolers.ensure, target.port)
        except TierbaseError as err:
            raise RouteError(err.message, err.hint, sqlstate="57P03") from err
        return Target(target.branch, sockets, target.port)


def make_proxy(tb: Tierbase, *, port: int | None = None, pooled: Resolver | None = None) -> Proxy:
    """The proxy as the service runs it: the platform's resolver and authority, TLS with its certificates.

    ``pooled``: the proxy of the pooled port instead, in front of each compute's PgBouncer (pooler.py),
    sharing the main proxy's resolver (one wake-up path, one idle bookkeeping).
    """
    cert, key = tb.store.get_setting("tls_cert"), tb.store.get_setting("tls_key")
    tls = TlsFiles(Path(cert), Path(cert), Path(key)) if cert and key else ensure_certificates(tb.home.root / "tls")
    resolver: Any = Resolver(tb) if pooled is None else PooledResolver(pooled)
    default_port = tb.proxy_port if pooled is None else tb.pool_port
    return Proxy(resolver, PlatformAuthority(tb), host="127.0.0.1",
                 port=default_port if port is None else port, tls=tls,
                 plain_loopback=bool(tb.store.get_setting("plain_loopback", default("plain_loopback"))),
                 decoy_key=tb.home.read_secret(tb.home.root / "audit.key", create=True).encode())


class Service:
    #: the pooled port's proxy (None only in tests that build a Service of just a proxy and its loop)
    pooled: Proxy | None = None

    def __init__(self, home: Path) -> None:
        self.tb = Tierbase(home)
        self.tb.router = self
        self.proxy = make_proxy(self.tb)
        self.resolver: Resolver = self.proxy.resolver  # type: ignore[assignment]
        self.pooled = make_proxy(self.tb, pooled=self.resolver)  # the pooled URL's port (PgBouncer behind)
        self.poolers = self.tb.branches.provider.pooler()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.idle_timeout = float(self.tb.store.get_setting("idle_timeout", default("idle_timeout")))
        self.sweep_interval = float(value("sweep_interval"))
        # masked images (app_images.py) older than this are re-made by the sweeper
        self.image_max_age = float(value("image_max_age"))
        self._busy_at: dict[str, float] = {}

    # -- hooks for the API ------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"service_pid": os.getpid(), "api_port": self.tb.api_port, "proxy_port": self.proxy.port,
                "idle_timeout": self.idle_timeout}

    def sessions(self, branch: str) -> int:
        return self.proxy.sessions(branch)

    def repoint(self, me: Tierbase, route: str, branch: str, drain: float) -> dict[str, Any]:
        """The API's `route set`: the facade's set_route, which comes back through ``switch``."""
        return me.set_route(route, branch, drain=drain)

    def switch(self, route: str, change: Callable[[], dict[str, Any]], drain: float = 0.0) -> dict[str, Any]:
        """The one repoint path (route set, promotion, rollback), called from a worker thread.

        Hold the route (new connections to it wait), run ``change`` (the store's switch, in the
        caller's thread: it holds the target's lock and audits), end the sessions that came through
        this route to the previous target, release. With ``drain`` the hold is released right after
        the switch, so new connections go to the new target at once while the old sessions get up
        to ``drain`` seconds to finish before they are ended.
        """
        assert self.loop is not None
        t0 = time.perf_counter()
        proxies = [p for p in (self.proxy, self.pooled) if p is not None]  # the pooled port's sessions move too
        held = [p.hold(route) for p in proxies]
        for h in held:
            self._on_loop(h.__aenter__())
        released = False
        try:
            out = change()
            old, new = out.get("previous"), out.get("branch")
            msg = f'route "{route}" now points to branch "{new}"; reconnect'
            ended = 0
            if old and old != new:
                if drain > 0:
                    for h in held:
                        self._on_loop(h.__aexit__(None, None, None))
                    released = True
                async def both() -> int:  # at once: a drain is waited out once, not once per port
                    got = await asyncio.gather(*(p.terminate(old, msg, drain=drain, route=route) for p in proxies))
                    return sum(got)

                ended = self._on_loop(both())
        finally:
            if not released:
                for h in held:
                    self._on_loop(h.__aexit__(None, None, None))
        out.update(sessions_ended=ended, switch_ms=round((time.perf_counter() - t0) * 1000, 1))
        return out

    def _on_loop(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    # -- background duties ------------------------------------------------------
    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                gone = await asyncio.to_thread(self.tb.sweep)
                if gone:
                    log.info("expired and deleted: %s", ", ".join(gone))
                stopped = await asyncio.to_thread(self._reap_poolers)
                if stopped:
                    log.info("stopped the PgBouncers of stopped computes on ports %s", stopped)
            except Exception:
                log.exception("TTL sweep failed")
            try:
                for line in await asyncio.to_thread(self.tb.refresh_stale_images, self.image_max_age):
                    log.info("%s", line)
            except Exception:
                log.exception("masked image refresh failed")
            try:  # tiers' history: base snapshots when due, retention (app_pitr)
                for line in await asyncio.to_thread(self.tb.history_tick):
                    log.info("history: %s", line)
            except Exception:
                log.exception("history sweep failed")

    def _reap_poolers(self) -> list[int]:
        provider = self.tb.branches.provider
        running = {b.port for b in self.tb.store.all() if provider.running_pid(b.volume) is not None}
        return self.poolers.reap(running)

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
        """Stop computes with no client for idle_timeout (proxied or direct: postgres tells).

        The decision is taken again under the branch's lock (Branches.suspend) after announcing the
        stop to the resolver, so a connection resolved meanwhile keeps its compute (see Resolver).
        """
        stopped, now = [], time.monotonic()
        provider = self.tb.branches.provider
        for b in self.tb.store.all():
            if provider.running_pid(b.volume) is None:
                self._busy_at.pop(b.name, None)
                continue
            if not self._idle(b.name, now):
                continue

            def still_idle(cur: Any) -> bool:
                self.resolver.stopping.add(cur.name)
                return self._idle(cur.name, time.monotonic())

            try:
                if self.tb.branches.suspend(b.name, still_idle):
                    self._busy_at.pop(b.name, None)
                    stopped.append(b.name)
                    log.info("suspended idle compute of %s", b.name)
            finally:
                self.resolver.stopping.discard(b.name)
        return stopped

    def _idle(self, name: str, now: float) -> bool:
        b = self.tb.store.find(name)
        if b is None:
            return False
        ep = self.tb.branches.provider.endpoint(b.port)
        if self.proxy.sessions(name) > 0 or _client_backends(ep) > 0:
            self._busy_at[name] = now
            return False
        since = max(self._busy_at.setdefault(name, now), self.proxy.last_active(name),
                    self.resolver.touched.get(name, 0.0))
        return now - since >= self.idle_timeout

    # -- main -------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        assert self.pooled is not None  # made in __init__
        for line in await asyncio.to_thread(self.tb.reconcile):  # branches, intents and promotions, audited
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
        try:
            await self.pooled.start()
        except OSError as err:  # pooling is an extra: without its port the platform still serves
            log.warning("the pooled port %s is not available (%s): pooled URLs will not connect; "
                        "choose another with `tierbase up --pool-port N`", self.tb.pool_port, err)
        tasks = [asyncio.create_task(self.sweeper()), asyncio.create_task(self.suspender())]
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            await self.proxy.close()
            await self.pooled.close()
            raise SystemExit(f"the API could not listen on 127.0.0.1:{self.tb.api_port}")
        self._write_info()
        try:
            await serving
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.to_thread(self.tb.gate.audit.flush)  # the counts of folded failures still open
            await self.proxy.close()
            await self.pooled.close()
            await asyncio.to_thread(self.poolers.stop_all)
            self.tb.home.service.unlink(missing_ok=True)

    def _write_info(self) -> None:
        assert self.pooled is not None
        info = {"pid": os.getpid(), "api_url": f"http://127.0.0.1:{self.tb.api_port}",
                "proxy_port": self.proxy.port, "pool_port": self.pooled.port, "started_at": time.time()}
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
