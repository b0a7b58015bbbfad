"""Migration files on disk: ``V0003__split_inventory_code.sql`` plus an optional ``U0003__...sql`` undo.

Also the migration error classes (one place, so every module of ``tierbase.migrate`` raises the
same ones): each carries a message, a hint and the data an agent needs to act.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Refused, TierbaseError

NO_TRANSACTION_MARKER = "-- tierbase:no-transaction"
MAX_VERSION = 2**31 - 1  # the ledger's version column is an int
_FILE = re.compile(r"^(?P<kind>[VU])(?P<version>\d+)__(?P<name>[A-Za-z0-9_-]+)\.sql$")
# a .sql file that looks like it means to be a migration but is misnamed (v1_x.sql, V1-x.sql, U3.sql)
_LOOKS_LIKE = re.compile(r"^([VvUu]\d|[VU][^a-z].*__)")
_NEW_NAME = re.compile(r"^[a-z0-9_]+$")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.sql", re.I)


# -- errors -------------------------------------------------------------------------------------------
class MigrationError(TierbaseError):
    """Migration files or a migration request are not usable as they are."""

    code = "migration_error"


class MissingUndo(MigrationError):
    code = "missing_undo"


class LintUnavailable(MigrationError):
    code = "squawk_not_found"


class MigrationFailed(TierbaseError):
    """Postgres rejected a migration; data says which file, line, error and SQLSTATE."""

    code = "migration_failed"
    http_status = 422


class MigrationDrift(Refused):
    """An applied migration's file was edited afterwards: applying anything is refused."""

    code = "migration_drift"
    http_status = 409


class MigrationBusy(Refused):
    code = "migration_busy"
    http_status = 409


class LintBlocked(Refused):
    code = "lint_blocked"


# -- files --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    sql: str
    checksum: str
    transactional: bool
    undo_path: Path | None = None
    undo_sql: str | None = None
    #: sent by a client over the API: ``path`` is the file's name only, there is no file on this side
    uploaded: bool = False

    def label(self) -> str:
        return f"V{self.version:04d}__{self.name}"

    def undo_label(self) -> str:
        return f"U{self.version:04d}__{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "name": self.name, "label": self.label(), "file": str(self.path),
            "checksum": self.checksum, "transactional": self.transactional,
            "undo_file": str(self.undo_path) if self.undo_path else None,
        }


def is_transactional(sql: str) -> bool:
    """False when a line of the file is exactly the no-transaction marker."""
    return not any(line.strip().lower() == NO_TRANSACTION_MARKER for line in sql.splitlines())


def checksum(raw: bytes) -> str:
    """sha256 of the file with CRLF normalised to LF, so a checkout on Windows is not drift."""
    return hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.replace(b"\r\n", b"\n").decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MigrationError(f"migration file {name} is not UTF-8 ({err.reason} at byte {err.start})",
                             "Save it as UTF-8", file=name) from err


def _read_dir(directory: Path) -> dict[str, bytes]:
    """The bytes of every .sql file in ``directory`` that is or looks like a migration."""
    if not directory.is_dir():
        raise MigrationError(
            f"migration directory {directory} does not exist",
            "Create the first migration with `tierbase migrate new NAME` (it creates the directory), "
            "or set the migration dir in tierbase.toml",
            directory=str(directory),
        )
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and p.suffix.lower() == ".sql" and (_FILE.match(p.name) or _LOOKS_LIKE.match(p.name))}


def discover(directory: Path) -> list[Migration]:
    """Every migration in ``directory``, ordered by version; refuses an ambiguous or misnamed set."""
    directory = Path(directory)
    return _parse(_read_dir(directory), str(directory), directory)


def read_dir(directory: Path) -> dict[str, str]:
    """The migration files of ``directory`` as name -> text: what a client sends to the API, which
    reads no directory itself. The text is the file's exact content (no newline or BOM changes),
    so the checksum the server computes from it is the file's."""
    directory = Path(directory)
    out = {}
    for name, raw in _read_dir(directory).items():
        try:
            out[name] = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MigrationError(f"migration file {directory / name} is not UTF-8 ({err.reason} at byte "
                                 f"{err.start})", "Save it as UTF-8", file=str(directory / name)) from err
    return out


def from_contents(contents: Mapping[str, str], where: str = "the migration files sent") -> list[Migration]:
    """Migrations from file contents (name -> text) sent over the API, with the same checks as ``discover``."""
    bad = sorted(n for n in contents if not _PLAIN_NAME.fullmatch(n))
    if bad:
        raise MigrationError(f"not plain .sql file names in {where}: {', '.join(map(repr, bad[:5]))}",
                             "Send each file under its own name (V0001__name.sql), without a directory part",
                             files=bad)
    raw = {}
    for name, text in contents.items():
        try:
            raw[name] = text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise MigrationError(f"migration file {name} is not valid text ({err.reason})", "Save it as UTF-8",
                                 file=name) from err
    return _parse(raw, where, None)


