"""Per-branch advisory locks shared by every tierbase process of a data dir.

Compute start/stop take the branch's lock exclusively (so concurrent wake-ups
start a compute once); taking a copy of a branch holds it shared, so many
children can be forked at once but never while the parent starts or stops.

The lifecycle operations (start, stop, suspend, reset, delete, repoint) hold
the lock from their check to their act, and call lower layers that take the
same lock again: so the lock is re-entrant within one thread (a second
``flock`` on a new descriptor of the same file would wait for the first one
forever). Other threads and processes still exclude each other, as ``flock``
locks belong to open file descriptions.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: per thread: lock file -> (depth, shared) of the locks this thread holds
_held = threading.local()


def _mine() -> dict[str, tuple[int, bool]]:
    held: dict[str, tuple[int, bool]] | None = getattr(_held, "locks", None)
    if held is None:
        held = _held.locks = {}
    return held


@contextmanager
def branch_lock(lockdir: Path, name: str, *, shared: bool = False) -> Iterator[None]:
    path = str(lockdir / f"{name}.lock")
    mine = _mine()
    if path in mine:
        depth, was_shared = mine[path]
        if was_shared and not shared:
            # upgrading would let another holder of the shared lock slip in between: a bug of the caller
            raise RuntimeError(f"branch lock {name!r} is held shared by this thread; cannot take it exclusively")
        mine[path] = (depth + 1, was_shared)
        try:
            yield
        finally:
            mine[path] = (mine[path][0] - 1, was_shared)
        return
    if not lockdir.is_dir():
        lockdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owned_like_parent(lockdir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _owned_like_parent(lockdir / f"{name}.lock", fd)
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        mine[path] = (1, shared)
        try:
            yield
        finally:
            del mine[path]
    finally:
        os.close(fd)  # closing releases the lock


def _owned_like_parent(path: Path, fd: int | None = None) -> None:
    """Under root (``tierbase up``/``down``), give what we create to the data dir's owner: the
    unprivileged service must be able to take the same lock later."""
    if os.geteuid() != 0:
        return
    st = path.parent.stat()
    if st.st_uid != 0:
        if fd is None:
            os.chown(path, st.st_uid, st.st_gid)
        else:
            os.fchown(fd, st.st_uid, st.st_gid)


def held(lockdir: Path, name: str) -> bool:
    """True if this thread holds the branch's lock (for assertions of the callers that must)."""
    return str(lockdir / f"{name}.lock") in _mine()
