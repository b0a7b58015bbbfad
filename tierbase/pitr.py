"""Point-in-time copies: a base snapshot of the tier + its archived WAL, replayed up to a target.

A branch at T: clone the newest base snapshot taken before T (O(1)), reflink the
archived segments wholly before T into its pg_wal (checked against their sums while
postgres replays them), write ``recovery.signal``, start postgres once with
``restore_command`` (the platform's checksum-verifying script, for the rest) and
``recovery_target_time``/``_lsn`` on its command line, and promote it once the replay
pauses at the target (nobody but the platform reaches a half-replayed copy). The copy
then starts a timeline of its own and is an ordinary cluster.

``recovery_target_inclusive`` is on by default: a transaction that committed at
exactly T (to the microsecond) or at exactly the target LSN is on the copy.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from .compute import archive
from .compute.archive import Target
from .control.history import History
from .control.store import Branch
from .errors import ArchiveCorrupt, ComputeError, InvalidInput, OutsideHistory, TierbaseError
from .names import parse_ttl
from .storage import Source

if TYPE_CHECKING:
    from .provider import LocalProvider
    from .provider.types import ComputeUser

#: seconds a recovery may take to reach its target (each of its start and its replay after that)
REPLAY_TIMEOUT = 600.0
_LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


def parse_target(at: str | None, lsn: str | None, *, inclusive: bool = True,
                 now: float | None = None) -> tuple[Target, float | None]:
    """A recovery target from `--at` (ISO 8601 with a zone, or `-5m`/`-1h30m` before now) or `--lsn`;
    also the target as epoch seconds for a time. Malformed, both or neither: InvalidInput."""
    if (at is None) == (lsn is None):
        raise InvalidInput("give exactly one of --at and --lsn", "For example `--at -5m` or `--lsn 0/1A2B3C4`")
    now = time.time() if now is None else now
    if lsn is not None:
        if not _LSN_RE.fullmatch(lsn.strip()):
            raise InvalidInput(f"LSN {lsn!r} does not parse", "Write it as PostgreSQL does, e.g. 0/1A2B3C4")
        return Target(lsn=archive.format_lsn(archive.parse_lsn(lsn)), inclusive=inclusive), None
    text = str(at).strip()
    if text.startswith("-"):
        ts = now - parse_ttl(text[1:])
    else:
        try:
            when = datetime.fromisoformat(text)
        except ValueError as err:
            raise InvalidInput(f"time {text!r} does not parse",
                               "Give an ISO 8601 time with a zone (2026-12-01T14:01:30Z) or -5m") from err
        if when.tzinfo is None:
            raise InvalidInput(f"time {text!r} has no time zone",
                               "Add one (Z for UTC, or +02:00): a time without a zone is ambiguous")
        ts = when.timestamp()
    if ts > now:
        raise OutsideHistory(f"the time {_iso(ts)} is in the future", "Pick a time up to now")
    return Target(time=_iso(ts, micro=True), inclusive=inclusive), ts


class PointInTime:
    def __init__(self, history: History, provider: LocalProvider) -> None:
        self.history = history
        self.provider = provider
        #: the segment the parent's archiver was asked for by reach(): recover() lets the restore
        #: command wait for segments up to it (one PointInTime per operation, so per target)
        self.upto: str | None = None
        #: milliseconds of recover()'s steps (the benchmark's and the profile's breakdown)
        self.phases: dict[str, float] = {}

    def reach(self, parent: Branch, key: str, target: Target, ts: float | None) -> None:
        """Have the archive get the WAL up to the target: the parent (running: it is a tier the caller
        woke) switches to a new segment, which its archiver copies while recover() replays up to it.
        An LSN past the parent's end of WAL is refused."""
        ep = self.provider.endpoint(parent.port)
        with psycopg.connect(ep.dsn(), autocommit=True, connect_timeout=10) as conn:
            # the marker below need not wait for its own WAL flush: pg_switch_wal() flushes the WAL up to
            # the switch, the marker's commit included (one fsync of the tier's WAL, not two)
            row = conn.execute("SELECT pg_current_wal_lsn()::text, set_config('synchronous_commit', 'off', false)"
                               ).fetchone()
            end = str(row[0]) if row else "0/0"
            if target.lsn is not None and archive.parse_lsn(target.lsn) > archive.parse_lsn(end):
                raise OutsideHistory(f"LSN {target.lsn} is past the end of {parent.name!r}'s WAL ({end})",
                                     "Pick an LSN up to the current one (`tierbase history TIER`)")
            if target.time is not None:
                # recovery to a time stops at the first commit after it, and fails when the WAL ends
                # before one: a commit of the platform's own (now, after the target) marks the end
                conn.execute("SELECT txid_current()")
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
            # not waited for here: the archiver copies it while the replay runs from the base snapshot,
            # and the restore command waits for it only if the replay gets there first (upto)
            self.upto = str(row[0]) if row else None

    def recover(self, b: Branch, key: str, target: Target, ts: float | None, *,
                private: bool = False, settings: dict[str, str] | None = None) -> str:
        """Fill ``b``'s (new, not yet existing) volume with the history ``key`` as of the target, and
        leave its compute running, promoted (``private``: on a 0700 socket only). Returns where its
        history ends (the last replayed LSN)."""
        driver, pg = self.provider.driver, self.provider.pg
        t0 = time.perf_counter()
        wal_dir = self.history.wal_dir(key)
        with self.history.reading(key):
            base = self.history.choose(key, at=ts, lsn=target.lsn)
            driver.clone(Source(base.volume), b.volume)
            datadir = driver.path(b.volume)
            # the archived segments the replay reads first go into pg_wal now (reflinks): postgres reads
            # them there, sparing each a restore command and the fsyncs of taking its file over; their
            # sums are checked while it replays, and the promotion waits for that check
            self.phases["dropped_segments"] = archive.drop_preallocated(datadir / "pg_wal", base.timeline, base.lsn)
            placed = archive.place(wal_dir, archive.to_place(wal_dir, base.redo_lsn, base.timeline, lsn=target.lsn,
                                                             at=ts), datadir / "pg_wal", _owner(pg.user))
            check = _Check(wal_dir, placed, datadir / "pg_wal")
        pg.clear_runtime_files(datadir)
        pg.forget_slots(datadir)  # a base taken while a promotion's slot lived carries it
        archive.write_signal(datadir)
        pg.user.chown(datadir / "recovery.signal")
        conf = {**self.history.recovery_settings(key, target, self.upto, placed[-1] if placed else None),
                **(settings or {})}
        sockdir = self.provider.home / "run" / b.name if private else self.provider.sockets
        if private:
            sockdir.mkdir(parents=True, exist_ok=True)
            pg.user.chown(sockdir)
            sockdir.chmod(0o700)
        logfile = self.provider.logs / f"{b.name}.log"
        dsn = psycopg.conninfo.make_conninfo("", host=str(sockdir), port=b.port, user="tierbase", dbname="postgres")
        self.phases["placed_segments"] = len(placed)
        self._phase("prepare_ms", t0)
        check.start()
        try:
            with self.provider.lock(b.name):
                t1 = time.perf_counter()
                # "standby" (consistent) comes only once the placed segments are replayed: the start
                # waits as long as the replay may take (a target an hour back replays gigabytes)
                pg.start(datadir, b.port, logfile, name=b.name, sockets=self.provider.sockets, timeout=REPLAY_TIMEOUT,
                         private=sockdir if private else None, settings=conf, ready=("standby", "ready"))
                self._phase("start_ms", t1)
                t2 = time.perf_counter()
                end = self._promote_at_target(dsn, datadir, check)
                self._phase("replay_promote_ms", t2)
                return end
        except (ComputeError, psycopg.OperationalError) as err:
            # a placed segment that failed its check explains a replay that failed (postgres read it)
            if (bad := check.result()) is not None:
                raise bad from err
            raise _recovery_error(err, logfile) from err
        finally:
            check.result()

    def _phase(self, name: str, since: float) -> None:
        self.phases[name] = round((time.perf_counter() - since) * 1000, 1)

    def _promote_at_target(self, dsn: str, datadir: Path, check: _Check, timeout: float = REPLAY_TIMEOUT) -> str:
        """Promote as soon as the replay stops at its target; returns the last replayed LSN.

        The promotion is asked for at once: in an archive recovery that is not a standby, the
        startup process looks at the request only once it has stopped at the target (where it
        would pause), so the request neither cuts the replay short nor waits for the pause loop's
        one-second tick, and the promotion is the fast kind."""
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            if (bad := check.result()) is not None:  # before the promotion: the copy is thrown away
                raise bad
            conn.execute("SELECT pg_promote(false)")
            deadline = time.monotonic() + timeout
            while True:
                row = conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text").fetchone()
                assert row is not None
                if not row[0]:
                    return str(row[1])
                if time.monotonic() > deadline:
                    raise ComputeError(f"recovery did not reach its target within {timeout:.0f}s",
                                       "Pick a target closer to a base snapshot, or check the machine's load")
                time.sleep(0.005)


