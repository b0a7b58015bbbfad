"""Branch operations as a principal: create, delete, reset, start, stop, show, URLs, routes, the sweep.

``BranchOps`` takes the core and what a branch's making needs: the masking service and the masked
images (a masked branch of a tier), the quotas, the logins (a URL names the role the proxy will
give), the renewals (the sweep ends the leases of what it deleted) and time travel (``at=``).
Every operation is decided and audited by the gate; control/branches.py acts on the substrate.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from .app_base import Core
from .app_images import Images
from .app_leases import Quotas, Renewals
from .app_logins import Logins
from .app_masking import Masking
from .app_pitr import Pitr
from .control import space as spacectl
from .control.branches import Branches
from .control.store import Kind, Store
from .errors import BranchNotFound, InvalidInput, PolicyDenied, Refused, TierbaseError
from .governance.policy import Action, Subject
from .names import check_name, check_unreserved, parse_ttl


class BranchOps:
    def __init__(self, core: Core, *, masking: Masking, images: Images, quotas: Quotas, renewals: Renewals,
                 logins: Logins, pitr: Pitr) -> None:
        self.core = core
        self.masking = masking
        self.images = images
        self.quotas = quotas
        self.renewals = renewals
        self.logins = logins
        self.pitr = pitr

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def branches(self) -> Branches:
        return self.core.branches

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
            return self.pitr.create_branch_at(name, parent, at=at, lsn=lsn, inclusive=inclusive, ttl=ttl, start=True)
        check_name(name)
        ttl_seconds = parse_ttl(ttl) if ttl else None
        parent = parent or self.core.config.entry
        parent = self.store.resolve_route(check_name(parent, "parent")) or parent  # a tier's route may have moved
        with self.core.act(Action.BRANCH_CREATE, self.core.subject(parent),
                           intent={"op": "create", "branch": name, "parent": parent}) as rec:
            if not platform_name:
                check_unreserved(name)  # inside the gate: an attempt to take a platform name is audited
                self.quotas.check_quota(self.core.principal(), branch=True, compute=start)
            t0 = time.perf_counter()
            spacectl.check_room(self.core.provider, self.store)  # refused (DiskFull, audited) below the reserve
            pb = self.store.get(parent)
            plan = None if snapshot else self.masking.plan(pb)
            image = self.images.current_image(pb) if plan is not None and not pb.masked_by else None
            if image is not None:  # the tier's masked image: a clone of it has nothing to mask (app_images.py)
                pb, plan = image[0], self.masking.plan(image[0])
            hook = None if snapshot else self.masking.hook(name, pb, plan)
            if snapshot and self.masking.plan(pb) is not None and not pb.masked_by:
                raise Refused(f"{parent!r} holds sensitive data you may not read unmasked: a snapshot of it "
                              "would be unmasked", f"Create a (masked) branch instead: `tierbase branch create "
                              f"{name} --parent {parent}`")
            who = self.core.principal().name
            b = self.branches.create(name, pb.name, kind=Kind.SNAPSHOT if snapshot else Kind.FEATURE,
                                     creator=who, ttl_seconds=ttl_seconds, start=start, prepare=hook, actor=who)
            rec.after = info = self.core.describe(b)
            if image is not None:
                info["masked_image"] = {"image": image[0].name, "tier_branch": parent, "as_of": image[1]["as_of"]}
        info["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return info

    def create_ci_branch(self, feature: str, parent: str | None = None, *, ttl: str | None = None) -> dict[str, Any]:
        """The workflow's CI branch of ``feature``: the platform names it `ci-<feature>` (reserved)."""
        return self.create_branch(f"ci-{check_name(feature, 'feature')}", parent, ttl=ttl, platform_name=True)

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]:
        subject = self.core.subject(name)
        doomed = [d.name for d in self.branches.subtree(name)]
        with self.core.act(Action.BRANCH_DELETE, subject, before=self.core.describe(self.store.get(name)),
                           intent={"op": "delete", "branch": name, "subtree": doomed}) as rec:
            for d in self.branches.subtree(name)[:-1]:  # every descendant needs the same right
                self.core.require(Action.BRANCH_DELETE, self.core.gate.subject(d))
            kept = self._kept_states(doomed)
            gone = self.branches.delete(name, recursive=recursive, actor=self.core.principal().name, kept=kept)
            rec.after = {"deleted": gone, **({"kept_states": sorted(kept)} if kept else {})}
        return gone

    def _kept_states(self, names: list[str]) -> frozenset[str]:
        """Which of ``names`` are states a rollback or a restore kept (``TIER-before-restore-N``, a replaced
        tier branch and its ``TIER-replaced-N`` route): tier-kind, protected, and serving no declared
        tier (``Subject.kept``). Protection keeps them from the sweeper, from agents and from ``reset``;
        a platform engineer deletes one on purpose (policy step 2). For anyone else they stay protected."""
        if self.core.config.base_role(self.core.principal().role) != "platform-engineer":
            return frozenset()
        return frozenset(n for n in names if self.core.gate.subject(self.store.get(n)).kept)

    def reset_branch(self, name: str) -> dict[str, Any]:
        with self.core.act(Action.BRANCH_RESET, self.core.subject(name),
                           intent={"op": "reset", "branch": name}) as rec:
            b = self.store.get(name)
            parent = self.store.get(str(b.parent))
            # a masked branch comes back masked: its owner's grant decides as it did at creation
            plan = self.masking.as_principal(b.creator).plan(parent) if b.parent else None
            if b.masked_by and plan is None:
                plan = self.masking.plan(parent, force=True)
            rec.after = info = self.core.describe(self.branches.reset(name, self.masking.hook(name, parent, plan),
                                                                      actor=self.core.principal().name))
        return info

    def start_branch(self, name: str) -> dict[str, Any]:
        with self.core.act(Action.BRANCH_START, self.core.subject(name)):
            b = self.store.get(name)
            if b.creator == self.core.principal().name and not self.branches.provider.running_pid(b.volume):
                self.quotas.check_quota(self.core.principal(), compute=True)
            self.branches.start(name)
        return self.core.describe(self.store.get(name))

    def stop_branch(self, name: str) -> dict[str, Any]:
        with self.core.act(Action.BRANCH_STOP, self.core.subject(name)):
            self.branches.stop(name)
        return self.core.describe(self.store.get(name))

    def get_branch(self, name: str, *, with_bytes: bool = True) -> dict[str, Any]:
        check_name(name)
        return self.core.describe(self.store.get(name), with_bytes=with_bytes)

    def list_branches(self, *, with_bytes: bool = True) -> list[dict[str, Any]]:
        return [self.core.describe(b, with_bytes=with_bytes) for b in self.store.all() if b.kind is not Kind.SYSTEM]

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
        subject = self.core.gate.subject(branch)
        who = self.core.principal()
        if direct and self.core.config.base_role(who.role) != "platform-engineer":
            reason = "only platform engineers get URLs around the proxy"
            self.core.gate.audit.append(actor=who.name, action="branch.connect.direct", target=name, allowed=False,
                                        reason=f"builtin.direct-pe-only: {reason}", outcome="refused")
            raise PolicyDenied("branch.connect.direct", name, reason, "builtin.direct-pe-only")
        with self.core.act(Action.BRANCH_CONNECT, subject) as rec:
            password = self.core.db_password()
            if direct:
                self.branches.start(target)
                user = self.logins.direct_login(self.store.get(target), who.name)
                rec.after = {"user": user, "direct": True}
                port = self.store.get(target).port
                return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/" \
                       f"{quote(dbname, safe='')}"
            rec.after = {"user": who.name, "role": self.logins.connect_role(who.name, branch.name, audit=False)}
        route = name if dbname == "postgres" else f"{name}.{dbname}"
        query = f"?sslmode={sslmode}" if sslmode else ""
        port = self.core.pool_port if pooled else self.core.proxy_port
        return f"postgresql://{quote(who.name, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/" \
               f"{quote(route, safe='')}{query}"

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
        subject = self.core.subject(branch)
        if subject.kind == Kind.SNAPSHOT.value:
            raise InvalidInput(f"branch {branch!r} is a read-only snapshot and cannot serve a route",
                               "Create a branch from it and route to that: "
                               f"`tierbase branch create NAME --parent {branch}`")
        with self.core.act(Action.ROUTE_SET, Subject(name=route, kind="route"),
                           before={"branch": self.store.resolve_route(route)},
                           intent={"op": "route.set", "route": route, "branch": branch}) as rec:
            out = self.core.move_route(route, branch, drain=drain)
            rec.after = {k: out[k] for k in ("route", "branch", "previous")}
        return out

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
                self.core.gate.audit.append(actor="tierbase", action="branch.expire", target=b.name, allowed=True,
                                            reason=why, outcome="intent", after={"delete": [b.name]})
                try:
                    deleted = self.branches.delete(b.name, actor="tierbase")
                except TierbaseError as err:  # busy, or a route appeared meanwhile: the others still go
                    self.core.gate.audit.append(actor="tierbase", action="branch.expire", target=b.name, allowed=True,
                                                reason=why, outcome=f"error: {err.message}")
                    continue
                self.core.gate.audit.append(actor="tierbase", action="branch.expire", target=b.name, allowed=True,
                                            reason=why, after={"deleted": deleted})
                gone += deleted
                progress = True
        self.renewals.sessions_reclaimed()  # the leases of what went: ended and audited, naming their holders
        return gone
