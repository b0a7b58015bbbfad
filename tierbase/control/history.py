"""A tier's history: its WAL archive and base snapshots on the pool, the window they reach, retention.

Layout on the pool (the btrfs mount; dot-names are not branch volumes, so reconcile leaves them):

    volumes/.pitr/<key>/wal/        archived segments + <segment>.crc (compute/archive.py)
    volumes/.pitr/<key>/base/<id>   read-only snapshots of the tier: the base backups (O(1))

An archive ``key`` belongs to one branch *and* one WAL lineage: a branch reset onto a new
volume (or deleted and made again under its name) starts a new key, because its WAL would
reuse segment names of the old one. A restore keeps the key: the restored state continues
the same archive on a new timeline. Keys no branch uses any more are retired and removed.

A base snapshot is valid from the moment it was taken: its ``lsn`` is read after the
snapshot, so every record in it is below that LSN, and a recovery target at or after
(``taken_at``, ``lsn``) sees a consistent cluster.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from ..compute import archive
from ..errors import OutsideHistory, TierbaseError
from ..storage import Source
from .lifecycle import Op, State, check_op
from .store import Branch, Store

if TYPE_CHECKING:
    from ..provider import LocalProvider

PITR_DIR = ".pitr"


@dataclass(frozen=True)
class Base:
    id: int
    key: str
    volume: str
    taken_at: float
    lsn: str
    redo_lsn: str
    timeline: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "taken_at": self.taken_at, "lsn": self.lsn, "redo_lsn": self.redo_lsn,
                "timeline": self.timeline, "reason": self.reason}


class History:
    def __init__(self, store: Store, provider: LocalProvider, bindir: Path) -> None:
        self.store = store
        self.provider = provider
        self.bindir = bindir

    # -- where -------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.provider.driver.root / PITR_DIR

    def wal_dir(self, key: str) -> Path:
        return self.root / key / "wal"

    def _mkdir(self, path: Path) -> None:
        for p in reversed([path, *path.parents]):
            if p == self.provider.driver.root or self.provider.driver.root not in p.parents:
                continue
            if not p.is_dir():
                p.mkdir()
                self.provider.pg.user.chown(p)
                p.chmod(0o700)

    # -- keys ------------------------------------------------------------------------
    def key(self, b: Branch) -> str | None:
        row = self.store.db.execute("SELECT key FROM pitr_archives WHERE branch=? AND volume=? AND retired_at IS NULL",
                                    (b.name, b.volume)).fetchone()
        return str(row[0]) if row else None

    def ensure_key(self, b: Branch) -> str:
        """The branch's current archive key, made (and its older lineages retired) when it has none."""
        if (key := self.key(b)) is not None:
            return key
        key = f"{b.name}.{secrets.token_hex(4)}"
        self._mkdir(self.wal_dir(key))
        with self.store.write() as db:
            db.execute("UPDATE pitr_archives SET retired_at=? WHERE branch=? AND retired_at IS NULL",
                       (time.time(), b.name))
            db.execute("INSERT INTO pitr_archives(key, branch, volume, created_at) VALUES(?,?,?,?)",
                       (key, b.name, b.volume, time.time()))
        return key

    def script(self) -> Path:
        """The fixed archive/restore script, the service user's (root's in-process calls hand it over,
        so that the service can rewrite it when tierbase changes it)."""
        path = archive.install_script(self.bindir)
        for p in (self.bindir, path):
            if p.stat().st_uid != self.provider.pg.user.uid:
                self.provider.pg.user.chown(p)
        return path

    def archive_settings(self, b: Branch) -> dict[str, str]:
        return archive.archive_settings(self.script(), self.wal_dir(self.ensure_key(b)))

    def recovery_settings(self, key: str, target: archive.Target, upto: str | None = None,
                          placed: str | None = None) -> dict[str, str]:
        return archive.recovery_settings(self.script(), self.wal_dir(key), target, upto, placed)

    # -- base snapshots ----------------------------------------------------------------
    def take_base(self, name: str, reason: str) -> Base:
        """A read-only snapshot of the branch (O(1)), after a CHECKPOINT when it runs (so that recovery
        from it replays little)."""
        with self.provider.lock(name, shared=True):  # it neither starts nor stops meanwhile
            b = self.store.get(name)
            check_op(name, b.state, Op.BRANCH)
            key = self.key(b)
            if key is None:  # a base without the WAL after it would reach nothing
                raise OutsideHistory(f"{name!r} keeps no history (its compute does not archive WAL)",
                                     "Tiers with `history` in tierbase.toml do, from their next start")
            ident = f"{int(time.time() * 1000)}-{secrets.token_hex(2)}"
            volume = f"{PITR_DIR}/{key}/base/{ident}"
            self._mkdir(self.provider.driver.path(volume).parent)
            running = self.provider.running_pid(b.volume) is not None
            ep = self.provider.endpoint(b.port) if running else None
            if ep is not None:
                with psycopg.connect(ep.dsn(), autocommit=True, connect_timeout=10) as conn:
                    conn.execute("CHECKPOINT")
            self.provider.driver.clone(Source(b.volume, ep), volume, readonly=True)
            lsn = ""
            if ep is not None:
                with psycopg.connect(ep.dsn(), autocommit=True, connect_timeout=10) as conn:
                    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                    lsn = str(row[0]) if row else ""
            taken_at = time.time()
        try:
            control = self.controldata(self.provider.driver.path(volume))
            with self.store.write() as db:
                cur = db.execute("INSERT INTO pitr_bases(key, volume, taken_at, lsn, redo_lsn, timeline, reason)"
                                 " VALUES(?,?,?,?,?,?,?)",
                                 (key, volume, taken_at, lsn or control["checkpoint"], control["redo"],
                                  int(control["timeline"]), reason))
        except BaseException:
            self.provider.driver.delete(volume)
            raise
        return self.base(int(cur.lastrowid or 0))

    def controldata(self, datadir: Path) -> dict[str, str]:
        out = self.provider.pg.run([self.provider.pg.bins["pg_controldata"], "-D", str(datadir)],
                                   what="pg_controldata", where=datadir, timeout=30)
        fields = {"Latest checkpoint location": "checkpoint", "Latest checkpoint's REDO location": "redo",
                  "Latest checkpoint's TimeLineID": "timeline"}
        got: dict[str, str] = {}
        for line in out.splitlines():
            head, _, value = line.partition(":")
            if head.strip() in fields:
                got[fields[head.strip()]] = value.strip()
        return got

    def base(self, ident: int) -> Base:
        row = self.store.db.execute("SELECT * FROM pitr_bases WHERE id=?", (ident,)).fetchone()
        if row is None:
            raise TierbaseError(f"base snapshot #{ident} is gone", "Run `tierbase history TIER` to see the others")
        return Base(**dict(row))

    def bases(self, key: str) -> list[Base]:
        rows = self.store.db.execute("SELECT * FROM pitr_bases WHERE key=? ORDER BY taken_at", (key,))
        return [Base(**dict(r)) for r in rows]

    def choose(self, key: str, *, at: float | None = None, lsn: str | None = None) -> Base:
        """The newest base snapshot from before the target (OutsideHistory when there is none)."""
        bases = self.bases(key)
        if lsn is not None:
            want = archive.parse_lsn(lsn)
            fit = [b for b in bases if archive.parse_lsn(b.lsn) <= want]
        else:
            fit = [b for b in bases if at is not None and b.taken_at <= at]
        if not fit:
            oldest = f" (it starts at {_iso(bases[0].taken_at)}, LSN {bases[0].lsn})" if bases else \
                " (it has no base snapshot yet)"
            raise OutsideHistory(f"the target is before the history window{oldest}",
                                 "Pick a later time or LSN: `tierbase history TIER` shows the window")
        return fit[-1]

    # -- what is there ----------------------------------------------------------------
    def describe(self, key: str, *, with_bytes: bool = True) -> dict[str, Any]:
        bases = self.bases(key)
        segs = archive.segments(self.wal_dir(key))
        wal = [s for s in segs if archive.segment_range(s.name)]
        info: dict[str, Any] = {
            "key": key,
            "bases": [{**b.to_dict(), "taken": _iso(b.taken_at),
                       **({"own_bytes": self._own(b.volume)} if with_bytes else {})} for b in bases],
            "wal": {"segments": len(wal), "bytes": sum(s.bytes for s in segs),
                    "oldest": wal[0].name if wal else None, "newest": wal[-1].name if wal else None,
                    "timelines": sorted({archive.segment_range(s.name)[0] for s in wal})},  # type: ignore[index]
            "oldest": {"time": _iso(bases[0].taken_at), "at": bases[0].taken_at, "lsn": bases[0].lsn}
            if bases else None,
        }
        return info

    def _own(self, volume: str) -> int | None:
        try:
            return self.provider.driver.own_bytes(volume)
        except TierbaseError:
            return None

    # -- retention ----------------------------------------------------------------------
    def prune(self, key: str, keep_seconds: float, now: float | None = None) -> list[str]:
        """Drop base snapshots and WAL that no point inside the window needs.

        The window starts at ``now - keep_seconds``; reaching its first instant needs the newest base
        taken at or before it, so that one stays, with every segment from its REDO on."""
        now = time.time() if now is None else now
        start = now - keep_seconds
        bases = self.bases(key)
        older = [b for b in bases if b.taken_at <= start]
        doomed = older[:-1]
        said: list[str] = []
        with self.provider.lock(f"pitr-{key}"):  # not while a recovery reads from them
            for b in doomed:
                self.provider.driver.delete(b.volume)
                with self.store.write() as db:
                    db.execute("DELETE FROM pitr_bases WHERE id=?", (b.id,))
                said.append(f"pruned base snapshot #{b.id} of {key} ({_iso(b.taken_at)})")
            kept = [b for b in bases if b not in doomed]
            if not kept:
                return said
            floor = archive.parse_lsn(kept[0].redo_lsn)
            gone = 0
            for s in archive.segments(self.wal_dir(key)):
                rng = archive.segment_range(s.name)
                if rng is not None and rng[2] <= floor:
                    for suffix in archive.CHECKSUM_SUFFIXES:
                        (self.wal_dir(key) / f"{s.name}{suffix}").unlink(missing_ok=True)
                    (self.wal_dir(key) / s.name).unlink(missing_ok=True)
                    gone += 1
            if gone:
                said.append(f"pruned {gone} WAL segment(s) of {key} below {kept[0].redo_lsn}")
        return said

    def reading(self, key: str) -> Any:
        """Held (shared) while a recovery reads a base and the archive: pruning waits for it."""
        return self.provider.lock(f"pitr-{key}", shared=True)

    def retire_unused(self) -> list[str]:
        """Keys whose branch is gone or moved to another lineage: their files go."""
        said: list[str] = []
        for row in list(self.store.db.execute("SELECT key, branch, volume, retired_at FROM pitr_archives")):
            b = self.store.find(row["branch"])
            if row["retired_at"] is None and b is not None and b.volume == row["volume"]:
                continue
            key = str(row["key"])
            with self.provider.lock(f"pitr-{key}"):
                for base in self.bases(key):
                    self.provider.driver.delete(base.volume)
                _remove_tree(self.root / key)
                with self.store.write() as db:
                    db.execute("DELETE FROM pitr_bases WHERE key=?", (key,))
                    db.execute("DELETE FROM pitr_archives WHERE key=?", (key,))
            said.append(f"removed the history {key} (no branch continues it)")
        return said


    def newest_archived(self, key: str) -> float:
        """When the newest complete WAL segment of ``key`` was archived (now, if none was)."""
        segs = [s for s in archive.segments(self.wal_dir(key)) if archive.segment_range(s.name)]
        return max([s.mtime for s in segs], default=time.time())

    def swap(self, serving: Branch, kept: Branch, key: str, end: str) -> None:
        """A restore's switch: the serving branch takes the recovered volume (and ``end`` as its fork LSN),
        the kept branch the replaced one, in one transaction; the archive follows the recovered volume.
        The caller holds both branches' locks with the serving compute stopped."""
        with self.store.write() as db:  # volume is UNIQUE: through a placeholder
            db.execute("UPDATE branches SET volume=? WHERE name=?", (f"{serving.volume}.swap", serving.name))
            db.execute("UPDATE branches SET volume=?, state=?, owner=NULL, fork_lsn=? WHERE name=?",
                       (serving.volume, State.READY.value, serving.fork_lsn, kept.name))
            db.execute("UPDATE branches SET volume=?, fork_lsn=? WHERE name=?", (kept.volume, end, serving.name))
            db.execute("UPDATE pitr_archives SET volume=? WHERE key=?", (kept.volume, key))