class _Check(threading.Thread):
    """Checks the segments placed into pg_wal against the sums recorded when they were archived, while
    postgres replays them. Their files are opened before postgres starts: a restartpoint may recycle a
    replayed segment under another name, but nothing writes into one before the promotion, which
    waits for this check."""

    def __init__(self, wal_dir: Path, names: list[str], pg_wal: Path) -> None:
        super().__init__(name="tierbase-wal-check", daemon=True)
        self.wal_dir = wal_dir
        self.files = [(name, open(pg_wal / name, "rb")) for name in names]  # noqa: SIM115 (closed by run)
        self.bad: ArchiveCorrupt | None = None

    def run(self) -> None:
        try:
            for name, fh in self.files:
                try:
                    archive.verify(self.wal_dir, name, fh)
                except ArchiveCorrupt:
                    self.bad = _corrupt(name)
                    return
        finally:
            for _, fh in self.files:
                fh.close()

    def result(self) -> ArchiveCorrupt | None:
        """The first segment that failed its check (None: all passed), once the check is done."""
        if self.ident is not None:
            self.join()
        else:  # never started (postgres was not started either)
            for _, fh in self.files:
                fh.close()
        return self.bad


def _owner(user: ComputeUser) -> tuple[int, int] | None:
    return None if user.is_self else (user.uid, user.gid)


