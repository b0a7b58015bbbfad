"""Restoring a pg_dump into a running cluster, all or nothing.

The dump is a file the service holds (an upload it spooled, or in-process the caller's own file),
never a path a principal named over the API. It is inspected before anything runs: a plain script
is scanned for psql meta-commands (psqlscan), an archive's header and members are checked. The
restore tools run as the unprivileged compute OS user, read the dump on stdin (they open no file of
the dump's naming), and connect as the Endpoint the caller passes in, so that the caller decides
which role restores (the branch owner's, not the platform's superuser, once the roles exist).

psql runs with -X (no psqlrc), ON_ERROR_STOP, --single-transaction, and in restricted mode: its
first input line is ``\\restrict KEY`` with a key the dump cannot know, so even a meta-command the
scanner missed is refused by psql itself. pg_dump's own ``\\restrict``/``\\unrestrict`` lines are
dropped (blanked, so that line numbers stay true).

A directory-format dump is not restored here: its table of contents names the data files that
pg_restore then opens relative to the directory (``../`` included), which would let an upload read
any file the compute user can. The client turns a directory dump into a plain script on its own
side (:func:`directory_script`) instead.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import tarfile
import tempfile
import threading
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

from ..errors import BadDump, InvalidInput, RestoreFailed
from ..provider.types import Endpoint
from .binaries import find_binaries
from .postgres import Postgres
from .psqlscan import scan

# pg_backup.h ArchiveFormat, at byte 10 of an archive header: "PGDMP", major, minor, rev, intSize, offSize.
# (A directory dump's toc.dat says 3, tar, like a tar archive's: they differ in their members.)
_FORMAT_AT = 10
_CUSTOM = 1
_TAR_MEMBER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # toc.dat, 3456.dat, restore.sql, blob_1.dat
DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}")
_KEEP = re.compile(r"(ERROR|FATAL|DETAIL|HINT):|^(psql|pg_restore): error:")
_DROP = re.compile(r"^(pg_restore: error: could not execute query: )")
_PSQL_LINE = re.compile(r"^psql:<stdin>:(\d+): ")
_CHUNK = 1 << 20


class DumpFormat(StrEnum):
    PLAIN = "plain"
    CUSTOM = "custom"
    TAR = "tar"


def inspect(src: Path) -> tuple[DumpFormat, set[int]]:
    """The dump's format, after checking it (BadDump / UnsafeDump); for a plain script also the lines
    to drop (pg_dump's own \\restrict and \\unrestrict)."""
    with open(src, "rb") as fh:
        head = fh.read(65536)
    if not head:
        raise BadDump("the dump is empty", "Send the output of pg_dump")
    if head[:5] == b"PGDMP":
        kind = head[_FORMAT_AT] if len(head) > _FORMAT_AT else -1
        if kind != _CUSTOM:
            raise BadDump("the dump is the toc.dat of a tar or directory-format dump, not a whole archive",
                          "Send the whole dump: a custom archive (pg_dump -Fc), a tar (pg_dump -Ft) or plain SQL")
        return DumpFormat.CUSTOM, set()
    if head[257:262] == b"ustar":
        _check_tar(src)
        return DumpFormat.TAR, set()
    if head[:2] == b"\x1f\x8b" or head[:4] == b"PK\x03\x04":
        raise BadDump("the dump is compressed (gzip or zip)",
                      "Decompress it first, or dump with `pg_dump -Fc` (a custom archive is compressed already)")
    if b"\0" in head:
        raise BadDump("the dump is neither plain SQL nor a pg_dump archive (it holds NUL bytes)",
                      "Send the output of pg_dump: plain SQL, -Fc or -Ft")
    with open(src, "rb") as fh:
        return DumpFormat.PLAIN, scan(fh).drop_lines


def _check_tar(src: Path) -> None:
    """A pg_dump -Ft archive: flat regular files only, toc.dat first and of the tar format."""
    try:
        with tarfile.open(src, "r:") as tar:
            first = True
            for member in tar:
                if not member.isreg() or not _TAR_MEMBER.fullmatch(member.name):
                    raise BadDump(f"the tar archive holds a member tierbase does not accept "
                                  f"({'a ' + _kind(member) if not member.isreg() else 'a name with a directory part'})",
                                  "Send a tar written by `pg_dump -Ft`: plain files, no directories, links or "
                                  "devices", member_type=_kind(member))
                if first:
                    fh = tar.extractfile(member)
                    toc = fh.read(5) if fh else b""
                    if member.name != "toc.dat" or toc != b"PGDMP":
                        raise BadDump("the tar archive is not a pg_dump archive (toc.dat is not its first member)",
                                      "Send a tar written by `pg_dump -Ft`")
                    first = False
                if member.name.endswith((".gz", ".lz4", ".zst")):  # -Ft never compresses; -Fd does
                    raise BadDump("the tar archive holds a directory-format dump",
                                  "Import the directory itself: `tierbase import DIR` turns it into a plain "
                                  "script on your side; or dump with `pg_dump -Fc`")
            if first:
                raise BadDump("the tar archive is empty", "Send a tar written by `pg_dump -Ft`")
    except tarfile.TarError as err:
        raise BadDump(f"the tar archive cannot be read ({err})", "Send a tar written by `pg_dump -Ft`") from err


def _kind(member: tarfile.TarInfo) -> str:
    return ("directory" if member.isdir() else "link" if member.issym() or member.islnk() else
            "device" if member.isdev() else "regular file" if member.isreg() else "special file")


def restore_dump(pg: Postgres, admin: Endpoint, ep: Endpoint, src: Path, dbname: str, *,
                 timeout: float = 3600) -> DumpFormat:
    """Restore ``src`` into ``dbname`` as ``ep``; ``admin`` creates the database if it is missing and
    drops it again if the restore fails. Plain SQL through psql, archives through pg_restore."""
    if not DATABASE_NAME.fullmatch(dbname):  # psql -d would read "a=b" as a connection string
        raise InvalidInput(f"database name {dbname!r} is not accepted for an import",
                      "Use 1-63 of letters, digits, '_', '$' and '-', starting with a letter or '_'")
    fmt, drop = inspect(src)
    made = dbname != "postgres" and _ensure_database(admin, dbname, ep.user)
    try:
        offset = 0
        if fmt is DumpFormat.PLAIN:
            offset = 1 if restricts(pg.bins["psql"]) else 0
            code, err = _psql(pg, ep, src, dbname, drop, timeout, restrict=bool(offset))
        else:
            code, err = _pg_restore(pg, ep, src, dbname, timeout)
    except BaseException:
        if made:
            _drop_database(admin, dbname)
        raise
    if code != 0:
        if made:
            _drop_database(admin, dbname)
        raise RestoreFailed(f"restoring the {fmt.value} dump failed: "
                            f"{clean_errors(err, offset) or f'exit code {code}'}",
                            "Fix the dump and try again; nothing was restored")
    return fmt


def _conn_args(ep: Endpoint, dbname: str) -> list[str]:
    return ["-h", ep.host, "-p", str(ep.port), "-U", ep.user, "-d", dbname]


def _env(ep: Endpoint) -> dict[str, str]:
    """A small, fixed environment: English messages (they are filtered below), no password file."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "PGCONNECT_TIMEOUT": "10",
           "PGPASSFILE": "/dev/null", "PGAPPNAME": "tierbase-import"}
    if ep.password:
        env["PGPASSWORD"] = ep.password
    return env


@cache
def restricts(psql: str) -> bool:
    """Whether this psql has ``\\restrict`` (15.14, 16.10, 17.6, 18 and later). Without it the scanner
    alone keeps meta-commands out, which is what it is for; restricted mode is the second lock."""
    try:
        got = subprocess.run([psql, "--help=commands"], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "\\restrict" in got.stdout


def _psql(pg: Postgres, ep: Endpoint, src: Path, dbname: str, drop: set[int], timeout: float, *,
          restrict: bool = True) -> tuple[int, bytes]:
    args = [pg.bins["psql"], "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", "-",
            *_conn_args(ep, dbname)]
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf, env=_env(ep),
                                cwd="/", **pg.user.run_kwargs())  # type: ignore[call-overload]
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            assert proc.stdin is not None
            _feed(proc.stdin, src, drop, secrets.token_hex(16) if restrict else None)
            code = proc.wait()
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errf.seek(0)
        return code, errf.read()


def _feed(stdin: IO[bytes], src: Path, drop: set[int], key: str | None) -> None:
    """The dump on psql's stdin, after a \\restrict line of our own; a psql that stopped early is fine."""
    try:
        with stdin, open(src, "rb") as fh:
            if key:
                stdin.write(f"\\restrict {key}\n".encode())
            buf: list[bytes] = []
            size = 0
            for n, line in enumerate(fh, 1):
                buf.append(b"\n" if n in drop else line)
                size += len(line)
                if size >= _CHUNK:
                    stdin.write(b"".join(buf))
                    buf, size = [], 0
            stdin.write(b"".join(buf))
    except BrokenPipeError:
        pass  # psql stopped at an error (ON_ERROR_STOP): its exit code and stderr tell


def _pg_restore(pg: Postgres, ep: Endpoint, src: Path, dbname: str, timeout: float) -> tuple[int, bytes]:
    args = [pg.bins["pg_restore"], "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
            *_conn_args(ep, dbname)]
    with open(src, "rb") as fh, tempfile.TemporaryFile() as errf:
        try:
            got = subprocess.run(args, stdin=fh, stdout=subprocess.DEVNULL, stderr=errf, env=_env(ep), cwd="/",
                                 timeout=timeout, **pg.user.run_kwargs())  # type: ignore[call-overload]
        except subprocess.TimeoutExpired as err:
            raise RestoreFailed(f"the restore did not finish within {timeout:.0f}s",
                                "Nothing was restored; import a smaller dump or try when the machine is less busy") \
                from err
        errf.seek(0)
        return got.returncode, errf.read()


def clean_errors(raw: bytes, offset: int = 1) -> str:
    """psql's and pg_restore's ERROR lines (with DETAIL/HINT), never their context lines: LINE, CONTEXT,
    QUERY and "Command was" quote statements and data, and the message must not carry file content."""
    kept = []
    for line in raw.decode(errors="replace").splitlines():
        line = _DROP.sub("", line)
        m = _PSQL_LINE.match(line)
        if m:  # psql counts our \restrict line too
            line = f"line {int(m[1]) - offset}: {line[m.end():]}"
        if _KEEP.search(line):
            kept.append(re.sub(r"\s+", " ", line.strip())[:300])
    return "; ".join(kept[-4:])


def _ensure_database(admin: Endpoint, dbname: str, owner: str) -> bool:
    """Create ``dbname`` (owned by the role that restores) if missing; True if it was created."""
    with psycopg.connect(admin.dsn("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (dbname,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(owner)))
        return True


def _drop_database(admin: Endpoint, dbname: str) -> None:
    with psycopg.connect(admin.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


def directory_script(directory: Path, out: IO[bytes]) -> None:
    """Write a directory-format dump as the plain SQL script pg_restore makes of it, on the caller's side
    with the caller's rights (the server never restores a directory dump: see the module doc). Written
    whole before anything is sent, so that a pg_restore failure cannot leave a truncated script."""
    if not (directory / "toc.dat").is_file():
        raise BadDump(f"{directory} is a directory but not a pg_dump directory-format dump (no toc.dat in it)",
                      "Give a dump file, or the directory written by `pg_dump -Fd`")
    args = [find_binaries()["pg_restore"], "--no-owner", "--no-privileges", "-f", "-", str(directory)]
    with tempfile.TemporaryFile() as errf:
        got = subprocess.run(args, stdout=out, stderr=errf, stdin=subprocess.DEVNULL, check=False)
        if got.returncode != 0:
            errf.seek(0)
            raise BadDump(f"pg_restore could not read the directory dump {directory}: "
                          f"{clean_errors(errf.read()) or f'exit code {got.returncode}'}",
                          "Check that it is a complete `pg_dump -Fd` output")
