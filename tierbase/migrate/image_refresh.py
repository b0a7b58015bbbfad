"""The branches an incremental image refresh makes and removes (remask.py does the SQL).

Names (reserved, names.py), all the platform's own, none with a route:

    <tier>-masked-<n>          the image (a feature branch of the branch serving the tier, masked)
    <tier>-masked-<n>-src      the unmasked source the image was made from: a read-only snapshot of the
                               branch serving the tier, protected, kept until the next image replaces it
    <tier>-masked-<n>-src-run  a scratch writable clone of a source with a private compute (unix socket
                               in a 0700 directory, no TCP), only while a refresh diffs; TTL one hour

Crash safety comes from the branch lifecycle: the new image is a ``creating`` row until it is masked
(reconcile undoes it after a kill), and the image record (a setting) moves to it only once it is
``ready``, so a kill leaves the old image current. What a killed refresh left ready (a source snapshot
no record names, scratch clones) is removed by the next refresh of the tier (``clean``), and the
scratch clones' TTL lets the sweeper remove them even if no refresh comes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg

from ..control.branches import Branches, Fork
from ..control.store import Branch, Kind, token_alive
from ..errors import Refused, TierbaseError
from ..failpoints import failpoint
from ..governance.masking_apply import freeze
from ..provider import OWNER_ROLE
from . import remask
from .files import Migration
from .replay import current_xmin

SCRATCH_TTL = 3600


def source_name(image: str) -> str:
    return f"{image}-src"


class ImageRefresh:
    def __init__(self, branches: Branches, owner: str, key: bytes, database: str) -> None:
        self.branches, self.store, self.provider = branches, branches.store, branches.provider
        self.owner, self.key, self.database = owner, key, database

    # -- guards ------------------------------------------------------------------------------------
    def refuse_while_promoting(self, tier: str) -> None:
        """A refresh does not race a promotion of its tier: the promotion's own refresh follows it."""
        row = self.store.db.execute("SELECT id, owner FROM promotions WHERE tier=? AND status='running'",
                                    (tier,)).fetchone()
        if row is not None and token_alive(row["owner"]):
            raise Refused(f"a promotion of {tier!r} is running (promotion #{row['id']}): the masked image is not "
                          "refreshed meanwhile", "The promotion refreshes the image when it ends; or try again then",
                          tier=tier, promotion=row["id"])

    def clean(self, tier: str, keep: str | None) -> list[str]:
        """Remove what a killed refresh of ``tier`` left ready: scratch clones, and source snapshots that
        no image record names (``keep`` is the current one's)."""
        pattern = re.compile(rf"^{re.escape(tier)}-masked-\d+-src(-run)?$")
        doomed = sorted((b.name for b in self.store.all() if pattern.fullmatch(b.name) and b.name != keep
                         and b.state.value == "ready"),
                        key=lambda n: not n.endswith("-run"))  # clones before their snapshots
        gone = []
        for name in doomed:
            with suppress(TierbaseError):  # a source someone branched from stays until that branch goes
                self.drop(name)
                gone.append(name)
        return gone

    # -- the unmasked source ------------------------------------------------------------------------
    def snapshot(self, image: str, serving: Branch) -> tuple[Branch, str]:
        """The read-only snapshot the next image is made from (and later diffed against), and the oldest
        transaction running just before it: rows written after it have a newer xmin (remask.plan)."""
        self.branches.start(serving.name)
        ep = self.provider.endpoint(self.store.get(serving.name).port, self.database)
        with psycopg.connect(ep.dsn(), autocommit=True, connect_timeout=10) as conn:
            xmin = current_xmin(conn)
        return self.branches.create(source_name(image), serving.name, kind=Kind.SNAPSHOT, creator=self.owner,
                                    protected=True, actor="tierbase"), xmin

    def clone_of(self, b: Branch) -> Fork:
        """A fork callback: the new image's volume is a copy of ``b``'s (a source, or the last image)."""
        def fork(new: Branch) -> str:
            cur = self.store.get(b.name)
            return self.provider.fork(cur.name, cur.volume, cur.port, new.volume, limited=True)
        return fork

    def drop(self, name: str) -> None:
        """Remove a platform branch of the refresh (its scratch clone, compute, protection, row and volume).
        A branch someone made of a source keeps it (the delete is refused, protected again)."""
        b = self.store.find(name)
        if b is None:
            return
        if not name.endswith("-run"):
            self.drop(f"{name}-run")
        with suppress(TierbaseError):
            self.provider.stop(name, b.volume)
        if b.protected:
            self.store.set_protected(name, False)
        try:
            self.branches.delete(name, actor="tierbase")
        except BaseException:
            if b.protected and self.store.find(name) is not None:
                self.store.set_protected(name, True)
            raise

    @contextmanager
    def _scratch(self, source: Branch) -> Iterator[psycopg.Connection[Any]]:
        """A superuser session on a writable clone of ``source``, on a compute only the platform reaches."""
        name = f"{source.name}-run"
        self.drop(name)
        b = self.branches.create(name, source.name, kind=Kind.FEATURE, creator=self.owner, ttl_seconds=SCRATCH_TTL,
                                 actor="tierbase")
        try:
            ep = self.provider.start_private(name, b.volume, b.port)
            with psycopg.connect(ep.dsn(self.database), autocommit=True, connect_timeout=10) as conn:
                yield conn
        finally:
            self.drop(name)

    # -- the refresh -------------------------------------------------------------------------------
    def incremental(self, name: str, serving: Branch, image: Branch, old_source: Branch, new_source: Branch,
                    files: list[Migration], sensitive: set[tuple[str, str]], since: str | None) -> dict[str, Any]:
        """Make image ``name`` as a clone of ``image`` brought from ``old_source`` to ``new_source``;
        raises remask.FullRemask (nothing made) when that would not equal a full re-mask."""
        rules = remask.rules_of(image.masked_by)
        with self._scratch(old_source) as oc, self._scratch(new_source) as nc:
            p = remask.plan(oc, nc, rules, files, sensitive, since)
        report: dict[str, Any] = {"diff_seconds": p.diff.stats.get("seconds"), "tables_compared": len(p.diff.tables)}

        def prepare(volume: str, port: int) -> list[str]:
            ep = self.provider.start_private(name, volume, port)
            try:
                with psycopg.connect(ep.dsn(self.database), autocommit=True, connect_timeout=10) as conn:
                    report["migrations"] = remask.apply_migrations(conn, p.migrations, OWNER_ROLE)
                    report.update(remask.apply(conn, p, rules, self.key, OWNER_ROLE))
                    # the rows just written, settled like a full image's (masking_apply.freeze): a frozen
                    # table's vacuum visits only the pages not frozen, so this costs what changed
                    report["freeze_s"] = freeze(conn, remask.relations(conn, p))
                failpoint("remask:applied")  # tests: a kill here must leave the old image current
            finally:
                self.provider.stop(name, volume)
            return sorted(image.masked_by)

        self.branches.create(name, serving.name, kind=Kind.FEATURE, creator=self.owner, actor="tierbase",
                             fork=self.clone_of(image), prepare=prepare)
        return report
