"""Branch operations: record intent, act on the substrate, commit metadata.

Every operation leaves the store in a state that ``reconcile`` can finish or
undo if the process dies at any instruction:

* create: the row is inserted as ``creating`` (the intent) before the volume
  exists; a dead owner means undo (drop the volume, drop the row).
* delete: the rows are marked ``deleting`` first; a dead owner means roll
  forward (stop, drop the volume, drop the row).
* reset: the new volume is recorded in ``intents`` before it exists and the
  branch is repointed to it in one transaction; whichever volume is then not
  referenced is an orphan and is removed.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..compute.ports import port_held
from ..errors import ComputeError, PortInUse, Refused, TierbaseError
from ..failpoints import failpoint
from ..names import check_name
from .store import Branch, Kind, State, Store, token_alive

if TYPE_CHECKING:
    from ..provider import LocalProvider


#: prepare(volume, port) -> the masking rules applied (None: unmasked)
Prepare = Callable[[str, int], list[str] | None]


def new_volume(name: str) -> str:
    return f"{name}.{secrets.token_hex(4)}"


class Branches:
    def __init__(self, store: Store, provider: LocalProvider) -> None:
        self.store = store
        self.provider = provider

    def create_root(self, name: str, creator: str, kind: Kind = Kind.TIER) -> Branch:
        check_name(name)
        b = self.store.reserve(name=name, parent=None, kind=kind, volume=new_volume(name), creator=creator,
                               ttl_seconds=None, protected=True)
        try:
            self.provider.create_root(b.volume)
        except BaseException:
            self.store.remove(name)
            raise
        self.store.commit_created(name, None)
        return self.store.get(name)

    def create(self, name: str, parent: str, *, kind: Kind, creator: str, ttl_seconds: int | None = None,
               protected: bool = False, start: bool = False,
               prepare: Prepare | None = None) -> Branch:
        """``prepare(volume, port)`` runs on the new volume before anyone can reach it (masking); it
        returns the masking rules the branch's data went through, which the branch records."""
        check_name(name)
        check_name(parent, "parent")
        p = self.store.get(parent)
        if p.kind is Kind.SYSTEM:
            raise Refused(f"{parent!r} is one of tierbase's own clusters and cannot be branched",
                          "Branch off a tier instead", name=parent)
        b = self.store.reserve(name=name, parent=parent, kind=kind, volume=new_volume(name), creator=creator,
                               ttl_seconds=ttl_seconds, protected=protected)
        failpoint("create:reserved")
        try:
            lsn = self.provider.fork(parent, p.volume, p.port, b.volume, readonly=kind is Kind.SNAPSHOT)
            masking = p.masked_by or None
            if prepare is not None:
                masking = prepare(b.volume, b.port)
        except BaseException:
            self.provider.delete(name, b.volume)
            self.store.remove(name)
            raise
        failpoint("create:cloned")
        self.store.commit_created(name, lsn, masking)
        if start and kind is not Kind.SNAPSHOT:
            self.start(name)
        return self.store.get(name)

    def delete(self, name: str, *, recursive: bool = False) -> list[str]:
        b = self.store.get(name)
        if b.parent is None:
            raise Refused(f"branch {name!r} is the root of every branch and cannot be deleted",
                          "Use `tierbase down --purge` to remove the whole platform", name=name)
        doomed = self._subtree(b)
        if len(doomed) > 1 and not recursive:
            kids = ", ".join(c.name for c in self.store.children(name))
            raise Refused(f"branch {name!r} has child branches ({kids})",
                          "Delete them first, or pass --recursive to delete the whole subtree", name=name)
        for d in doomed:
            if d.protected:
                raise Refused(f"branch {d.name!r} is protected and cannot be deleted",
                              "Protection is declared in tierbase.toml; change it there if this is intended",
                              name=d.name)
        names = [d.name for d in doomed]
        for route, target in self.store.routes().items():
            if target in names and route not in names:
                raise Refused(f"route {route!r} points at branch {target!r}",
                              f"Point it elsewhere first: `tierbase route set {route} BRANCH`", name=target)
        self.store.mark_deleting(names)
        failpoint("delete:marked")
        for d in doomed:  # children first: _subtree is post-order
            self.provider.delete(d.name, d.volume)
            failpoint("delete:volume-gone")
            self.store.remove(d.name)
        return names

    def subtree(self, name: str) -> list[Branch]:
        """The branch and its descendants, leaves first."""
        return self._subtree(self.store.get(name))

    def _subtree(self, b: Branch) -> list[Branch]:
        out: list[Branch] = []
        for child in self.store.children(b.name):
            out.extend(self._subtree(child))
        out.append(b)
        return out

    def reset(self, name: str, prepare: Prepare | None = None) -> Branch:
        """Replace the branch's data with its parent's current state; same name, port and URL."""
        b = self.store.get(name)
        if b.parent is None:
            raise Refused(f"branch {name!r} has no parent to reset to", "Only child branches can be reset", name=name)
        if b.protected:
            raise Refused(f"branch {name!r} is protected and cannot be reset",
                          "Protection is declared in tierbase.toml", name=name)
        if b.state is not State.READY:
            raise TierbaseError(f"branch {name!r} is {b.state.value}", "Wait for its operation to finish")
        p = self.store.get(b.parent)
        volume = new_volume(name)
        self.store.add_intent("reset", name, volume)
        try:
            lsn = self.provider.fork(p.name, p.volume, p.port, volume, readonly=b.kind is Kind.SNAPSHOT)
            masking = p.masked_by or None
            if prepare is not None:
                masking = prepare(volume, b.port)
        except BaseException:
            self.provider.delete(name, volume)
            self.store.drop_intent(volume)
            raise
        failpoint("reset:cloned")
        was_running = self.provider.stop(name, b.volume)
        old = self.store.swap_volume(name, volume, lsn, masking)
        failpoint("reset:swapped")
        self.provider.driver.delete(old)
        if was_running:
            self.start(name)
        return self.store.get(name)

    def start(self, name: str) -> int:
        b = self.store.get(name)
        if b.kind is Kind.SNAPSHOT:
            raise Refused(f"branch {name!r} is a read-only snapshot and has no compute",
                          f"Create a branch from it (`tierbase branch create NAME --parent {name}`) to query it",
                          name=name)
        if b.state is not State.READY:
            raise TierbaseError(f"branch {name!r} is {b.state.value}", "Wait for its operation to finish")
        try:
            return self.provider.start(name, b.volume, b.port)
        except ComputeError as err:
            if port_held(b.port):
                raise PortInUse(f"the compute of {name!r} cannot listen on its port {b.port}: another process "
                                "holds it", f"Find it with `ss -tanp 'sport = :{b.port}'` and stop it; tierbase does "
                                "not move a branch to another port behind your back", name=name, port=b.port) from err
            raise

    def stop(self, name: str) -> bool:
        b = self.store.get(name)
        return self.provider.stop(name, b.volume)

    def expired(self, now: float | None = None) -> list[Branch]:
        now = time.time() if now is None else now
        return [b for b in self.store.all()
                if b.expires_at is not None and b.expires_at <= now and b.state is State.READY]

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete expired branches. One with children waits until they are gone."""
        gone: list[str] = []
        for b in self.expired(now):
            if self.store.children(b.name) or b.protected:
                continue
            gone.extend(self.delete(b.name))
        return gone

    def reconcile(self) -> list[str]:
        """Finish or undo what dead processes left behind; returns what was done."""
        done: list[str] = []
        pending = [b for b in self.store.all() if b.state is not State.READY and not token_alive(b.owner)]
        while pending:  # leaves first: a row cannot go while a child still references it
            leaves = [b for b in pending if not self.store.children(b.name)]
            if not leaves:
                break
            for b in leaves:
                self.provider.delete(b.name, b.volume)
                self.store.remove(b.name)
                verb = "undid the unfinished creation of" if b.state is State.CREATING else "finished deleting"
                done.append(f"{verb} {b.name!r}")
                pending.remove(b)
        live_intents = set()
        for row in self.store.intents():
            if token_alive(row["owner"]):
                live_intents.add(row["volume"])
            else:
                self.store.drop_intent(row["volume"])
        referenced = {b.volume for b in self.store.all()} | live_intents
        for vol in self.provider.driver.volumes():
            if vol not in referenced:
                self.provider.driver.delete(vol)
                done.append(f"removed orphan volume {vol!r}")
        return done
