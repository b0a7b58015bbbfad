"""Branch operations: record intent, act on the substrate, commit metadata.

Every operation leaves the store in a state that ``reconcile`` can finish or
undo if the process dies at any instruction (the states and their transitions
are in lifecycle.py):

* create: the row is inserted as ``creating`` (the intent) before the volume
  exists; a dead owner means undo (drop the volume, drop the row).
* delete: the rows are marked ``deleting`` first; a dead owner means roll
  forward (stop, drop the volume, drop the row).
* reset: the branch is marked ``resetting`` and the new volume recorded in
  ``intents`` before it exists; the branch is repointed to it (and ``ready``
  again) in one transaction; a dead owner before that means undo (the old
  volume stays), and whichever volume is not referenced is removed.

Start, stop, suspend, reset and delete take the branch's lock (the provider's ``lock``) from
their check to their act and re-read the row under it: a wake-up arriving in
the middle of a reset waits for it and starts the new volume, never the old.
Reconcile audits every roll-forward and undo in the name of the principal the
dead operation acted for (``audit``, wired by the facade).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ComputeError, Refused
from ..failpoints import failpoint
from ..names import check_name
from .lifecycle import Op, State, check_op
from .store import Branch, Kind, Store, port_free, token_alive

if TYPE_CHECKING:
    from ..provider import Provider


#: prepare(volume, port) -> the masking rules applied (None: unmasked)
Prepare = Callable[[str, int], list[str] | None]
#: audit(actor=, action=, target=, reason=, after=): an effect the platform made on its own
Audit = Callable[..., None]
#: fork(branch being made) -> its fork LSN: fills the new volume otherwise than by copying the parent
#: as of now (a point in time: tierbase/pitr.py); runs outside the parent's lock
Fork = Callable[[Branch], str]

PLATFORM = "tierbase"


def new_volume(name: str) -> str:
    return f"{name}.{secrets.token_hex(4)}"


class Branches:
    def __init__(self, store: Store, provider: Provider) -> None:
        self.store = store
        self.provider = provider
        self.audit: Audit | None = None
        #: settings for a compute's next start (WAL archiving of tiers: set by the facade), or None
        self.start_settings: Callable[[Branch], dict[str, str] | None] | None = None

    def lock(self, name: str, *, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """The branch's lifecycle lock (re-entrant in a thread; excludes other threads and processes)."""
        return self.provider.lock(name, shared=shared)

    def _audit(self, **record: Any) -> None:
        if self.audit is not None:
            self.audit(**record)

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
               prepare: Prepare | None = None, actor: str | None = None, fork: Fork | None = None) -> Branch:
        """``prepare(volume, port)`` runs on the new volume before anyone can reach it (masking); it
        returns the masking rules the branch's data went through, which the branch records."""
        check_name(name)
        check_name(parent, "parent")
        p = self.store.get(parent)
        if p.kind is Kind.SYSTEM:
            raise Refused(f"{parent!r} is one of tierbase's own clusters and cannot be branched",
                          "Branch off a tier instead", name=parent)
        b = self.store.reserve(name=name, parent=parent, kind=kind, volume=new_volume(name), creator=creator,
                               ttl_seconds=ttl_seconds, protected=protected, actor=actor)
        failpoint("create:reserved")
        try:
            if fork is not None:
                p = self.store.get(parent)
                check_op(parent, p.state, Op.BRANCH)
                lsn = fork(b)
            else:
                with self.lock(parent, shared=True):  # the parent's row and volume hold still while it is copied
                    p = self.store.get(parent)
                    check_op(parent, p.state, Op.BRANCH)
                    lsn = self.provider.fork(parent, p.volume, p.port, b.volume, readonly=kind is Kind.SNAPSHOT,
                                             limited=kind is not Kind.TIER)
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

    def delete(self, name: str, *, recursive: bool = False, actor: str | None = None,
               kept: frozenset[str] = frozenset()) -> list[str]:
        """Delete ``name`` (and with ``recursive`` its subtree). ``kept``: branches the caller found to be
        states a rollback or a restore kept (protected against accidents, deleted on purpose): their
        protection does not refuse, and the routes of their own go with them."""
        b = self.store.get(name)
        if b.parent is None:
            raise Refused(f"branch {name!r} is the root of every branch and cannot be deleted",
                          "Use `tierbase down --purge` to remove the whole platform", name=name)
        with contextlib.ExitStack() as locks:
            for d in self._subtree(b):  # children first, as reset does (child, then its parent shared)
                locks.enter_context(self.lock(d.name))
            doomed = self._subtree(self.store.get(name))  # re-read under the locks
            if len(doomed) > 1 and not recursive:
                kids = ", ".join(c.name for c in self.store.children(name))
                raise Refused(f"branch {name!r} has child branches ({kids})",
                              "Delete them first, or pass --recursive to delete the whole subtree", name=name)
            for d in doomed:
                if d.protected and d.name not in kept:
                    raise Refused(f"branch {d.name!r} is protected and cannot be deleted",
                                  "Protection is declared in tierbase.toml; change it there if this is intended",
                                  name=d.name)
            names = [d.name for d in doomed]
            for route, target in self.store.routes().items():
                if target in names and route not in names and target not in kept:
                    raise Refused(f"route {route!r} points at branch {target!r}",
                                  f"Point it elsewhere first: `tierbase route set {route} BRANCH`", name=target)
            # checks every state (ready) and late children; a kept state's own routes go in the same step
            self.store.mark_deleting(names, actor, drop_routes=bool(kept & set(names)))
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

    def reset(self, name: str, prepare: Prepare | None = None, actor: str | None = None) -> Branch:
        """Replace the branch's data with its parent's current state; same name, port and URL."""
        with self.lock(name):
            b = self.store.get(name)
            if b.parent is None:
                raise Refused(f"branch {name!r} has no parent to reset to", "Only child branches can be reset",
                              name=name)
            if b.protected:
                raise Refused(f"branch {name!r} is protected and cannot be reset",
                              "Protection is declared in tierbase.toml", name=name)
            check_op(name, b.state, Op.RESET)
            volume = new_volume(name)
            self.store.begin_reset(name, volume, actor)
            try:
                with self.lock(b.parent, shared=True):
                    p = self.store.get(b.parent)
                    check_op(p.name, p.state, Op.BRANCH)
                    lsn = self.provider.fork(p.name, p.volume, p.port, volume, readonly=b.kind is Kind.SNAPSHOT,
                                             limited=b.kind is not Kind.TIER)
                masking = p.masked_by or None
                if prepare is not None:
                    masking = prepare(volume, b.port)
                failpoint("reset:cloned")
                was_running = self.provider.stop(name, b.volume)
                failpoint("reset:stopped")
            except BaseException:
                self.provider.delete(name, volume)
                self.store.end_reset(name, volume)
                raise
            old = self.store.swap_volume(name, volume, lsn, masking)
            failpoint("reset:swapped")
            self.provider.discard(old)
            if was_running:
                self.start(name)
        return self.store.get(name)

    def start(self, name: str) -> int:
        """Start the branch's compute (a no-op if it runs). A port something else took is replaced by a
        free one, recorded in the store and the audit trail."""
        with self.lock(name):
            b = self.store.get(name)  # re-read under the lock: a reset may just have swapped the volume
            if b.kind is Kind.SNAPSHOT:
                raise Refused(f"branch {name!r} is a read-only snapshot and has no compute",
                              f"Create a branch from it (`tierbase branch create NAME --parent {name}`) to query it",
                              name=name)
            check_op(name, b.state, Op.START)
            if (pid := self.provider.running_pid(b.volume)) is not None:
                return pid
            port = b.port if port_free(b.port) else self._move_port(b, "it was taken before the start")
            settings = self.start_settings(b) if self.start_settings is not None else None
            try:
                return self.provider.start(name, b.volume, port, settings)
            except ComputeError:
                if port_free(port):
                    raise  # not the port's fault
                port = self._move_port(b, "the compute could not bind it")
                return self.provider.start(name, b.volume, port, settings)

    def _move_port(self, b: Branch, why: str) -> int:
        port = self.store.reassign_port(b.name)
        self._audit(actor=PLATFORM, action="compute.port", target=b.name,
                    reason=f"port: {b.port} was in use by another process ({why})",
                    before={"port": b.port}, after={"port": port})
        return port

    def stop(self, name: str) -> bool:
        with self.lock(name):
            b = self.store.get(name)
            check_op(name, b.state, Op.STOP)
            return self.provider.stop(name, b.volume)

    def suspend(self, name: str, idle: Callable[[Branch], bool]) -> bool:
        """Stop the compute if ``idle(branch)`` still says so under the lock (the idle suspender):
        a wake-up that came in meanwhile wins. True if it was stopped."""
        with self.lock(name):
            b = self.store.find(name)
            if b is None or b.state is not State.READY or self.provider.running_pid(b.volume) is None:
                return False
            if not idle(b):
                return False
            return self.provider.stop(name, b.volume)

    def expired(self, now: float | None = None) -> list[Branch]:
        now = time.time() if now is None else now
        return [b for b in self.store.all()
                if b.expires_at is not None and b.expires_at <= now and b.state is State.READY]

    def reconcile(self) -> list[str]:
        """Finish or undo what dead processes left behind; returns what was done (and audits it)."""
        done: list[str] = []
        for b in self.store.all():  # a reset that never swapped: the branch stays on its old volume
            if b.state is State.RESETTING and not token_alive(b.owner):
                self.store.end_reset(b.name, None)  # its new volume is an orphan, removed below
                done.append(f"undid the unfinished reset of {b.name!r}")
                self._reconciled(b, "branch.reset", "undone: the branch keeps its data from before the reset")
        pending = [b for b in self.store.all()
                   if b.state in (State.CREATING, State.DELETING) and not token_alive(b.owner)]
        while pending:  # leaves first: a row cannot go while a child still references it
            leaves = [b for b in pending if not self.store.children(b.name)]
            if not leaves:
                break
            for b in leaves:
                self.provider.delete(b.name, b.volume)
                self.store.remove(b.name)
                if b.state is State.CREATING:
                    done.append(f"undid the unfinished creation of {b.name!r}")
                    self._reconciled(b, "branch.create", "undone: the branch never became ready")
                else:
                    done.append(f"finished deleting {b.name!r}")
                    self._reconciled(b, "branch.delete", "finished: the branch and its volume are gone")
                pending.remove(b)
        live_intents = set()
        for row in self.store.intents():
            if token_alive(row["owner"]):
                live_intents.add(row["volume"])
            else:
                self.store.drop_intent(row["volume"])
        referenced = {b.volume for b in self.store.all()} | live_intents
        for vol in self.provider.volumes():
            if vol not in referenced:
                self.provider.discard(vol)
                done.append(f"removed orphan volume {vol!r}")
        return done

    def _reconciled(self, b: Branch, action: str, result: str) -> None:
        actor = b.actor or b.creator
        self._audit(actor=PLATFORM, action=f"{action}.reconcile", target=b.name,
                    reason=f"reconcile: the {action} of {b.name!r} by {actor!r} was interrupted (its process died); "
                           f"{result}", after={"original_actor": actor, "result": result.split(":")[0],
                                               "volume": b.volume})
