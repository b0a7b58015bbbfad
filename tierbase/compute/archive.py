"""WAL archiving and recovery settings: the platform's own archive/restore command.

A tier's compute runs with ``archive_mode=on`` and an ``archive_command`` that is
always the same fixed script (``tierbase-wal``, written by the platform into the
data dir; never text a principal sent). It copies each completed WAL segment into
the tier's archive on the pool, records its checksum beside it, and fsyncs both
and the directory before answering, so that a segment the archiver was told is
safe survives a crash. On restore the same script copies a segment out and checks
it against the recorded sum: a mismatch (or a missing sum) exits 127, which
PostgreSQL treats as fatal rather than as "end of the archive", and the log names
the segment, so recovery never silently stops short of its target.

The checksum is cksum's CRC-32 with the length (``<segment>.crc``), not SHA-256: it is
there to catch a copy that went wrong (a torn or short copy, a flipped bit, other
contents under the name), and the restore step runs once per 16 MiB in PostgreSQL's
single startup process, where SHA-256 (openssl) cost ~25 ms a segment against ~7 ms.
A digest would add no protection against tampering either: whoever can write a segment
can write the sum beside it (the same OS user's directory). PostgreSQL checks each WAL
record's own CRC-32C while replaying on top. Segments archived before this carry
``<segment>.sha256``, which restore still checks.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArchiveCorrupt
from ..settings import value

SCRIPT_NAME = "tierbase-wal"
#: a WAL segment (timeline, log, seg), its .partial tail, or a timeline history file (PostgreSQL also
#: archives ``<segment>.<offset>.backup`` files after a pg_basebackup: the script takes those too, or
#: one backup by a platform engineer would stall the archiver for ever)
SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")
HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")
SEGMENT_BYTES = 16 * 1024 * 1024  # initdb's default --wal-segsize; tierbase never changes it

# POSIX sh: a Python interpreter per segment would cost ~40 ms of every restore step. The restore
# step runs in PostgreSQL's startup process, one segment at a time, so each fork counts: three per
# segment (the shell, cp, cksum); reading the recorded sum is a builtin.
SCRIPT = r"""#!/bin/sh
# tierbase-wal: the platform's archive_command / restore_command (written by tierbase; see
# tierbase/compute/archive.py). archive DIR SRC NAME | restore DIR NAME DEST [UPTO [PLACED]]
# UPTO: the segment the platform asked the tier's archiver for just before this recovery started; a
# segment up to it that is not in the archive yet is on its way, so restore waits for it (30 s).
# PLACED: the platform put the archived segments up to this one into pg_wal before postgres started
# (and checks them itself meanwhile): for those, "not in the archive" sends postgres to read them there.
# Each file's checksum is recorded beside it at archive time (NAME.crc: cksum's CRC-32 and length) and
# checked on the restored copy; segments archived before that carry NAME.sha256 instead.
set -u
fail() { echo "ERROR: tierbase-wal: $1" >&2; exit "${2:-1}"; }
mode=${1:-}; dir=${2:-}
case "$mode" in
  archive) src=${3:-}; name=${4:-} ;;
  restore) name=${3:-}; dest=${4:-}; upto=${5:-}; placed=${6:-} ;;
  *) fail "unknown mode '$mode'" 127 ;;
esac
case "$name" in
  *[!0-9A-Fa-z.]*|"") fail "refusing the file name '$name'" 127 ;;
  ????????????????????????|????????????????????????.partial|????????.history) ;;
  ????????????????????????.????????.backup) ;;
  *) fail "refusing the file name '$name'" 127 ;;
