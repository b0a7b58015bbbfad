"""The provider boundary: everything the control plane asks of the substrate.

The control plane speaks in branch names, volume ids and ports; a provider
turns them into data and running computes. ``LocalProvider`` (local.py) does
it with a volume driver (btrfs, copy) and postgres processes on this host;
``FakeProvider`` (fake.py) with directories and pretend processes, for the
control plane's unit tests; a remote provider (Neon's API, CloudNativePG
volume snapshots) would implement the same methods.

Nothing above this boundary builds a path, reads a password or runs a
process: it holds an ``Endpoint`` at most, and connects with it.

Reset is not one call here: the control plane composes it from ``fork``,
``stop`` and ``discard``, because the swap between them is a metadata
transaction that reconcile must be able to finish or undo.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from .types import SUPERUSER, Endpoint, ForkPoint, Health, PoolSpace


class Pooler(Protocol):
    """Transaction pooling in front of computes (one pooler per compute port)."""

    def ensure(self, port: int) -> str:
        """The socket directory of the pooler in front of the compute on ``port`` (started if need be)."""
        ...

    def reap(self, running: set[int]) -> list[int]:
        """Stop the poolers whose compute no longer runs; their ports."""
        ...

    def stop_all(self) -> list[int]: ...


class Provider(Protocol):
    @property
    def name(self) -> str:
        """The storage kind (``btrfs``, ``copy``, ``fake``): reported with every branch."""
        ...

    @property
    def copy_on_write(self) -> bool:
        """True when a fork is O(1) copy-on-write; False when it copies every byte."""
        ...

    # -- the substrate itself --------------------------------------------------------------
    def prepare(self) -> list[str]:
        """Make the storage usable (mount it when it is not); what was done, for the user to read."""
        ...

    def release(self, purge: bool = False) -> list[str]:
        """Undo prepare (unmount); with purge, drop every volume."""
        ...

    def health(self) -> Health: ...

    def pooler(self) -> Pooler:
        """The transaction poolers of this substrate's computes (one object per provider)."""
        ...

    def space(self) -> PoolSpace:
        """The pool's size and free bytes, and the feature branches' share of it."""
        ...

    def isolate(self, reserve: int) -> list[str]:
        """Hold feature branches to the pool's free space above ``reserve`` (kept for tiers), where the
        substrate can (root, btrfs simple quotas); what was done, or a warning why not."""
        ...

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """The branch's lifecycle lock, across every process of this platform; re-entrant in a thread.
        Shared: it is being copied; exclusive: it is started, stopped, reset or deleted."""
        ...

    # -- volumes ----------------------------------------------------------------------------
    def create_root(self, volume: str) -> None:
        """A new, empty cluster (initdb) with the platform's fixed roles."""
        ...

    def fork(self, parent: str, parent_volume: str, parent_port: int, volume: str, *,
             readonly: bool = False, limited: bool = False, at: ForkPoint | None = None) -> str:
        """A copy of the parent as of now (or ``at`` a point of its history); returns the fork LSN.
        Every commit acknowledged before the call is in the copy. ``limited``: the copy is a
        feature's, whose own writes count against the features' share of the pool (``isolate``).
        A provider that cannot go back in time raises ``NotSupported`` for ``at``."""
        ...

    def delete(self, name: str, volume: str) -> None:
        """Stop the branch's compute and drop its volume (a missing one is no error)."""
        ...

    def discard(self, volume: str) -> None:
        """Drop a volume no compute runs on: a reset's old one, an orphan found by reconcile."""
        ...

    def volumes(self) -> list[str]:
        """Every volume the substrate holds (reconcile removes those no branch references)."""
        ...

    def own_bytes(self, volume: str) -> int:
        """Bytes this volume holds that no other volume shares."""
        ...

    # -- computes ---------------------------------------------------------------------------
    def start(self, name: str, volume: str, port: int, settings: dict[str, str] | None = None) -> int:
        """Start the compute (a no-op if it runs); its pid. ``ComputeError`` if it cannot. ``settings``:
        for this start only (a tier's WAL archiving)."""
        ...

    def start_private(self, name: str, volume: str, port: int, settings: dict[str, str] | None = None) -> Endpoint:
        """Start a compute only the platform can reach (to mask a branch before anyone connects)."""
        ...

    def stop(self, name: str, volume: str) -> bool:
        """Stop the compute of ``volume``; True if one was running."""
        ...

    def running_pid(self, volume: str) -> int | None: ...

    def ready(self, volume: str) -> bool:
        """True when the compute runs and accepts connections (not still starting up)."""
        ...

    def endpoint(self, port: int, dbname: str = "postgres", role: str = SUPERUSER) -> Endpoint:
        """The platform's own way in to a compute, as one of the fixed roles."""
        ...

    def restore(self, port: int, dump: Path, dbname: str) -> str:
        """Load a checked dump the service holds into database ``dbname`` as the owner role (made if
        missing, dropped again if the restore made it and failed); the dump's format."""
        ...

    def direct_login(self, port: int, principal: str, verifier: str) -> str:
        """A platform engineer's own TCP login role on one compute (``pe_<principal>``, member of the
        owner role and the direct group), with its SCRAM ``verifier`` as password; the role's name."""
        ...
