"""A provider without postgres, root or btrfs: for the control plane's unit tests.

Volumes are directories (storage/fake.py's driver) under a temporary root, so
that a process that dies leaves them behind as a real one would and reconcile
has something to find; computes are pretend processes kept in memory (a pid
per running volume), so a crashed process's computes are gone with it. The
locks are the real ones. ``fail(op, err)`` makes the next call of ``op``
raise, to test the control plane's undo paths.

This is a provider, not a mock of storage: the real drivers and postgres are
tested for real elsewhere; what runs on this one is the code above the boundary.
"""

from __future__ import annotations

import itertools
import os
from contextlib import AbstractContextManager
from pathlib import Path

from ..errors import ComputeError, NotSupported, StorageError
from ..storage.base import Source
from ..storage.fake import FakeDriver
from .locks import branch_lock
from .protocol import Pooler, Provider
from .types import SUPERUSER, ComputeUser, Endpoint, ForkPoint, Health, PoolSpace

_pids = itertools.count(4_000_000)  # above any real pid_max default: never mistaken for a live process


class FakeProvider:
    name = "fake"
    copy_on_write = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.driver = FakeDriver(root / "volumes", ComputeUser.current())
        self.locks = root / "locks"
        #: volume -> pid of its pretend compute
        self.computes: dict[str, int] = {}
        #: every call, in order: (operation, first argument), for tests that check what was asked
        self.calls: list[tuple[str, str]] = []
        self._failures: dict[str, BaseException] = {}
        self._lsn = itertools.count(0x1000000, 0x1000)

    def fail(self, op: str, err: BaseException | None = None) -> None:
        """Make the next call of ``op`` (fork, start, stop, delete, ...) raise ``err``."""
        self._failures[op] = err or StorageError(f"the fake provider was told to fail {op}", "This is a test")

    def _call(self, op: str, arg: str) -> None:
        self.calls.append((op, arg))
        err = self._failures.pop(op, None)
        if err is not None:
            raise err

    # -- the substrate -----------------------------------------------------------------
    def prepare(self) -> list[str]:
        self.driver.prepare()
        return []

    def release(self, purge: bool = False) -> list[str]:
        self.computes.clear()
        return self.driver.release(purge)

    def health(self) -> Health:
        return Health(driver=self.name, copy_on_write=self.copy_on_write, compute_user=ComputeUser.current().name)

    def pooler(self) -> Pooler:
        return _NoPooler()

    def space(self) -> PoolSpace:
        st = os.statvfs(self.root)
        return PoolSpace(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)

    def isolate(self, reserve: int) -> list[str]:
        return []

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        return branch_lock(self.locks, name, shared=shared)

    # -- volumes --------------------------------------------------------------------------
    def create_root(self, volume: str) -> None:
        self._call("create_root", volume)
        path = self.driver.create(volume)
        (path / "PG_VERSION").write_text("fake\n")
        self._write_lsn(volume)

    def fork(self, parent: str, parent_volume: str, parent_port: int, volume: str, *,
             readonly: bool = False, limited: bool = False, at: ForkPoint | None = None) -> str:
        if at is not None:
            raise NotSupported(f"the fake provider cannot branch {parent!r} at {at}", "Branch it as of now")
        with self.lock(parent, shared=True):
            self._call("fork", volume)
            if not self.driver.exists(parent_volume):
                raise StorageError(f"volume {parent_volume!r} does not exist", "This is a bug of the caller")
            self.driver.clone(Source(parent_volume), volume, readonly=readonly, limited=limited)
        return self._write_lsn(volume)

    def _write_lsn(self, volume: str) -> str:
        n = next(self._lsn)
        lsn = f"{n >> 32:X}/{n & 0xFFFFFFFF:X}"
        (self.driver.path(volume) / "lsn").write_text(lsn)
        return lsn

    def delete(self, name: str, volume: str) -> None:
        self.stop(name, volume)
        self._call("delete", volume)
        self.driver.delete(volume)

    def discard(self, volume: str) -> None:
        self._call("discard", volume)
        self.driver.delete(volume)

    def volumes(self) -> list[str]:
        return self.driver.volumes()

    def own_bytes(self, volume: str) -> int:
        return self.driver.own_bytes(volume)

    # -- computes ---------------------------------------------------------------------------
    def start(self, name: str, volume: str, port: int, settings: dict[str, str] | None = None) -> int:
        with self.lock(name):
            self._call("start", name)
            if not self.driver.exists(volume):
                raise ComputeError(f"the compute of {name!r} cannot start: volume {volume!r} is gone",
                                   "This is a bug of the caller")
            return self.computes.setdefault(volume, next(_pids))

    def start_private(self, name: str, volume: str, port: int, settings: dict[str, str] | None = None) -> Endpoint:
        self.start(name, volume, port)
        return Endpoint(str(self.root / "run" / name), port, SUPERUSER)

    def stop(self, name: str, volume: str) -> bool:
        with self.lock(name):
            self._call("stop", name)
            return self.computes.pop(volume, None) is not None

    def running_pid(self, volume: str) -> int | None:
        return self.computes.get(volume)

    def ready(self, volume: str) -> bool:
        return volume in self.computes

    def endpoint(self, port: int, dbname: str = "postgres", role: str = SUPERUSER) -> Endpoint:
        return Endpoint(str(self.root / "sockets"), port, role, "", dbname)  # nothing listens there

    def restore(self, port: int, dump: Path, dbname: str) -> str:
        raise NotSupported("the fake provider runs no postgres to restore a dump into",
                           "Test imports on the local provider")

    def direct_login(self, port: int, principal: str, verifier: str) -> str:
        return f"pe_{principal}"  # no cluster to hold the role: its name is all a caller sees



class _NoPooler:
    """The fake runs no processes, so no poolers: asking for one is refused like a missing PgBouncer."""

    def ensure(self, port: int) -> str:
        raise ComputeError("the fake provider runs no poolers", "Use the branch's direct URL (without --pooled)")

    def reap(self, running: set[int]) -> list[int]:
        return []

    def stop_all(self) -> list[int]:
        return []


def _conforms(p: FakeProvider) -> Provider:
    return p  # mypy checks here that the fake is a Provider
