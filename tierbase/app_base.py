"""The facade's wiring: the data dir, the store, the provider, the branches, the gate.

Split from app.py so that each group of facade methods (governance,
migrations) can live in a module of its own while sharing one set of wires.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from .control.branches import Branches
from .control.store import Store
from .errors import NotRunning
from .governance.config import Config
from .governance.gate import Gate
from .governance.policy import Action, Subject
from .home import Home, default_home
from .names import check_name
from .provider import API_PORT, DEFAULT_IMAGE_SIZE, PROXY_PORT, LocalProvider, Provider, default_ports
from .settings import from_env

NOBODY = Subject(name="platform", kind="none")


class FacadeBase:
    """A tierbase platform rooted at one data dir: the wires, no operations."""

    def __init__(self, home: Path | str | None = None, actor: str | None = None, *,
                 provider: Provider | None = None) -> None:
        """``provider``: the substrate to use instead of this host's (LocalProvider), e.g. a FakeProvider
        for the control plane's unit tests; it must be the same at every open of the data dir."""
        self.home = Home(Path(home).absolute() if home else default_home())
        #: the principal this facade acts as; None is the data dir's owner (the first platform engineer)
        self.actor = actor
        #: the API token this facade acts with, when known (its Postgres password is derived from it)
        self.token: str | None = None
        self._store: Store | None = None
        self._branches: Branches | None = None
        self._provider: Provider | None = provider
        self._local = provider is None
        self._gate: Gate | None = None

    def as_principal(self, name: str | None, token: str | None = None) -> Self:
        """The same platform, acting as another principal (shares every connection)."""
        _ = (self.branches, self.gate)  # wire once, so that every view shares them
        view = copy.copy(self)
        view.actor = name
        view.token = token
        return view

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
        env = from_env("port_base")
        return int(env) if env is not None else default_ports().base

    @property
    def provider(self) -> Provider:
        """The substrate: the one way to storage and computes (the local provider of this data dir)."""
        if self._provider is None:
            self._provider = LocalProvider.open(self.home.root, self.store.get_setting("driver"),
                                                image_size=self.store.get_setting("btrfs_size", DEFAULT_IMAGE_SIZE))
        return self._provider

    @property
    def driver(self) -> Provider:
        """The provider under its older name (``.name``, ``.copy_on_write``), for callers from before it."""
        return self.provider

    @property
    def branches(self) -> Branches:
        if self._branches is None:
            self._branches = Branches(self.store, self.provider)
            # what the platform does on its own (reconcile, a moved port) is audited like any action
            self._branches.audit = self._platform_audit
            # tiers archive their WAL (app_pitr): settings for each compute start
            self._branches.start_settings = getattr(self, "_compute_settings", None)
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

    @property
    def config(self) -> Config:
        return self.gate.config

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
            self._branches = None
            self._gate = None

    def _subject(self, name: str) -> Subject:
        check_name(name)
        return self.gate.subject(self.store.get(name))

    def _require(self, action: Action, subject: Subject, quiet: bool = False) -> None:
        with self.gate.act(self.actor, action, subject, quiet=quiet):
            pass

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

    #: set by the service: moves live proxy sessions when a route is repointed (Service.switch)
    router: Any = None

    def _move_route(self, route: str, branch: str, *, drain: float = 0.0,
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

        if self.router is not None:
            return dict(self.router.switch(route, change, drain))
        return change()
