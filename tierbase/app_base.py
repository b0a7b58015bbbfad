"""The facade's wiring: what every service of the facade shares, and nothing it does.

``Wires`` holds one platform's connections (the data dir, the store, the provider, the branch
operations, the gate), made on first use and shared by every view of it.
``Core`` is one view of those wires acting as one principal (``actor``, ``token``), with the
helpers every service needs (authorize, audit, the serving branch, the one repoint path). The
services in app_*.py each take a ``Core`` and the other services they use; ``Tierbase`` (app.py)
builds them in dependency order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .control import connect
from .control.branches import Branches
from .control.store import Branch, Kind, Store
from .errors import InvalidInput, NotRunning, TierbaseError
from .governance.config import Config
from .governance.gate import Gate, Record
from .governance.policy import Action, Subject
from .governance.principals import Principal, db_password
from .home import Home, default_home
from .names import check_name, format_duration
from .provider import API_PORT, DEFAULT_IMAGE_SIZE, OWNER_ROLE, PROXY_PORT, LocalProvider, Provider, default_ports
from .settings import from_env

if TYPE_CHECKING:
    import psycopg

    from .control.history import History

NOBODY = Subject(name="platform", kind="none")

#: settings for a compute's next start (Branches.start_settings): tiers archive their WAL (app_pitr)
StartSettings = Callable[[Branch], dict[str, str] | None]


class Wires:
    """One platform's shared connections, made on first use (one set per data dir and process)."""

    def __init__(self, home: Home, provider: Provider | None = None) -> None:
        self.home = home
        #: True when the substrate is this host's (LocalProvider), opened from the data dir's settings
        self.local = provider is None
        self._store: Store | None = None
        self._provider: Provider | None = provider
        self._branches: Branches | None = None
        self._gate: Gate | None = None
        #: wired by Tierbase before first use of ``branches`` (app_pitr's TierHistory.compute_settings)
        self.start_settings: StartSettings | None = None
        #: the time-travel history of this store (app_pitr), cached with the store it was made for
        self.history: History | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            if not self.home.exists():
                raise NotRunning(f"no tierbase platform at {self.home.root}",
                                 "Run `tierbase up` first (or set TIERBASE_HOME to the right data dir)")
            self._store = Store(self.home.db, port_base())
        return self._store

    def open_store(self) -> Store:
        """The store of a data dir being made (the first `up`): its file exists from here on."""
        self._store = Store(self.home.db, port_base())
        return self._store

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = LocalProvider.open(self.home.root, self.store.get_setting("driver"),
                                                image_size=self.store.get_setting("btrfs_size", DEFAULT_IMAGE_SIZE))
        return self._provider

    def use_provider(self, provider: Provider) -> None:
        self._provider = provider

    @property
    def branches(self) -> Branches:
        if self._branches is None:
            self._branches = Branches(self.store, self.provider)
            # what the platform does on its own (reconcile, a moved port) is audited like any action
            self._branches.audit = self._platform_audit
            self._branches.start_settings = self.start_settings
        return self._branches

    def _platform_audit(self, *, actor: str, action: str, target: str, reason: str, before: Any = None,
                        after: Any = None) -> None:
        self.gate.audit.append(actor=actor, action=action, target=target, allowed=True, reason=reason,
                               before=before, after=after)

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            self._gate = Gate(self.store, self.home)
        return self._gate

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
            self._branches = None
            self._gate = None


def port_base() -> int:
    """Default first compute port; the one chosen at first `up` is kept in the settings."""
    env = from_env("port_base")
    return int(env) if env is not None else default_ports().base


