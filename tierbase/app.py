"""The facade: one object that wires storage, computes, the control plane and governance.

CLI commands and API routes call exactly one method here and render the
result; nothing below this file knows about either. Every action goes through
``self.gate.act(...)``: policy decision with a reason, then the action, then
the audit record.
"""

from __future__ import annotations

import hmac
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from .app_governance import GovernanceOps
from .app_migrate import MigrationOps
from .compute import Postgres, compute_user, find_binaries
from .compute.ports import COMPUTE_PORTS, Ports, check_base, check_port, default_ports, ephemeral_range
from .compute.restore import restore_dump
from .control.store import Branch, Kind, Store
from .errors import BranchNotFound, InvalidInput, Refused, TierbaseError
from .governance.config import load_config
from .governance.gate import os_principal_name
from .governance.policy import Action, Subject
from .governance.principals import new_token
from .names import check_name, format_duration, parse_ttl
from .storage import DEFAULT_IMAGE_SIZE, VolumeDriver, make_driver
from .storage.btrfs import parse_size

ROOT_BRANCH = "production"


class Tierbase(GovernanceOps, MigrationOps):
    """A tierbase platform rooted at one data dir."""

    # -- platform lifecycle ----------------------------------------------------
    def init(self, storage: str = "auto", btrfs_size: str = DEFAULT_IMAGE_SIZE, *,
             api_port: int | None = None, proxy_port: int | None = None, config: str | None = None) -> list[str]:
        """Create (or re-open) the platform: storage ready, root branch present, leftovers reconciled,
        and the tiers of ``config`` (a tierbase.toml) created."""
        said: list[str] = []
        find_binaries()  # fail before touching anything if postgres is missing
        parse_size(btrfs_size)
        cfg = load_config(config) if config else None  # a bad config changes nothing
        ports = default_ports()
        if api_port is not None:
            check_port(api_port, "the API port", f"--api-port {ports.api}")
        if proxy_port is not None:
            check_port(proxy_port, "the proxy port", f"--proxy-port {ports.proxy}")
        user = compute_user()
        fresh = not self.home.exists()
        if fresh:
            check_base(self._port_base())
        self.home.make(user)
        if fresh:
            driver = make_driver(storage, self.home.root, Postgres(), image_size=btrfs_size)
            try:
                said += driver.prepare()
                self.home.private_file(self.home.db, user)
                self._store = Store(self.home.db, self._port_base())
                self.store.set_setting("driver", driver.name)
                self.store.set_setting("btrfs_size", btrfs_size)
                self.store.set_setting("port_base", self._port_base())
                self.store.set_setting("api_port", api_port or ports.api)
                self.store.set_setting("proxy_port", proxy_port or ports.proxy)
                self._driver = driver
                self.home.read_secret(self.home.secret, create=True)
                owner = os_principal_name()
                self.store.set_setting("owner", owner)
                token = new_token()
                self.gate.principals.create(owner, "platform-engineer", created_by=owner, token=token)
                self.home.write_secret(self.home.token, token)
                self.branches.create_root(ROOT_BRANCH, creator=owner)
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
            said += self._move_ports_out_of_ephemeral_range(ports)
            said += self.driver.prepare() if not _mounted_ok(self.driver) else []
            said += self.branches.reconcile()
        if cfg is not None:
            said += self.reload_config(config)["said"]
        return said

    def _move_ports_out_of_ephemeral_range(self, ports: Ports) -> list[str]:
        """A data dir made before ports left the ephemeral range: new computes get ports below it."""
        said, eph = [], ephemeral_range()
        base = int(self.store.get_setting("port_base", ports.base))
        if min(base + COMPUTE_PORTS - 1, 65535) >= eph[0] and base <= eph[1]:
            self.store.set_setting("port_base", ports.base)
            said.append(f"compute ports from {base} reached into the kernel's ephemeral port range "
                        f"{eph[0]}-{eph[1]}: new computes get ports from {ports.base} (existing ones keep theirs)")
        for what, option, port in (("API", "--api-port", self.api_port), ("proxy", "--proxy-port", self.proxy_port)):
            if eph[0] <= port <= eph[1]:
                said.append(f"warning: the {what} port {port} lies in the kernel's ephemeral port range "
                            f"{eph[0]}-{eph[1]}; move it with `tierbase up {option} N` (N below {eph[0]})")
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
                      snapshot: bool = False, start: bool = False) -> dict[str, Any]:
        check_name(name)
        ttl_seconds = parse_ttl(ttl) if ttl else None
        parent = parent or self.config.entry
        parent = self.store.resolve_route(check_name(parent, "parent")) or parent  # a tier's route may have moved
        with self.gate.act(self.actor, Action.BRANCH_CREATE, self._subject(parent)) as rec:
            t0 = time.perf_counter()
            pb = self.store.get(parent)
            hook = None if snapshot else self._mask_hook(name, pb, self._masking_plan(pb))
            if snapshot and self._masking_plan(pb) is not None and not pb.masked_by:
                raise Refused(f"{parent!r} holds sensitive data you may not read unmasked: a snapshot of it "
                              "would be unmasked", f"Create a (masked) branch instead: `tierbase branch create "
                              f"{name} --parent {parent}`")
            b = self.branches.create(name, parent, kind=Kind.SNAPSHOT if snapshot else Kind.FEATURE,
                                     creator=self.gate.principal(self.actor).name, ttl_seconds=ttl_seconds,
                                     start=start, prepare=hook)
            rec.after = info = self.describe(b)
        info["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return info

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]:
        subject = self._subject(name)
        with self.gate.act(self.actor, Action.BRANCH_DELETE, subject, before=self.describe(self.store.get(name))) \
                as rec:
            for d in self.branches.subtree(name)[:-1]:  # every descendant needs the same right
                self._require(Action.BRANCH_DELETE, self.gate.subject(d))
            rec.after = {"deleted": (gone := self.branches.delete(name, recursive=recursive))}
        return gone

    def reset_branch(self, name: str) -> dict[str, Any]:
        with self.gate.act(self.actor, Action.BRANCH_RESET, self._subject(name)) as rec:
            b = self.store.get(name)
            parent = self.store.get(str(b.parent))
            # a masked branch comes back masked: its owner's grant decides as it did at creation
            plan = self.as_principal(b.creator)._masking_plan(parent) if b.parent else None
            if b.masked_by and plan is None:
                plan = self._masking_plan(parent, force=True)
            rec.after = info = self.describe(self.branches.reset(name, self._mask_hook(name, parent, plan)))
        return info

    def start_branch(self, name: str) -> dict[str, Any]:
        with self.gate.act(self.actor, Action.BRANCH_START, self._subject(name)):
            self.branches.start(name)
        return self.describe(self.store.get(name))

    def stop_branch(self, name: str) -> dict[str, Any]:
        with self.gate.act(self.actor, Action.BRANCH_STOP, self._subject(name)):
            self.branches.stop(name)
        return self.describe(self.store.get(name))

    def get_branch(self, name: str, *, with_bytes: bool = True) -> dict[str, Any]:
        check_name(name)
        return self.describe(self.store.get(name), with_bytes=with_bytes)

    def list_branches(self, *, with_bytes: bool = True) -> list[dict[str, Any]]:
        return [self.describe(b, with_bytes=with_bytes) for b in self.store.all() if b.kind is not Kind.SYSTEM]

    def branch_url(self, name: str, dbname: str = "postgres", *, direct: bool = False) -> str:
        """A URL for psql/psycopg with this principal's credentials: through the proxy (stable), or direct.

        Platform engineers and the owner of an unmasked branch get the cluster's superuser; the owner
        of a masked branch a read-write role; any other principal allowed to connect a read-only role
        of its own, created on the branch.
        """
        check_name(name)
        target = self.store.resolve_route(name)
        if target is None:
            raise BranchNotFound(name)
        branch = self.store.get(target)
        subject = self.gate.subject(branch)
        with self.gate.act(self.actor, Action.BRANCH_CONNECT, subject) as rec:
            user, password = self._credentials(subject, branch)
            rec.after = {"user": user}
        userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}"
        if direct:  # no proxy to wake the compute on connect: start it now
            self.branches.start(target)
            port = self.store.get(target).port
            return f"postgresql://{userinfo}@127.0.0.1:{port}/{quote(dbname, safe='')}"
        route = name if dbname == "postgres" else f"{name}.{dbname}"
        return f"postgresql://{userinfo}@127.0.0.1:{self.proxy_port}/{quote(route, safe='')}"

    def _credentials(self, subject: Subject, branch: Branch) -> tuple[str, str]:
        who = self.gate.principal(self.actor)
        provider = self.branches.provider
        masked = bool(branch.masked_by)
        if self.config.base_role(who.role) == "platform-engineer" or (subject.owner == who.name and not masked):
            return provider.endpoint(0).user, provider.password
        # a superuser could read what masking replaced (old row versions, shared files): on a masked
        # branch its owner gets a role that reads and writes data, and changes schema through migrations
        writer = subject.owner == who.name
        # a read-only login of the principal's own, the same password on every branch
        password = hmac.new(provider.password.encode(), f"login:{who.name}".encode(), "sha256").hexdigest()[:32]
        self.branches.start(branch.name)
        with psycopg.connect(provider.endpoint(branch.port).dsn(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname=%s", (who.name,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(who.name),
                                                                            sql.Literal(password)))
            conn.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(sql.Identifier(who.name)))
            if writer:
                conn.execute(sql.SQL("GRANT pg_write_all_data TO {}").format(sql.Identifier(who.name)))
        return who.name, password

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
        subject = self._subject(branch)
        if subject.kind == Kind.SNAPSHOT.value:
            raise InvalidInput(f"branch {branch!r} is a read-only snapshot and cannot serve a route",
                               "Create a branch from it and route to that: "
                               f"`tierbase branch create NAME --parent {branch}`")
        with self.gate.act(self.actor, Action.ROUTE_SET, Subject(name=route, kind="route"),
                           before={"branch": self.store.resolve_route(route)}) as rec:
            previous = self.store.set_route(route, branch)
            rec.after = out = {"route": route, "branch": branch, "previous": previous or self._own_branch(route)}
        return out

    def _own_branch(self, route: str) -> str | None:
        return route if self.store.find(route) else None

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete expired branches (the platform's own action: audited as such)."""
        gone = self.branches.sweep(now)
        for name in gone:
            self.gate.audit.append(actor="tierbase", action="branch.expire", target=name, allowed=True,
                                   reason="ttl: the branch's TTL expired", after={"deleted": [name]})
        return gone

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
            "copy_on_write": provider.copy_on_write, "masked": bool(b.masked_by), "masking": b.masked_by,
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
        src = Path(path).absolute()
        if not src.exists():
            raise InvalidInput(f"dump file {path!r} does not exist", "Give the path of a pg_dump output")
        with self.gate.act(self.actor, Action.BRANCH_IMPORT, self._subject(branch)) as rec:
            self.branches.start(branch)
            t0 = time.perf_counter()
            provider = self.branches.provider
            restore_dump(provider.pg, provider.endpoint(self.store.get(branch).port), src, dbname)
            rec.after = out = {"branch": branch, "database": dbname, "file": str(src),
                               "seconds": round(time.perf_counter() - t0, 2)}
        return out

def _mounted_ok(driver: VolumeDriver) -> bool:
    """True when the driver's volume root is ready to use as it is."""
    from .storage.btrfs import BtrfsDriver, is_mounted

    if isinstance(driver, BtrfsDriver) and driver.image is not None:
        return is_mounted(driver.root)
    return True
