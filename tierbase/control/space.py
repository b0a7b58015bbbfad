"""Pool space: keep headroom for tiers, so that a disk-full is a feature branch's problem.

Three parts, cheapest first:

* a reserve (setting ``space_reserve``, default 10 % of the pool): ``branch create`` is refused while
  the pool has less free, and while the feature branches are at their limit;
* a warning threshold (``space_warn``, default the reserve plus 10 % of the pool) that ``status``
  and ``branch list`` show;
* with btrfs simple quotas (storage/quota.py), a hard limit on what feature branches may hold
  together: ``tierbase up`` (root) sets it to what they hold now plus the free space above the
  reserve, so a feature that fills its share gets "Disk quota exceeded" on its own writes while
  tiers, outside the group, keep the reserve. The limit is set at ``up`` only (setting it needs
  root, and the service is unprivileged): tiers that grow between two ``up`` eat into the reserve.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DiskFull, StorageError
from ..storage import VolumeDriver, quota
from ..storage.btrfs import BtrfsDriver
from .store import Store

#: feature branches need at least this much room left under their limit to be worth creating
MIN_FEATURE_ROOM = 64 * 1024 ** 2
#: how long a create short of space waits for the space of just-deleted subvolumes (freed in the background)
PENDING_FREE_WAIT = 3.0


@dataclass(frozen=True)
class Space:
    total: int
    free: int
    reserve: int
    warn_below: int
    #: "quota" when feature branches are held to a limit, else "reserve" (the create check only)
    isolation: str
    features_used: int | None = None
    features_limit: int | None = None

    @property
    def warning(self) -> str | None:
        used, limit = self.features_used or 0, self.features_limit
        at_limit = limit is not None and limit - used < MIN_FEATURE_ROOM
        if at_limit and used >= MIN_FEATURE_ROOM:  # the features filled their share
            return (f"feature branches hold {mib(used)} of the {mib(limit or 0)} they may use: they cannot "
                    "write more; delete feature branches you no longer need")
        if self.free < self.reserve:
            return (f"the pool has {mib(self.free)} free, below the reserve of {mib(self.reserve)} kept for "
                    "tiers: new branches are refused; delete branches you no longer need")
        if at_limit:  # `up` found little free above the reserve
            return (f"feature branches may hold only {mib(limit or 0)} (the pool had little free above the reserve "
                    "at the last `tierbase up`): delete branches, then run `tierbase up` again")
        if self.free < self.warn_below:
            return f"the pool has {mib(self.free)} free of {mib(self.total)} (warning below {mib(self.warn_below)})"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "warning": self.warning}


def mib(n: int) -> str:
    return f"{n / 1024 ** 2:,.0f} MiB"


def _pool(driver: VolumeDriver) -> tuple[int, int]:
    st = os.statvfs(driver.root)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def reserve_of(store: Store, total: int) -> int:
    return int(store.get_setting("space_reserve", 0)) or total // 10


def measure(driver: VolumeDriver, store: Store) -> Space:
    total, free = _pool(driver)
    reserve = reserve_of(store, total)
    warn = int(store.get_setting("space_warn", 0)) or reserve + total // 10
    group = quota.usage(driver.root) if isinstance(driver, BtrfsDriver) else None
    if group is None or group.limit is None:
        return Space(total, free, reserve, warn, "reserve")
    return Space(total, free, reserve, warn, "quota", group.used, group.limit)


def check_room(driver: VolumeDriver, store: Store) -> Space:
    """Refuse a new branch (DiskFull, exit 1) when the pool is below the reserve or the features are at
    their limit; a deletion that just happened is waited for briefly (btrfs frees in the background)."""
    deadline = time.monotonic() + PENDING_FREE_WAIT
    while True:
        space = measure(driver, store)
        short = space.free < space.reserve or (
            space.features_limit is not None and space.features_used is not None
            and space.features_limit - space.features_used < MIN_FEATURE_ROOM)
        if not short:
            return space
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise DiskFull(f"no room for a new branch: {space.warning}",
                   "Delete branches you no longer need (`tierbase branch list` shows their own bytes), or give "
                   "tierbase more room (`tierbase up --btrfs-size` on a new data dir)",
                   free=space.free, reserve=space.reserve, features_used=space.features_used,
                   features_limit=space.features_limit)


def isolate(driver: VolumeDriver, store: Store) -> list[str]:
    """Root, at ``up``: simple quotas on, the features group limited to what features hold now plus the
    free space above the reserve. Without root, btrfs or kernel support: the reserve check alone."""
    if not isinstance(driver, BtrfsDriver) or os.geteuid() != 0:
        return []
    try:
        said = quota.enable(driver.root)
    except StorageError as err:
        return [f"warning: {err.message}; feature branches are held only by the create-time reserve check"]
    total, free = _pool(driver)
    reserve = reserve_of(store, total)
    group = quota.usage(driver.root)
    used = group.used if group is not None else 0
    limit = used + max(0, free - reserve)
    quota.set_limit(driver.root, limit)
    said.append(f"feature branches may hold {mib(limit)} together ({mib(reserve)} of {mib(total)} kept for tiers)")
    return said
