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
    lockdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lockdir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
