"""Per-branch advisory locks shared by every tierbase process of a data dir.

Compute start/stop take the branch's lock exclusively (so concurrent wake-ups
start a compute once); taking a copy of a branch holds it shared, so many
children can be forked at once but never while the parent starts or stops.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def branch_lock(lockdir: Path, name: str, *, shared: bool = False) -> Iterator[None]:
    if not lockdir.is_dir():
        lockdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owned_like_parent(lockdir)
    fd = os.open(lockdir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _owned_like_parent(lockdir / f"{name}.lock", fd)
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
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
