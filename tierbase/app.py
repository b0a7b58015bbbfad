"""The facade: one object that wires storage, computes, the control plane and governance.

CLI commands and API routes call exactly one method here and render the
result; nothing below this file knows about either. Every action goes through
``self.gate.act(...)``: policy decision with a reason, then the action, then
the audit record.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from .app_flow import FlowOps
from .app_governance import GovernanceOps
from .app_images import ImageOps
from .app_import import ImportOps
from .app_pitr import PitrOps
from .app_rollback import RollbackOps
from .app_sessions import SessionOps
from .app_sql import SqlOps
from .control import space as spacectl
from .control.store import Branch, Kind, Store
from .errors import BranchNotFound, InvalidInput, NotRunning, PolicyDenied, Refused, TierbaseError
from .governance.config import load_config
from .governance.gate import os_principal_name
from .governance.policy import Action, Subject
from .governance.principals import db_password, new_token
from .names import check_name, check_unreserved, format_duration, parse_ttl
from .provider import (
    COMPUTE_PORTS,
    DEFAULT_IMAGE_SIZE,
    DIRECT_GROUP,
    OWNER_ROLE,
    READER_ROLE,
    ComputeUser,
    LocalProvider,
    Ports,
    check_base,
    check_port,
    compute_user,
    default_ports,
    ephemeral_range,
    find_binaries,
    parse_size,
)

ROOT_BRANCH = "production"


class Tierbase(GovernanceOps, ImageOps, RollbackOps, ImportOps, FlowOps, SqlOps, SessionOps, PitrOps):
    """A tierbase platform rooted at one data dir."""

    # -- platform lifecycle ----------------------------------------------------
    def init(self, storage: str = "auto", btrfs_size: str = DEFAULT_IMAGE_SIZE, *,
             api_port: int | None = None, proxy_port: int | None = None, config: str | None = None,
             space_reserve: str | None = None) -> list[str]:
        """Create (or re-open) the platform: storage ready, root branch present, leftovers reconciled,
        and the tiers of ``config`` (a tierbase.toml) created. ``space_reserve``: pool space kept for
        tiers (control/space.py)."""
        said: list[str] = []
        if self._local:
            find_binaries()  # fail before touching anything if postgres is missing
        parse_size(btrfs_size)
        reserve = parse_size(space_reserve) if space_reserve else None
        cfg = load_config(config) if config else None  # a bad config changes nothing
        ports = default_ports()
        if api_port is not None:
            check_port(api_port, "the API port", f"--api-port {ports.api}")
        if proxy_port is not None:
            check_port(proxy_port, "the proxy port", f"--proxy-port {ports.proxy}")
        user = compute_user() if self._local else ComputeUser.current()
        fresh = not self.home.exists()
        if fresh:
            check_base(self._port_base())
        if fresh and self.home.root.exists() and any(self.home.root.iterdir()) and not self.home.owned():
            raise InvalidInput(f"{self.home.root} is not empty and is not a tierbase data dir",
                               "Choose an empty or new directory for TIERBASE_HOME")
        existed = set(self.home.root.iterdir()) if self.home.root.exists() else None
        self.home.make(user)
        if fresh:
            self.home.write_marker()
            provider = LocalProvider.open(self.home.root, storage, image_size=btrfs_size) if self._local \
                else self.provider
            try:
                said += provider.prepare()
                self.home.private_file(self.home.db, user)
                self._store = Store(self.home.db, self._port_base())
                self.store.set_setting("driver", provider.name)
                self.store.set_setting("btrfs_size", btrfs_size)
                self.store.set_setting("port_base", self._port_base())
                self.store.set_setting("api_port", api_port or ports.api)
                self.store.set_setting("proxy_port", proxy_port or ports.proxy)
                self._provider = provider
                owner = os_principal_name()
                self.store.set_setting("owner", owner)
                token = new_token()
                self.gate.principals.create(owner, "platform-engineer", created_by=owner, token=token)
                self.home.write_secret(self.home.token, token)
                self.branches.create_root(ROOT_BRANCH, creator=owner)
            except BaseException:
                self.close()
                provider.release(purge=True)
                _remove_made(self.home.root, existed)  # only what this first `up` made
                raise
            said.append(f"created the root branch {ROOT_BRANCH!r} with initdb (storage driver: {provider.name})")
        else:
            stored = self.store.get_setting("driver")
            if storage not in ("auto", stored) and self._local:
                raise InvalidInput(f"this data dir uses the {stored!r} storage driver, not {storage!r}",
                                   "Use `tierbase down --purge` first to start over with another driver")
            for key, value in (("api_port", api_port), ("proxy_port", proxy_port)):
                if value:
                    self.store.set_setting(key, value)
            if not self.home.owned():  # made by a tierbase from before the marker: its meta.db says so
                self.home.write_marker()
            said += self._move_ports_out_of_ephemeral_range(ports)
            said += self.provider.prepare()
            said += self.reconcile()
        if reserve is not None:
            self.store.set_setting("space_reserve", reserve)
        said += spacectl.isolate(self.provider, self.store)  # root only: the features' share of the pool
        if cfg is not None:
            said += self.reload_config(config)["said"]
        return said

    # -- pool space (control/space.py) -------------------------------------------
    def space(self) -> dict[str, Any]:
        """The pool's free space, the reserve kept for tiers, the features' limit, and a warning if low."""
        return spacectl.measure(self.provider, self.store).to_dict()

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
        """Stop every compute; unmount; with purge, remove every byte of the data dir (only one tierbase made)."""
        if purge and self.home.root.exists() and not self.home.owned():
            raise Refused(f"{self.home.root} is not a tierbase data dir (it has no {self.home.marker.name}); "
                          "nothing was deleted", "Check TIERBASE_HOME / --home")
        if not self.home.exists():
            if purge and self.home.root.exists():
                shutil.rmtree(self.home.root, ignore_errors=True)
            return []
        said = []
        for port in self.branches.provider.pooler().stop_all():
            said.append(f"stopped the PgBouncer of the compute on port {port}")
        for b in self.store.all():
            if self.branches.provider.stop(b.name, b.volume):
                said.append(f"stopped the compute of {b.name!r}")
        provider = self.provider
        self.close()
        said += provider.release(purge=purge)
        if purge:
            shutil.rmtree(self.home.root, ignore_errors=True)
            said.append(f"removed {self.home.root}")
        return said

    def reconcile(self) -> list[str]:
        """Finish or undo what dead processes left: branch operations, rollbacks, then promotions (audited)."""
        return self.branches.reconcile() + self.reconcile_rollbacks() + self.reconcile_promotions()

    # -- branches --------------------------------------------------------------
    def create_branch(self, name: str, parent: str | None = None, *, ttl: str | None = None,
                      snapshot: bool = False, start: bool = False, platform_name: bool = False,
                      at: str | None = None, lsn: str | None = None, inclusive: bool = True) -> dict[str, Any]:
        """Branch ``parent`` (default: the entry tier) as ``name``; ``at``/``lsn``: as it was then (app_pitr).

        ``platform_name``: set only by platform code that made ``name`` itself (migrate verify, the CI
        branch); no request can set it, so the names the platform reserves stay its own.
        """
        if at is not None or lsn is not None:
            if snapshot:
                raise InvalidInput("a branch at a point in time cannot be a snapshot",
                                   "Drop --snapshot: the branch is made writable at that point")
            return self.create_branch_at(name, parent, at=at, lsn=lsn, inclusive=inclusive, ttl=ttl, start=True)
        check_name(name)
        ttl_seconds = parse_ttl(ttl) if ttl else None
        parent = parent or self.config.entry
        parent = self.store.resolve_route(check_name(parent, "parent")) or parent  # a tier's route may have moved
        with self.gate.act(self.actor, Action.BRANCH_CREATE, self._subject(parent),
                           intent={"op": "create", "branch": name, "parent": parent}) as rec:
            if not platform_name:
                check_unreserved(name)  # inside the gate: an attempt to take a platform name is audited
                self.check_quota(self.gate.principal(self.actor), branch=True, compute=start)
            t0 = time.perf_counter()
            spacectl.check_room(self.provider, self.store)  # refused (DiskFull, audited) below the reserve
            pb = self.store.get(parent)
            plan = None if snapshot else self._masking_plan(pb)
            image = self._current_image(pb) if plan is not None and not pb.masked_by else None
            if image is not None:  # the tier's masked image: a clone of it has nothing to mask (app_images.py)
                pb, plan = image[0], self._masking_plan(image[0])
            hook = None if snapshot else self._mask_hook(name, pb, plan)
            if snapshot and self._masking_plan(pb) is not None and not pb.masked_by:
                raise Refused(f"{parent!r} holds sensitive data you may not read unmasked: a snapshot of it "
                              "would be unmasked", f"Create a (masked) branch instead: `tierbase branch create "
                              f"{name} --parent {parent}`")
            who = self.gate.principal(self.actor).name
            b = self.branches.create(name, pb.name, kind=Kind.SNAPSHOT if snapshot else Kind.FEATURE,
                                     creator=who, ttl_seconds=ttl_seconds, start=start, prepare=hook, actor=who)
            rec.after = info = self.describe(b)
            if image is not None:
                info["masked_image"] = {"image": image[0].name, "tier_branch": parent, "as_of": image[1]["as_of"]}
        info["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return info

    def create_ci_branch(self, feature: str, parent: str | None = None, *, ttl: str | None = None) -> dict[str, Any]:
        """The workflow's CI branch of ``feature``: the platform names it `ci-<feature>` (reserved)."""
        return self.create_branch(f"ci-{check_name(feature, 'feature')}", parent, ttl=ttl, platform_name=True)

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]:
        subject = self._subject(name)
        doomed = [d.name for d in self.branches.subtree(name)]
        with self.gate.act(self.actor, Action.BRANCH_DELETE, subject, before=self.describe(self.store.get(name)),
                           intent={"op": "delete", "branch": name, "subtree": doomed}) as rec:
            for d in self.branches.subtree(name)[:-1]:  # every descendant needs the same right
                self._require(Action.BRANCH_DELETE, self.gate.subject(d))
            gone = self.branches.delete(name, recursive=recursive, actor=self.gate.principal(self.actor).name)
            rec.after = {"deleted": gone}
        return gone

    def reset_branch(self, name: str) -> dict[str, Any]:
        with self.gate.act(self.actor, Action.BRANCH_RESET, self._subject(name),
                           intent={"op": "reset", "branch": name}) as rec:
            b = self.store.get(name)
            parent = self.store.get(str(b.parent))
            # a masked branch comes back masked: its owner's grant decides as it did at creation
            plan = self.as_principal(b.creator)._masking_plan(parent) if b.parent else None
            if b.masked_by and plan is None:
                plan = self._masking_plan(parent, force=True)
            rec.after = info = self.describe(self.branches.reset(name, self._mask_hook(name, parent, plan),
                                                                 actor=self.gate.principal(self.actor).name))
        return info

    def start_branch(self, name: str) -> dict[str, Any]:
        with self.gate.act(self.actor, Action.BRANCH_START, self._subject(name)):
            b = self.store.get(name)
            if b.creator == self.gate.principal(self.actor).name and not self.branches.provider.running_pid(b.volume):
                self.check_quota(self.gate.principal(self.actor), compute=True)
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

    def branch_url(self, name: str, dbname: str = "postgres", *, direct: bool = False,
                   sslmode: str | None = None, pooled: bool = False) -> str:
        """A URL for psql/psycopg with this principal's own credentials, through the proxy (stable).

        The user is the principal and the password its Postgres password (derived from its token:
        the platform keeps only the SCRAM verifier). What the principal may do once connected is
        decided by the proxy at each login (policy ``branch.connect``, then the compute role).
        ``direct``: the compute's own port, for platform engineers only, with a login role of their own.
        ``pooled``: the proxy's pooled port (transaction pooling by the compute's PgBouncer, pooler.py).
        """
        if direct and pooled:
            raise InvalidInput("a URL is either direct or pooled", "Ask for one of --direct and --pooled")
        check_name(name)
        target = self.store.resolve_route(name)
        if target is None:
            raise BranchNotFound(name)
        branch = self.store.get(target)
        subject = self.gate.subject(branch)
        who = self.gate.principal(self.actor)
        if direct and self.config.base_role(who.role) != "platform-engineer":
            reason = "only platform engineers get URLs around the proxy"
            self.gate.audit.append(actor=who.name, action="branch.connect.direct", target=name, allowed=False,
                                   reason=f"builtin.direct-pe-only: {reason}", outcome="refused")
            raise PolicyDenied("branch.connect.direct", name, reason, "builtin.direct-pe-only")
        with self.gate.act(self.actor, Action.BRANCH_CONNECT, subject) as rec:
            password = self._db_password()
            if direct:
                self.branches.start(target)
                user = self._direct_login(self.store.get(target), who.name)
                rec.after = {"user": user, "direct": True}
                port = self.store.get(target).port
                return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/" \
                       f"{quote(dbname, safe='')}"
            rec.after = {"user": who.name, "role": self.connect_role(who.name, branch.name, audit=False)}
        route = name if dbname == "postgres" else f"{name}.{dbname}"
        query = f"?sslmode={sslmode}" if sslmode else ""
        port = self.pool_port if pooled else self.proxy_port
        return f"postgresql://{quote(who.name, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/" \
               f"{quote(route, safe='')}{query}"

    def _db_password(self) -> str:
        """This principal's Postgres password: derived from the token it acts with."""
        token = self.token
        if token is None and (self.actor is None or self.actor == self.gate.owner):
            with contextlib.suppress(OSError):
                token = self.home.token.read_text().strip()
        if not token:
            raise InvalidInput(f"no token is known for principal {self.gate.principal(self.actor).name!r}, so its "
                               "database password cannot be derived",
                               "Use the CLI/SDK with TIERBASE_TOKEN, or Tierbase.as_principal(name, token=...)")
        return db_password(token)

    def _direct_login(self, b: Branch, principal: str) -> str:
        """A platform engineer's own TCP login role on one compute (member of tb_owner and tb_direct)."""
        verifier = self.gate.principals.verifier(principal)
        if verifier is None:
            raise InvalidInput(f"principal {principal!r} has no database password yet",
                               "Use its token once with the CLI or API, then ask again")
        role = f"pe_{principal}"
        with psycopg.connect(self.branches.provider.endpoint(b.port).dsn(), autocommit=True) as conn:
            ident = sql.Identifier(role)
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname=%s", (role,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION IN ROLE {}, {}")
                             .format(ident, sql.Identifier(OWNER_ROLE), sql.Identifier(DIRECT_GROUP)))
                # objects it makes belong to tb_owner, like everything the proxy's owners make
                conn.execute(sql.SQL("ALTER ROLE {} SET role = {}").format(ident, sql.Literal(OWNER_ROLE)))
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(verifier)))
        return role

    def tls_ca(self) -> dict[str, Any]:
        """The CA certificate that signs the proxy's (public): clients verify the proxy with it."""
        cert = self.store.get_setting("tls_cert")
        path = Path(cert) if cert else self.home.root / "tls" / "ca.crt"
        if not path.exists():
            raise NotRunning("the proxy has no TLS certificate yet", "Start the platform with `tierbase up`")
        return {"pem": path.read_text(), "operator_supplied": bool(cert)}

    # -- the proxy's questions -------------------------------------------------------------
    def login_verifier(self, user: str) -> str | None:
        """The SCRAM verifier principal ``user`` logs in to the proxy with (None: unknown or revoked)."""
        return self.gate.principals.verifier(user)

    def connect_role(self, user: str, branch: str, *, audit: bool = True,
                     later: Callable[[Callable[[], None]], None] | None = None) -> str:
        """May principal ``user`` connect to ``branch``, and as which compute role? PolicyDenied if not.

        Owners of a branch and platform engineers get ``tb_owner``; everyone else the policy lets in
        gets ``tb_reader``; the audit trail's own cluster is read-only for all.
        """
        b = self.store.get(branch)
        who = self.gate.principal(user)
        if b.kind is Kind.SYSTEM:
            action, subject = Action.AUDIT_READ, Subject(name=b.name, kind="none")
        else:
            action, subject = Action.BRANCH_CONNECT, self.gate.subject(b)
        decision = self.gate.decide(user, action, subject)
        if audit:
            self.gate.audit_windowed(actor=who.name, action=f"{action.value}.proxy", target=b.name,
                                     allowed=decision.allowed, reason=f"{decision.rule}: {decision.reason}",
                                     later=later)
        if not decision.allowed:
            raise PolicyDenied(action.value, b.name, decision.reason, decision.rule)
        if audit:  # a login on a leased branch is activity: it renews the lease (throttled, off the loop)
            self.renew_on_activity(b.name, later)
        if b.kind is Kind.SYSTEM or self.config.read_only(who.role):  # read-only roles read, wherever they are
            return READER_ROLE
        if self.config.base_role(who.role) == "platform-engineer" or subject.owner == who.name:
            return OWNER_ROLE
        return READER_ROLE

    # -- routes ------------------------------------------------------------------
    def list_routes(self) -> list[dict[str, Any]]:
        moved = self.store.routes()
        out = [{"route": r, "branch": b, "movable": True} for r, b in moved.items()]
        out += [{"route": b.name, "branch": b.name, "movable": False}
                for b in self.store.all() if b.name not in moved and b.kind is not Kind.SNAPSHOT]
        return sorted(out, key=lambda r: str(r["route"]))

    def set_route(self, route: str, branch: str, *, drain: float = 0.0) -> dict[str, Any]:
        """Point a stable route at a branch; under the service, live sessions of the route move too
        (``_move_route``: the one repoint path, shared with promotion and rollback)."""
        check_name(route, "route")
        subject = self._subject(branch)
        if subject.kind == Kind.SNAPSHOT.value:
            raise InvalidInput(f"branch {branch!r} is a read-only snapshot and cannot serve a route",
                               "Create a branch from it and route to that: "
                               f"`tierbase branch create NAME --parent {branch}`")
        with self.gate.act(self.actor, Action.ROUTE_SET, Subject(name=route, kind="route"),
                           before={"branch": self.store.resolve_route(route)},
                           intent={"op": "route.set", "route": route, "branch": branch}) as rec:
            out = self._move_route(route, branch, drain=drain)
            rec.after = {k: out[k] for k in ("route", "branch", "previous")}
        return out

    def _own_branch(self, route: str) -> str | None:
        return route if self.store.find(route) else None

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete expired branches (the platform's own action: audited as such, intent first).

        A branch with children waits until they are gone (they go first, in the same sweep when
        they expired too); one behind a route, or busy, is skipped and the sweep goes on.
        """
        gone: list[str] = []
        progress = True
        while progress:
            progress = False
            routed = set(self.store.routes().values())
            for b in self.branches.expired(now):
                if b.protected or b.name in routed or b.name in gone or self.store.children(b.name):
                    continue
                why = "ttl: the branch's TTL expired"
                self.gate.audit.append(actor="tierbase", action="branch.expire", target=b.name, allowed=True,
                                       reason=why, outcome="intent", after={"delete": [b.name]})
                try:
                    deleted = self.branches.delete(b.name, actor="tierbase")
                except TierbaseError as err:  # busy, or a route appeared meanwhile: the others still go
                    self.gate.audit.append(actor="tierbase", action="branch.expire", target=b.name, allowed=True,
                                           reason=why, outcome=f"error: {err.message}")
                    continue
                self.gate.audit.append(actor="tierbase", action="branch.expire", target=b.name, allowed=True,
                                       reason=why, after={"deleted": deleted})
                gone += deleted
                progress = True
        self.sessions_reclaimed()  # the leases of what went: ended and audited, naming their holders
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
            "pid": pid, "port": b.port, "driver": provider.name,
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
        running = sum(1 for b in branches if self.provider.running_pid(b.volume))
        health = self.provider.health()
        return {
            "home": str(self.home.root), "driver": health.driver, "copy_on_write": health.copy_on_write,
            "postgres": health.postgres, "compute_user": health.compute_user,
            "branches": len(branches), "computes_running": running, "space": self.space(),
            "warnings": self.history_warnings(),  # archiving that fails (app_pitr)
        }


def _remove_made(root: Path, existed: set[Path] | None) -> None:
    """Undo a failed first `up`: the whole directory if it made it, else only the entries it added."""
    if existed is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for entry in set(root.iterdir()) - existed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)