def _parse(found: dict[str, bytes], where: str, directory: Path | None) -> list[Migration]:
    """Validate and load one set of migration files (from a directory, or sent by a client)."""
    ups: dict[int, list[str]] = {}
    undos: dict[int, list[str]] = {}
    bad: list[str] = []
    for name in sorted(found):
        match = _FILE.match(name)
        if match is None:
            if _LOOKS_LIKE.match(name):
                bad.append(name)
            continue
        version = int(match["version"])
        (ups if match["kind"] == "V" else undos).setdefault(version, []).append(name)
    if bad:
        raise MigrationError(
            f"misnamed migration file(s) in {where}: {', '.join(bad)}",
            "Name migrations V<digits>__<name>.sql and undo files U<digits>__<name>.sql "
            "(e.g. V0003__split_inventory_code.sql), or move other .sql files out of the directory",
            directory=where, files=bad,
        )
    _refuse_duplicates(where, ups, "migration")
    _refuse_duplicates(where, undos, "undo")
    too_big = [p for v, ps in ups.items() if v > MAX_VERSION for p in ps]
    if too_big:
        raise MigrationError(f"migration version too large in {', '.join(too_big)} (max {MAX_VERSION})",
                             "Renumber the file with a smaller version", files=too_big)
    orphans = [ps[0] for v, ps in undos.items() if v not in ups]
    if orphans:
        raise MigrationError(
            f"undo file(s) without a migration in {where}: {', '.join(sorted(orphans))}",
            "Each U<version>__<name>.sql undoes the V file of the same version and name: "
            "rename it to match its migration, or delete it",
            directory=where, files=sorted(orphans),
        )

    def path(name: str) -> Path:
        return directory / name if directory is not None else Path(name)

    out = []
    for v in sorted(ups):
        up, undo = ups[v][0], undos.get(v, [None])[0]
        out.append(_load(path(up), found[up], path(undo) if undo else None, found[undo] if undo else None,
                         uploaded=directory is None))
    return out


def _refuse_duplicates(where: str, found: dict[int, list[str]], what: str) -> None:
    clashes = {v: ps for v, ps in found.items() if len(ps) > 1}
    if not clashes:
        return
    names = [", ".join(ps) for _, ps in sorted(clashes.items())]
    raise MigrationError(
        f"two {what} files with one version in {where}: {'; '.join(names)}",
        "Each version must be unique: renumber one of them (`tierbase migrate new NAME` picks the next free "
        "number) — if one of them is already applied on a tier, renumber the other",
        directory=where, versions=sorted(clashes), files=list(clashes.values()),
    )


def _load(path: Path, raw: bytes, undo_path: Path | None, undo_raw: bytes | None, *, uploaded: bool) -> Migration:
    match = _FILE.match(path.name)
    assert match is not None  # _parse only passes matching names
    sql = _decode(raw, str(path))
    undo_sql = None
    if undo_path is not None and undo_raw is not None:
        undo_match = _FILE.match(undo_path.name)
        if undo_match is None or undo_match["name"] != match["name"]:
            raise MigrationError(
                f"undo file {undo_path.name} does not match its migration {path.name}",
                f"Rename it to U{match['version']}__{match['name']}.sql",
                files=[path.name, undo_path.name],
            )
        undo_sql = _decode(undo_raw, str(undo_path))
    return Migration(version=int(match["version"]), name=match["name"], path=path, sql=sql, checksum=checksum(raw),
                     transactional=is_transactional(sql), undo_path=undo_path, undo_sql=undo_sql, uploaded=uploaded)


_TEMPLATE = """\
-- {label}: describe the change here.
--
-- tierbase runs this file in ONE transaction together with its ledger row, with
-- statement_timeout and lock_timeout set: if any statement fails, nothing of it stays.
-- Prefer expand-then-contract: add new columns/tables first, backfill, drop old ones later.
-- Statements that cannot run in a transaction (CREATE INDEX CONCURRENTLY) go in a file
-- of their own that has this marker on a line by itself: -- tierbase:no-transaction

"""

_UNDO_TEMPLATE = """\
-- {label}: undoes {up}. `tierbase migrate verify` checks that up -> undo -> up
-- leaves the same schema, and that undo restores the schema from before {up}.

"""


def new_migration(directory: Path, name: str, with_undo: bool = False) -> list[Path]:
    """Write the next migration file (and its undo file); returns the paths written."""
    if not _NEW_NAME.match(name):
        raise MigrationError(
            f"migration name {name!r} is not valid",
            "Use lower-case letters, digits and underscores, e.g. split_inventory_code",
            name=name,
        )
    directory = Path(directory)
    existing = discover(directory) if directory.is_dir() else []
    version = max((m.version for m in existing), default=0) + 1
    up = directory / f"V{version:04d}__{name}.sql"
    paths = [up]
    directory.mkdir(parents=True, exist_ok=True)
    up.write_text(_TEMPLATE.format(label=up.stem))
    if with_undo:
        undo = directory / f"U{version:04d}__{name}.sql"
        undo.write_text(_UNDO_TEMPLATE.format(label=undo.stem, up=up.stem))
        paths.append(undo)
    return paths
