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

import time
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DiskFull
from ..provider import Provider
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


def reserve_of(store: Store, total: int) -> int:
    return int(store.get_setting("space_reserve", 0)) or total // 10


def measure(provider: Provider, store: Store) -> Space:
    pool = provider.space()
    reserve = reserve_of(store, pool.total)
    warn = int(store.get_setting("space_warn", 0)) or reserve + pool.total // 10
    if pool.features_limit is None:
        return Space(pool.total, pool.free, reserve, warn, "reserve")
    return Space(pool.total, pool.free, reserve, warn, "quota", pool.features_used, pool.features_limit)


def check_room(provider: Provider, store: Store) -> Space:
    """Refuse a new branch (DiskFull, exit 1) when the pool is below the reserve or the features are at
    their limit; a deletion that just happened is waited for briefly (btrfs frees in the background)."""
    deadline = time.monotonic() + PENDING_FREE_WAIT
    while True:
        space = measure(provider, store)
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


def isolate(provider: Provider, store: Store) -> list[str]:
    """At ``up``: the provider holds feature branches to the free space above the reserve (root only)."""
    return provider.isolate(reserve_of(store, provider.space().total))