esac
if [ "$mode" = archive ]; then
  if [ -f "$dir/$name" ]; then
    cmp -s "$src" "$dir/$name" && exit 0
    fail "$name is already archived with other contents"
  fi
  tmp="$dir/.$name.$$"
  trap 'rm -f "$tmp" "$tmp.crc"' EXIT
  # pg_wal and the archive are on the same btrfs pool: a reflink copy shares the extents (O(1)), and
  # copy-on-write keeps the archived copy intact when postgres recycles and overwrites the segment
  cp --reflink=auto "$src" "$tmp" || fail "cannot copy $name into the archive"
  sum=$(cksum < "$tmp") || fail "cannot checksum $name"
  printf '%s\n' "$sum" > "$tmp.crc" || fail "cannot record the checksum of $name"
  sync "$tmp" "$tmp.crc" || fail "cannot fsync $name"
  mv "$tmp.crc" "$dir/$name.crc" && mv "$tmp" "$dir/$name" || fail "cannot place $name"
  trap - EXIT
  sync "$dir" || fail "cannot fsync the archive directory"
  exit 0
fi
case "$name$placed" in
  *[!0-9A-F]*) ;;
  ????????????????????????????????????????????????)
    # same timeline as PLACED and not after it: already in pg_wal (arithmetic on the 16 hex digits after
    # the timeline: no fork)
    [ "${name%????????????????}" = "${placed%????????????????}" ] &&
      [ $((0x${name#????????})) -le $((0x${placed#????????})) ] && exit 1 ;;
esac
if [ ! -f "$dir/$name" ]; then
  # on its way only if on UPTO's timeline and not after it (same-length upper-case hex: sort order)
  case "$upto" in ????????????????????????) ;; *) exit 1 ;; esac
  case "$name" in ????????????????????????) ;; *) exit 1 ;; esac
  [ "${name%????????????????}" = "${upto%????????????????}" ] || exit 1
  printf '%s\n%s\n' "$name" "$upto" | LC_ALL=C sort -c 2>/dev/null || exit 1
  i=0
  while [ ! -f "$dir/$name" ]; do
    i=$((i + 1))
    [ "$i" -le 3000 ] || fail "the archiver has not archived $name within 30 s"
    sleep 0.01
  done
fi
if [ -f "$dir/$name.crc" ] && read -r want < "$dir/$name.crc"; then
  cp --reflink=auto "$dir/$name" "$dest" || exit 1
  got=$(cksum < "$dest") || exit 1
elif [ -f "$dir/$name.sha256" ] && read -r want < "$dir/$name.sha256"; then
  cp --reflink=auto "$dir/$name" "$dest" || exit 1
  got=$(openssl dgst -sha256 -r "$dest" 2>/dev/null || sha256sum "$dest") || exit 1
  got=${got%% *}
else
  fail "checksum mismatch on WAL segment $name: no checksum recorded" 127
fi
if [ "$got" != "$want" ]; then
  rm -f "$dest"
  fail "checksum mismatch on WAL segment $name in the archive" 127