class Core:
    """The wires as seen by one principal, and the helpers every service uses."""

    def __init__(self, wires: Wires, actor: str | None = None, token: str | None = None, *,
                 router: Any = None) -> None:
        self.wires = wires
        #: the principal this view acts as; None is the data dir's owner (the first platform engineer)
        self.actor = actor
        #: the API token this view acts with, when known (its Postgres password is derived from it)
        self.token = token
        #: set by the service: moves live proxy sessions when a route is repointed (Service.switch);
        #: every service of this view sees it, and views made from this one inherit it
        self.router = router

    def as_principal(self, name: str | None, token: str | None = None) -> Core:
        """The same wires (and router), acting as another principal."""
        return Core(self.wires, name, token, router=self.router)

    # -- the wires -----------------------------------------------------------------------
    @property
    def home(self) -> Home:
        return self.wires.home

    @property
    def store(self) -> Store:
        return self.wires.store

    @property
    def provider(self) -> Provider:
        """The substrate: the one way to storage and computes (the local provider of this data dir)."""
        return self.wires.provider

    @property
    def branches(self) -> Branches:
        return self.wires.branches

    @property
    def gate(self) -> Gate:
        return self.wires.gate

    @property
    def config(self) -> Config:
        return self.gate.config

    @property
    def proxy_port(self) -> int:
        return int(self.store.get_setting("proxy_port", PROXY_PORT))

    @property
    def pool_port(self) -> int:
        """The proxy's pooled port (transaction pooling through each compute's PgBouncer): default proxy - 2."""
        return int(self.store.get_setting("pool_port", self.proxy_port - 2))

    @property
    def api_port(self) -> int:
        return int(self.store.get_setting("api_port", API_PORT))

    # -- who acts, and on what -----------------------------------------------------------------
    def principal(self) -> Principal:
        return self.gate.principal(self.actor)

    def subject(self, name: str) -> Subject:
        check_name(name)
        return self.gate.subject(self.store.get(name))

    def act(self, action: Action, subject: Subject, source: Subject | None = None, *, before: Any = None,
            quiet: bool = False, intent: dict[str, Any] | None = None) -> AbstractContextManager[Record]:
        """``gate.act`` as this principal: decide, let the caller act, audit the outcome."""
        return self.gate.act(self.actor, action, subject, source, before=before, quiet=quiet, intent=intent)

    def require(self, action: Action, subject: Subject, quiet: bool = False) -> None:
        with self.gate.act(self.actor, action, subject, quiet=quiet):
            pass

    def serving(self, name: str) -> Branch:
        """The branch serving a route or tier name now (a tier's route moves on rollback)."""
        target = self.store.resolve_route(name)
        return self.store.get(target or name)

    def tier_subject(self, tier: str) -> Subject:
        spec = self.config.tiers.get(tier)
        if spec is None:
            raise InvalidInput(f"{tier!r} is not a declared tier",
                               f"Declared tiers: {', '.join(self.config.tier_order())}")
        return Subject(name=tier, kind="tier", protected=spec.protected, tier=tier)

    @property
    def database(self) -> str:
        """The project database declared in tierbase.toml (migrations, masking, SQL default to it)."""
        return str(self.config.project.get("database", "postgres"))

    def db_password(self) -> str:
        """This principal's Postgres password: derived from the token it acts with."""
        token = self.token
        if token is None and (self.actor is None or self.actor == self.gate.owner):
            with contextlib.suppress(OSError):
                token = self.home.token.read_text().strip()
        if not token:
            raise InvalidInput(f"no token is known for principal {self.principal().name!r}, so its "
                               "database password cannot be derived",
                               "Use the CLI/SDK with TIERBASE_TOKEN, or Tierbase.as_principal(name, token=...)")
        return db_password(token)

    def describe(self, b: Branch, *, with_bytes: bool = False) -> dict[str, Any]:
        """A branch as the API shows it: its row, its compute, and (``with_bytes``) the bytes it owns."""
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

    # -- the platform's own connections (control/connect.py) ---------------------------------------
    def dsn(self, branch: str, role: str = OWNER_ROLE, dbname: str | None = None) -> str:
        """A libpq conninfo for ``role`` on the branch's project database, over the compute's socket."""
        return connect.dsn(self.branches, branch, dbname or self.database, role)

    def connect(self, branch: str, role: str = OWNER_ROLE,
                dbname: str | None = None) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection as ``role`` (the owner by default, never the superuser unless asked) to the
        branch's project database, starting its compute."""
        return connect.connect(self.branches, branch, dbname or self.database, role)

    # -- the one repoint path --------------------------------------------------------------------
    def switch(self, route: str, change: Callable[[], dict[str, Any]], drain: float = 0.0) -> dict[str, Any]:
        """Run ``change`` inside the service's hold of ``route`` when there is a service (Service.switch:
        new connections wait, the route's sessions end), else directly."""
        if self.router is not None:
            return dict(self.router.switch(route, change, drain))
        return change()

    def move_route(self, route: str, branch: str, *, drain: float = 0.0,
                   prepare: Callable[[], None] | None = None) -> dict[str, Any]:
        """The one repoint path (route set, promotion, rollback): the store's switch under the target
        branch's lock (it must be ready and stay so), inside the service's hold of the route when
        there is a service, which then ends the sessions that came through the route. ``prepare`` runs
        inside the hold just before the switch (a rollback's last replay of writes); if it raises, the
        route does not move."""
        def change() -> dict[str, Any]:
            if prepare is not None:
                prepare()
            with self.branches.lock(branch):
                previous = self.store.set_route(route, branch)
            own = route if self.store.find(route) else None
            return {"route": route, "branch": branch, "previous": previous or own}

        return self.switch(route, change, drain)


def home_at(home: Path | str | None) -> Home:
    """The data dir at ``home`` (default: TIERBASE_HOME or the user's)."""
    return Home(Path(home).absolute() if home else default_home())
