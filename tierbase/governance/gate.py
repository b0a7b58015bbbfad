"""The gate every control-plane action goes through: authorize, act, audit.

``with gate.act(actor, action, subject) as rec:`` decides first (a denial is
audited and raised as PolicyDenied, exit 2), lets the caller act, then writes
the audit record only after the action committed (or failed, with why).
Changes of a branch, route or tier pass ``intent=``: their intent is audited
before the act too, so that a kill between the act and its outcome record
still leaves the change on the trail.
"""

from __future__ import annotations

import getpass
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..control.store import Branch, Kind, Store
from ..errors import PolicyDenied, TierbaseError, translate
from ..failpoints import failpoint
from ..home import Home
from ..names import platform_only
from ..settings import default
from .audit import AuditLog
from .config import Config, ConfigError, default_config, parse_config
from .policy import Action, Decision, PolicyEngine, Subject
from .principals import Principal, Principals


@dataclass
class Record:
    """What the acting code tells the gate for the audit record."""

    before: Any = None
    after: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def os_principal_name() -> str:
    """The local OS user as a principal name (the first platform engineer)."""
    name = re.sub(r"[^a-z0-9-]", "-", getpass.getuser().lower()).strip("-")[:63]
    return name or "owner"


#: Connections are many: the trail records the first of each (who, what, where, outcome) per window
#: and carries the number of the others into the next record of that kind.
AUDIT_WINDOW: float = default("audit_window")