def _corrupt(seg: str) -> ArchiveCorrupt:
    return ArchiveCorrupt(f"checksum mismatch on WAL segment {seg} in the archive: recovery refused",
                          "Nothing was made; pick a point before that segment, or restore the archive", segment=seg)


def _recovery_error(err: ComputeError | psycopg.Error, logfile: Path) -> TierbaseError:
    """What went wrong, from the compute's log: a segment the script refused, a target not reached."""
    try:
        text = logfile.read_text(errors="replace")[-20000:]
    except OSError:
        text = str(err)
    late = re.search(r"tierbase-wal: the archiver has not archived (\S+) within", text)
    if late:
        return TierbaseError(f"the tier's archiver has not archived {late.group(1)}: the recovery cannot reach "
                             "the target", "Check the pool's free space (`tierbase status`) and try again")
    seg = archive.corrupt_segment(text)
    if seg is not None:
        return _corrupt(seg)
    if "recovery ended before configured recovery target was reached" in text:
        return OutsideHistory("the archived WAL ends before the target",
                              "Pick an earlier point (`tierbase history TIER`); a missing segment ends it early")
    if isinstance(err, TierbaseError):
        return err
    return ComputeError(f"the recovery failed: {err}", f"See the compute's log at {logfile}")


def _iso(ts: float, micro: bool = False) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds" if micro else "seconds")
