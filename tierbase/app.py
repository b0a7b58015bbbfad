"""The facade: one object that wires storage, computes and the control plane.

CLI commands and API routes call exactly one method here and render the
result; nothing below this file knows about either.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from .compute import Endpoint, Postgres, compute_user, find_binaries
from .control.branches import Branches
from .control.store import Branch, Kind, Store
from .errors import BranchNotFound, InvalidInput, NotRunning, TierbaseError
from .home import Home, default_home
from .names import check_name, format_duration, parse_ttl
from .provider import LocalProvider
from .storage import DEFAULT_IMAGE_SIZE, VolumeDriver, make_driver
from .storage.btrfs import parse_size

ROOT_BRANCH = "production"
DEFAULT_API_PORT = 55430
DEFAULT_PROXY_PORT = 55431


class Tierbase:
    """A tierbase platform rooted at one data dir."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Home(Path(home).absolute() if home else default_home())
        self._store: Store | None = None
        self._branches: Branches | None = None
        self._driver: VolumeDriver | None = None

    # -- wiring ----------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            if not self.home.exists():
                raise NotRunning(f"no tierbase platform at {self.home.root}",
                                 "Run `tierbase up` first (or set TIERBASE_HOME to the right data dir)")
            self._store = Store(self.home.db, self._port_base())
        return self._store

    @staticmethod
    def _port_base() -> int:
        """Default first compute port; the one chosen at first `up` is kept in the settings."""
        return int(os.environ.get("TIERBASE_PORT_BASE", "55432"))

    @property
    def driver(self) -> VolumeDriver:
        if self._driver is None:
            pg = Postgres()
            self._driver = make_driver(self.store.get_setting("driver"), self.home.root, pg,
                                       image_size=self.store.get_setting("btrfs_size", DEFAULT_IMAGE_SIZE))
        return self._driver

    @property
    def branches(self) -> Branches:
        if self._branches is None:
            provider = LocalProvider(self.home.root, self.driver, Postgres(), self.home.read_secret(self.home.secret))
            self._branches = Branches(self.store, provider)
        return self._branches

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
            self._branches = None

    # -- platform lifecycle ----------------------------------------------------
    def init(self, storage: str = "auto", btrfs_size: str = DEFAULT_IMAGE_SIZE, *,
             api_port: int | None = None, proxy_port: int | None = None) -> list[str]:
        """Create (or re-open) the platform: storage ready, root branch present, leftovers reconciled."""
        said: list[str] = []
        find_binaries()  # fail before touching anything if postgres is missing
        parse_size(btrfs_size)
        user = compute_user()
        fresh = not self.home.exists()
        self.home.make(user.uid)
        if fresh:
            driver = make_driver(storage, self.home.root, Postgres(), image_size=btrfs_size)
            try:
                said += driver.prepare()
                self._store = Store(self.home.db, self._port_base())
                self.store.set_setting("driver", driver.name)
                self.store.set_setting("btrfs_size", btrfs_size)
                self.store.set_setting("port_base", self._port_base())
                self.store.set_setting("api_port", api_port or DEFAULT_API_PORT)
                self.store.set_setting("proxy_port", proxy_port or DEFAULT_PROXY_PORT)
                self._driver = driver
                self.home.read_secret(self.home.secret, create=True)
                self.home.read_secret(self.home.token, create=True)
                self.branches.create_root(ROOT_BRANCH, creator=getpass.getuser())
            except BaseException:
                self.close()
                driver.release(purge=True)
                shutil.rmtree(self.home.root, ignore_errors=True)
                raise
            said.append(f"created the root branch {ROOT_BRANCH!r} with initdb (storage driver: {driver.name})")
        else:
            stored = self.store.get_setting("driver")
            if storage not in ("auto", stored):
                raise InvalidInput(f"this data dir uses the {stored!r} storage driver, not {storage!r}",
                                   "Use `tierbase down --purge` first to start over with another driver")
            for key, value in (("api_port", api_port), ("proxy_port", proxy_port)):
                if value:
                    self.store.set_setting(key, value)
            said += self.driver.prepare() if not _mounted_ok(self.driver) else []
            said += self.branches.reconcile()
        return said

    def down(self, purge: bool = False) -> list[str]:
        """Stop every compute; unmount; with purge, remove every byte of the data dir."""
        if not self.home.exists():
            if purge and self.home.root.exists():
                shutil.rmtree(self.home.root, ignore_errors=True)
            return []
        said = []
        for b in self.store.all():
            if self.branches.provider.stop(b.name, b.volume):
                said.append(f"stopped the compute of {b.name!r}")
        driver = self.driver
        self.close()
        said += driver.release(purge=purge)
        if purge:
            shutil.rmtree(self.home.root, ignore_errors=True)
            said.append(f"removed {self.home.root}")
        return said

    def reconcile(self) -> list[str]:
        return self.branches.reconcile()

    # -- branches --------------------------------------------------------------
    def create_branch(self, name: str, parent: str | None = None, *, ttl: str | None = None,
                      snapshot: bool = False, start: bool = False, creator: str | None = None) -> dict[str, Any]:
        ttl_seconds = parse_ttl(ttl) if ttl else None
        t0 = time.perf_counter()
        b = self.branches.create(
            name, parent or ROOT_BRANCH, kind=Kind.SNAPSHOT if snapshot else Kind.FEATURE,
            creator=creator or getpass.getuser(), ttl_seconds=ttl_seconds, start=start,
        )
        info = self.describe(b)
        info["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return info

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]:
        return self.branches.delete(name, recursive=recursive)

    def reset_branch(self, name: str) -> dict[str, Any]:
        return self.describe(self.branches.reset(name))

    def start_branch(self, name: str) -> dict[str, Any]:
        self.branches.start(name)
        return self.describe(self.store.get(name))

    def stop_branch(self, name: str) -> dict[str, Any]:
        self.branches.stop(name)
        return self.describe(self.store.get(name))

    def get_branch(self, name: str, *, with_bytes: bool = True) -> dict[str, Any]:
        check_name(name)
        return self.describe(self.store.get(name), with_bytes=with_bytes)

    def list_branches(self, *, with_bytes: bool = True) -> list[dict[str, Any]]:
        return [self.describe(b, with_bytes=with_bytes) for b in self.store.all()]

    def branch_url(self, name: str, dbname: str = "postgres", *, direct: bool = False) -> str:
        """A URL for psql/psycopg: through the proxy (stable), or straight to the compute."""
        check_name(name)
        ep = self.branches.provider.endpoint(0, dbname)
        userinfo = f"{ep.user}:{quote(ep.password, safe='')}"
        if direct:
            port = self.store.get(name).port
            return f"postgresql://{userinfo}@{ep.host}:{port}/{quote(dbname, safe='')}"
        if self.store.resolve_route(name) is None:
            raise BranchNotFound(name)
        target = name if dbname == "postgres" else f"{name}.{dbname}"
        return f"postgresql://{userinfo}@127.0.0.1:{self.proxy_port}/{quote(target, safe='')}"

    @property
    def proxy_port(self) -> int:
        return int(self.store.get_setting("proxy_port", DEFAULT_PROXY_PORT))

    @property
    def api_port(self) -> int:
        return int(self.store.get_setting("api_port", DEFAULT_API_PORT))

    # -- routes ------------------------------------------------------------------
    def list_routes(self) -> list[dict[str, Any]]:
        moved = self.store.routes()
        out = [{"route": r, "branch": b, "movable": True} for r, b in moved.items()]
        out += [{"route": b.name, "branch": b.name, "movable": False}
                for b in self.store.all() if b.name not in moved and b.kind is not Kind.SNAPSHOT]
        return sorted(out, key=lambda r: str(r["route"]))

    def set_route(self, route: str, branch: str) -> dict[str, Any]:
        """Point a stable route at a branch (the store change only; the service also moves live sessions)."""
        check_name(route, "route")
        check_name(branch)
        if self.store.get(branch).kind is Kind.SNAPSHOT:
            raise InvalidInput(f"branch {branch!r} is a read-only snapshot and cannot serve a route",
                               "Create a branch from it and route to that: "
                               f"`tierbase branch create NAME --parent {branch}`")
        previous = self.store.set_route(route, branch)
        return {"route": route, "branch": branch, "previous": previous or self._own_branch(route)}

    def _own_branch(self, route: str) -> str | None:
        return route if self.store.find(route) else None

    def sweep(self, now: float | None = None) -> list[str]:
        return self.branches.sweep(now)

    def describe(self, b: Branch, *, with_bytes: bool = False) -> dict[str, Any]:
        provider = self.branches.provider
        pid = provider.running_pid(b.volume) if b.state.value == "ready" else None
        now = time.time()
        info: dict[str, Any] = {
            "name": b.name, "parent": b.parent, "kind": b.kind.value, "state": b.state.value,
            "protected": b.protected, "creator": b.creator, "created_at": b.created_at,
            "age": format_duration(now - b.created_at), "fork_lsn": b.fork_lsn,
            "ttl_seconds": b.ttl_seconds, "expires_at": b.expires_at,
            "expires_in": format_duration(b.expires_at - now) if b.expires_at else None,
            "compute": "running" if pid else ("none" if b.kind is Kind.SNAPSHOT else "stopped"),
            "pid": pid, "port": b.port, "driver": provider.driver.name,
            "copy_on_write": provider.copy_on_write,
        }
        if with_bytes and b.state.value == "ready":
            try:
                info["own_bytes"] = provider.own_bytes(b.volume)
            except TierbaseError:
                info["own_bytes"] = None
        return info

    def status(self) -> dict[str, Any]:
        branches = self.store.all()
        running = sum(1 for b in branches if self.branches.provider.running_pid(b.volume))
        bins = find_binaries()
        return {
            "home": str(self.home.root), "driver": self.driver.name, "copy_on_write": self.driver.copy_on_write,
            "postgres": {"bindir": str(bins.bindir), "major": bins.major},
            "compute_user": self.branches.provider.pg.user.name,
            "branches": len(branches), "computes_running": running,
        }

    # -- import ------------------------------------------------------------------
    def import_dump(self, path: str, branch: str = ROOT_BRANCH, dbname: str = "postgres") -> dict[str, Any]:
        """Restore a pg_dump file (plain SQL or custom/directory/tar archive) into a branch."""
        src = Path(path)
        if not src.exists():
            raise InvalidInput(f"dump file {path!r} does not exist", "Give the path of a pg_dump output")
        check_name(branch)
        self.branches.start(branch)
        b = self.store.get(branch)
        provider = self.branches.provider
        ep = provider.endpoint(b.port, dbname)
        pg = provider.pg
        env = dict(os.environ, PGPASSWORD=ep.password)
        made = dbname != "postgres" and _ensure_database(ep, dbname)
        t0 = time.perf_counter()
        plain = src.is_file() and src.read_bytes()[:5] != b"PGDMP"
        tool = ([pg.bins["psql"], "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"] if plain
                else [pg.bins["pg_restore"], "--no-owner", "--exit-on-error"])
        # one transaction: a dump that fails half way leaves the branch as it was
        args = [*tool[:-1], "--single-transaction", *tool[-1:]] if plain else [*tool, "--single-transaction"]
        args += [str(src.absolute()), "-h", ep.host, "-p", str(ep.port), "-U", ep.user, "-d", dbname]
        got = subprocess.run(args, capture_output=True, text=True, env=env)
        if got.returncode != 0:
            if made:
                _drop_database(ep, dbname)
            raise TierbaseError(f"restoring {path} failed: {got.stderr.strip()[-800:]}",
                                "Fix the dump and try again; nothing was restored")
        return {"branch": branch, "database": dbname, "file": str(src),
                "seconds": round(time.perf_counter() - t0, 2)}


def _ensure_database(ep: Endpoint, dbname: str) -> bool:
    """Create ``dbname`` if missing; True if it was created."""
    with psycopg.connect(ep.dsn("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (dbname,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return True


def _drop_database(ep: Endpoint, dbname: str) -> None:
    with psycopg.connect(ep.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))


def _mounted_ok(driver: VolumeDriver) -> bool:
    """True when the driver's volume root is ready to use as it is."""
    from .storage.btrfs import BtrfsDriver, is_mounted

    if isinstance(driver, BtrfsDriver) and driver.image is not None:
        return is_mounted(driver.root)
    return True