def mark_timeline_ready(datadir: Path) -> None:
    """The timeline a recovery started is archived once the tier serves it (its compute recovered with
    archiving off, so that a restore given up never leaves an abandoned timeline in the archive)."""
    wal = datadir / "pg_wal"
    for p in wal.glob("*.history"):
        ready, done = wal / "archive_status" / f"{p.name}.ready", wal / "archive_status" / f"{p.name}.done"
        if not ready.exists() and not done.exists():
            ready.write_text("")
            st = p.stat()
            os.chown(ready, st.st_uid, st.st_gid)


def archiver_status(dsn: str) -> dict[str, Any] | None:
    """pg_stat_archiver of a running compute at ``dsn``: is archiving keeping up (None: not readable)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT archived_count, last_archived_wal, failed_count, last_failed_wal, "
                               "coalesce(last_failed_time > coalesce(last_archived_time, 'epoch'), false) "
                               "FROM pg_stat_archiver").fetchone()
    except psycopg.Error:
        return None
    if row is None:
        return None
    return {"archived": row[0], "last_archived": row[1], "failed": row[2], "last_failed": row[3],
            "failing": bool(row[4])}


def current_lsn(dsn: str) -> str | None:
    """The compute's current WAL position (None: not readable)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        return str(row[0]) if row else None
    except psycopg.Error:
        return None


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