class Gate:
    def __init__(self, store: Store, home: Home) -> None:
        self.store = store
        self.principals = Principals(store)
        self.audit = AuditLog(store, home.read_secret(home.root / "audit.key", create=True).encode())
        self._config: Config | None = None
        self._windows: dict[tuple[str, str, str, bool], tuple[float, int]] = {}
        self._windows_lock = threading.Lock()

    def audit_windowed(self, *, actor: str, action: str, target: str, allowed: bool, reason: str,
                       later: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Audit a frequent event (a proxied login) at most once per window per kind, with a count.

        The first event of a window is appended at once (with how many of its kind the previous
        window folded in); the rest only count. A flood thus grows the trail by one record a minute.
        """
        key, now = (actor, action, target, allowed), time.monotonic()
        with self._windows_lock:
            start, folded = self._windows.get(key, (0.0, 0))
            if now - start < AUDIT_WINDOW:
                self._windows[key] = (start, folded + 1)
                return
            self._windows[key] = (now, 0)
            if len(self._windows) > 10_000:  # forget the oldest windows rather than grow without bound
                for k in sorted(self._windows, key=lambda k: self._windows[k][0])[:5_000]:
                    del self._windows[k]

        def write() -> None:
            self.audit.append(actor=actor, action=action, target=target, allowed=allowed, reason=reason,
                              outcome="ok" if allowed else "refused",
                              after={"folded_before": folded, "window_seconds": AUDIT_WINDOW})

        # ``later``: the proxy's event loop must not wait on the audit's write lock and fsync
        (later or (lambda f: f()))(write)

    # -- config ------------------------------------------------------------------
    @property
    def config(self) -> Config:
        text = self.store.get_setting("config_text")
        if self._config is None or (text is not None and self._config.text != text):
            self._config = parse_config(text, "the stored config") if text is not None else default_config()
        return self._config

    def check_against_branches(self, cfg: Config) -> None:
        """Problems a config has with the branches that exist (not just with itself)."""
        problems = []
        root = next(b for b in self.store.all() if b.parent is None and b.kind is not Kind.SYSTEM)
        if cfg.root != root.name:
            problems.append(f"tiers.{cfg.root}: the root tier must be the root branch {root.name!r}")
        for name in cfg.tiers:
            b = self.store.find(name)
            if b is not None and b.kind is not Kind.TIER:
                problems.append(f"tiers.{name}: a {b.kind.value} branch named {name!r} already exists")
            parent = cfg.tiers[name].parent
            if b is not None and parent is not None and b.parent != parent:
                problems.append(f"tiers.{name}.parent: the existing tier's parent is {b.parent!r}, not {parent!r}")
        if problems:
            raise ConfigError(problems, "the config")

    def check_roles_kept(self, cfg: Config, old: Config) -> None:
        """An agent role stays agent: a reload may not lift the agent rules off a role (or off the
        principals holding it) that they bound under the config in force."""
        held = {p.role for p in self.principals.all() if p.revoked_at is None}
        bound = {r for r in {*old.agent_roles(), *held} if old.base_role(r) == "agent"}
        problems = [f"roles.{r}.like: {r!r} is an agent role under the config in force and an agent role "
                    f"stays agent (the new config makes it {cfg.base_role(r)!r}); declare a new role for "
                    "principals that need more" for r in sorted(bound) if cfg.base_role(r) != "agent"]
        if problems:
            raise ConfigError(problems, "the config")

    def store_config(self, cfg: Config, source: str) -> None:
        self.store.set_setting("config_text", cfg.text)
        self.store.set_setting("config_source", source)
        self._config = cfg

    @property
    def policy(self) -> PolicyEngine:
        return PolicyEngine(self.config)

    # -- principals --------------------------------------------------------------
    def principal(self, name: str | None) -> Principal:
        return self.principals.get(name or self.owner)

    @property
    def owner(self) -> str:
        return str(self.store.get_setting("owner", "owner"))

    # -- subjects ----------------------------------------------------------------
    def subject(self, b: Branch) -> Subject:
        """How the policy sees a branch; a branch serving a tier's route (after a rollback) is that tier,
        and every branch carries the declared tier whose data it holds (rules follow lineage)."""
        routes = self.store.routes()
        name = self._declared_tier(b, routes) or b.name
        tier = self.tier_of(b, routes)
        spec = self.config.tiers.get(tier) if tier else None
        serving = {routes.get(t, t) for t in self.config.tiers}
        return Subject(name=name, kind=b.kind.value, protected=b.protected, owner=b.creator, tier=tier,
                       protected_tier=tier if spec is not None and spec.protected else None,
                       unmasked_of=self._unmasked_of(b, routes),
                       kept=b.kind is Kind.TIER and b.protected and b.parent is not None and b.name not in serving,
                       platform_only=self._platform_only(b))

    def _platform_only(self, b: Branch) -> str | None:
        """What the platform keeps ``b`` for, if it made it under a name it keeps for itself (names.py)."""
        what = platform_only(b.name)
        return what if what is not None and b.creator == self.owner else None

    def _unmasked_of(self, b: Branch, routes: dict[str, str]) -> str | None:
        """The sensitive tier whose data ``b`` holds unmasked (None once masking is on the way down, or
        when no masking is declared: then sensitivity has nothing to protect with)."""
        if b.masked_by or not self.config.masking:
            return None
        for x in self.lineage(b):
            t = self._declared_tier(x, routes)
            if t is not None and self.config.tiers[t].sensitive:
                return t
        return None

    def tier_of(self, b: Branch, routes: dict[str, str] | None = None) -> str | None:
        """The declared tier whose data ``b`` holds: the nearest ancestor (or itself) that is one.

        Names do not count: a snapshot (`production-pre-3`), a rollback branch (`production-rb-2`,
        serving the route or not) and a branch of either all walk up to `production`.
        """
        routes = self.store.routes() if routes is None else routes
        return next((t for x in self.lineage(b) if (t := self._declared_tier(x, routes)) is not None), None)

    def _declared_tier(self, b: Branch, routes: dict[str, str]) -> str | None:
        if b.kind is not Kind.TIER:
            return None
        if b.name in self.config.tiers:
            return b.name
        return next((r for r, t in routes.items() if t == b.name and r in self.config.tiers), None)

    def lineage(self, b: Branch) -> list[Branch]:
        out, cur = [], b
        while True:
            out.append(cur)
            if cur.parent is None:
                return out
            cur = self.store.get(cur.parent)

    # -- deciding and recording ---------------------------------------------------------
    def decide(self, actor: str | None, action: Action, target: Subject, source: Subject | None = None) -> Decision:
        return self.policy.decide(self.principal(actor), action, target, source)

    @contextmanager
    def act(self, actor: str | None, action: Action, target: Subject, source: Subject | None = None,
            before: Any = None, quiet: bool = False, intent: dict[str, Any] | None = None) -> Iterator[Record]:
        """``quiet``: record only a denial (for reads such as reading the audit trail itself).

        ``intent``: the action changes a branch, route or tier; once allowed, a record with outcome
        ``intent`` (carrying ``intent``) is appended *before* the caller acts, so that a process killed
        after the change took effect but before its outcome record still leaves the change audited
        (reconcile then records how it finished, see control/branches.py).
        """
        who = self.principal(actor)
        decision = self.policy.decide(who, action, target, source)
        reason = f"{decision.rule}: {decision.reason}"
        if not decision.allowed:
            self.audit.append(actor=who.name, action=action.value, target=target.name, allowed=False,
                              reason=reason, outcome="refused", before=before)
            raise PolicyDenied(action.value, target.name, decision.reason, decision.rule)
        rec = Record(before=before)
        if intent is not None:
            self.audit.append(actor=who.name, action=action.value, target=target.name, allowed=True, reason=reason,
                              outcome="intent", before=before, after=intent)
        if quiet:
            yield rec
            return
        try:
            yield rec
        except TierbaseError as err:
            self.audit.append(actor=who.name, action=action.value, target=target.name, allowed=True, reason=reason,
                              outcome=f"error: {err.message}", before=before)
            raise
        except Exception as err:  # psycopg, OS: audited too, and raised as ours with what to do
            ours = translate(err)
            self.audit.append(actor=who.name, action=action.value, target=target.name, allowed=True, reason=reason,
                              outcome=f"error: {ours.message}", before=before)
            raise ours from err
        failpoint("gate:acted")  # the act took effect, its outcome record is not written yet
        self.audit.append(actor=who.name, action=action.value, target=target.name, allowed=True, reason=reason,
                          outcome="ok", before=rec.before, after=rec.after)