fi
exit 0
"""


def install_script(bindir: Path) -> Path:
    """Write the fixed script (0700: computes run as the service user, who owns it; nothing in the data dir is
    for other users) where computes can run it; rewritten only when it differs."""
    path = bindir / SCRIPT_NAME
    bindir.mkdir(parents=True, exist_ok=True)
    bindir.chmod(0o700)
    if not path.exists() or path.read_text() != SCRIPT:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(SCRIPT)
        tmp.chmod(0o700)
        os.replace(tmp, path)
    return path


def archive_settings(script: Path, wal_dir: Path) -> dict[str, str]:
    return {"archive_mode": "on", "archive_command": f"{script} archive {wal_dir} %p %f"}


@dataclass(frozen=True)
class Target:
    """Where recovery stops: a time (ISO text with a zone) or an LSN."""

    time: str | None = None
    lsn: str | None = None
    inclusive: bool = True


def recovery_settings(script: Path, wal_dir: Path, target: Target, upto: str | None = None,
                      placed: str | None = None) -> dict[str, str]:
    """Settings for one archive recovery, given on the command line of that start only (never written
    into the cluster's files, so later starts and branches of it carry none of it).

    Recovery pauses at the target and the platform promotes it (``pg_promote``): a promotion asked for
    is a fast one (an end-of-recovery record, the checkpoint in the background), while
    ``recovery_target_action=promote`` waits for a full immediate checkpoint (~0.4 s and more under
    load). Nobody but the platform reaches the copy meanwhile: its branch is not ready, so the proxy
    does not route to it, and the compute does not listen on TCP during this start (its unix socket,
    which only the platform reaches, is enough for the proxy; direct TCP comes back at its next start).

    ``upto``: the segment the parent's archiver is copying now (PointInTime.reach): the replay starts
    at once and the restore command waits for that segment only if the replay gets there first.
    ``placed``: the last of the segments put into pg_wal beforehand (place()), which the restore
    command leaves to postgres to read there."""
    out = {
        "restore_command": f"{script} restore {wal_dir} %f %p" + (f" {upto or '-'} {placed}" if placed else
                                                                   f" {upto}" if upto else ""),
        "recovery_target_timeline": "latest",
        "recovery_target_action": "pause",
        "recovery_target_inclusive": "on" if target.inclusive else "off",
        "hot_standby": "on",
        "listen_addresses": "",
        # replay touches more pages than the clusters' 64MB: evicting them means writes into
        # copy-on-write files in the middle of the replay; with room they wait for the checkpoint
        # after the promotion (this start only: the next start is back to the cluster's own setting)
        "shared_buffers": str(value("recovery_shared_buffers")),
        "archive_mode": "off",
    }
    if target.lsn is not None:
        out["recovery_target_lsn"] = target.lsn
    else:
        out["recovery_target_time"] = str(target.time)
    return out


def write_signal(datadir: Path) -> None:
    (datadir / "recovery.signal").write_text("")


# -- the archive's contents -------------------------------------------------------------
def parse_lsn(text: str) -> int:
    hi, lo = text.strip().split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segment_range(name: str) -> tuple[int, int, int] | None:
    """(timeline, start LSN, end LSN) of a segment file name, None for other files."""
    m = SEGMENT_RE.match(name)
    if not m:
        return None
    tli, log, seg = (int(g, 16) for g in m.groups()[:3])
    start = (log << 32) + seg * SEGMENT_BYTES
    return tli, start, start + SEGMENT_BYTES


@dataclass(frozen=True)
class Segment:
    name: str
    bytes: int
    mtime: float


def segments(wal_dir: Path) -> list[Segment]:
    """Segment and history files in an archive (not their checksums or a copy in flight)."""
    if not wal_dir.is_dir():
        return []
    out = []
    for p in wal_dir.iterdir():
        if SEGMENT_RE.match(p.name) or HISTORY_RE.match(p.name):
            st = p.stat()
            out.append(Segment(p.name, st.st_size, st.st_mtime))
    return sorted(out, key=lambda s: s.name)


def to_place(wal_dir: Path, redo_lsn: str, timeline: int, *, lsn: str | None = None,
             at: float | None = None) -> list[str]:
    """The archived segments a recovery from a base (REDO at ``redo_lsn`` on ``timeline``) replays first and
    that end before the target: from the one holding the REDO point, contiguous, on that timeline, each
    wholly before the target LSN, or (a time) archived before it, so that every record in it is older.

    Before the target, because of how PostgreSQL recovers an atomic snapshot (no backup label): it
    first replays all the WAL in pg_wal as a crash recovery and is consistent only at its end, so a
    target inside that WAL would stop it "before the consistent recovery point". None when the archive
    holds a later timeline: that recovery follows the timeline history, through the restore command."""
    start = parse_lsn(redo_lsn)
    want = parse_lsn(lsn) if lsn is not None else None
    mine: list[tuple[Segment, int, int]] = []
    for s in segments(wal_dir):
        m = HISTORY_RE.match(s.name)
        if m and int(m.group(1), 16) > timeline:
            return []
        rng = segment_range(s.name)
        if rng is None or s.name.endswith(".partial") or rng[2] <= start:
            continue
        if rng[0] != timeline:
            return []
        mine.append((s, rng[1], rng[2]))
    out: list[str] = []
    edge = start
    for s, lo, hi in mine:
        if lo > edge or (not out and not lo <= start < hi):
            break  # a gap: the rest through the restore command
        if (want is not None and hi > want) or (at is not None and s.mtime >= at):
            break
        out.append(s.name)
        edge = hi
    return out


def drop_preallocated(pg_wal: Path, timeline: int, end_lsn: str) -> int:
    """Remove from a copy's pg_wal the segment files that start past the one after ``end_lsn`` (where the
    copied cluster's WAL ended, or later): postgres made them in advance by recycling old segments, so they
    hold nothing but old bytes. Left there, each one on the old timeline is renamed or unlinked at the
    end of the recovery with three fsyncs, while the promotion waits. Returns how many went."""
    # one segment of margin: the last record before end_lsn (a shutdown checkpoint's, when the copy was
    # of a stopped cluster) may run on into the next segment
    end = parse_lsn(end_lsn) + SEGMENT_BYTES
    gone = 0
    for p in pg_wal.iterdir():
        rng = segment_range(p.name)
        if rng is not None and not p.name.endswith(".partial") and rng[0] == timeline and rng[1] > end:
            p.unlink()
            gone += 1
    return gone


#: Linux's ioctl to share a file's extents with another (a reflink copy; btrfs, XFS)
FICLONE = 0x40049409


def place(wal_dir: Path, names: list[str], pg_wal: Path, owner: tuple[int, int] | None) -> list[str]:
    """Reflink copies of archived segments into a stopped cluster's pg_wal (O(1) each, no process),
    replacing what the base snapshot held under those names; stops at the first the pool cannot
    reflink (the restore command brings the rest). Returns those placed."""
    import fcntl

    done: list[str] = []
    for name in names:
        dst = pg_wal / name
        dst.unlink(missing_ok=True)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with open(wal_dir / name, "rb") as src:
                fcntl.ioctl(fd, FICLONE, src.fileno())
            if owner is not None:
                os.fchown(fd, *owner)
        except OSError:
            os.close(fd)
            dst.unlink(missing_ok=True)
            break
        os.close(fd)
        _archived(pg_wal, name, owner)
        done.append(name)
    return done


def _archived(pg_wal: Path, name: str, owner: tuple[int, int] | None) -> None:
    """Mark a placed segment archived, as PostgreSQL marks a segment it restored from the archive
    (XLogArchiveForceDone): a restored tier's archiver must not send it to the archive again."""
    status = pg_wal / "archive_status"
    (status / f"{name}.ready").unlink(missing_ok=True)
    done = status / f"{name}.done"
    if not done.exists():
        os.close(os.open(done, os.O_WRONLY | os.O_CREAT, 0o600))
        if owner is not None:
            os.chown(done, *owner)


def verify(wal_dir: Path, name: str, copy: io.BufferedReader | None = None) -> None:
    """Check one archived file (or ``copy``, an open copy of it, read from its start) against its
    recorded checksum, as the restore step does; ArchiveCorrupt naming it if not."""
    import hashlib
    import subprocess

    try:
        crc = wal_dir / f"{name}.crc"
        with copy or open(wal_dir / name, "rb") as fh:
            if crc.exists():
                want = crc.read_text().strip()
                got = subprocess.run(["cksum"], stdin=fh, capture_output=True, text=True, check=True).stdout.strip()
            else:
                want = (wal_dir / f"{name}.sha256").read_text().strip()
                got = hashlib.file_digest(fh, "sha256").hexdigest()
    except (OSError, subprocess.CalledProcessError) as err:
        why = err.strerror if isinstance(err, OSError) else "cksum failed"
        raise ArchiveCorrupt(f"WAL segment {name} cannot be read from the archive ({why})",
                             "The history past it cannot be reached; branch at an earlier point", segment=name) from err
    if got != want:
        raise ArchiveCorrupt(f"checksum mismatch on WAL segment {name} in the archive",
                             "The history past it cannot be reached; branch at an earlier point", segment=name)


#: the files beside a segment that hold its checksum (the current one first)
CHECKSUM_SUFFIXES = (".crc", ".sha256")


def corrupt_segment(log_text: str) -> str | None:
    """The segment the restore script refused, from the compute's log."""
    m = re.search(r"checksum mismatch on WAL segment ([0-9A-F]{24}(?:\.partial)?|[0-9A-F]{8}\.history)", log_text)
    return m.group(1) if m else None
