"""The audit chain's head, anchored outside the SQLite file.

The HMAC chain shows an edited or removed record *inside* the chain, but not
a lost tail: delete the newest rows, or put back an older copy of meta.db,
and what is left is still a valid chain. So every append also writes the
head (newest id + its hash) to ``audit.head`` beside the database, signed
with the audit key: whoever can write the file but cannot read the key can
erase a head, not forge a newer one.

Layout: two 4 KiB slots, the head of record ``id`` goes to slot ``id % 2``
(one ``pwrite`` + ``fdatasync``; measured against an append-only log and a
write-temp-then-rename file in bench/audit.py, this is the cheapest). A torn
write can only damage the slot being written, whose page holds nothing else:
the other slot still holds the previous head, which is exactly the state of
a crash before the write.

Order, under an exclusive ``flock`` of this file held across the whole append
(threads and processes alike): INSERT the record and COMMIT, then write the
head. So the head is never ahead of a committed record, and is behind by at
most one record, only after a crash between the commit and the head write;
``AuditLog.verify`` accepts exactly that lag and nothing else. Until the head
catches up (the next append, or the next start: opening the log writes the
missing head), deleting that one record needs no key and no head file; this
is the window a crash leaves, and it closes when tierbase starts again.

What this does not stop: someone who can write both meta.db and audit.head
and kept an older copy of each can put both back. The SQL mirror (compared by
``audit verify``) is a third copy that then still holds the lost records.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import TierbaseError

SLOT = 4096
MAGIC = "tierbase-audit-head/1"


@dataclass(frozen=True)
class Head:
    id: int
    hash: str


@dataclass(frozen=True)
class HeadRead:
    head: Head | None          # the newest validly signed slot
    bad: int = 0               # slots with content that is not a head signed with the key (torn or forged)


class HeadFile:
    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self.key = key

    def _mac(self, id: int, digest: str) -> str:
        return hmac.new(self.key, f"{MAGIC}|{id}|{digest}".encode(), hashlib.sha256).hexdigest()

    @contextmanager
    def locked(self, exclusive: bool) -> Iterator[int]:
        """The open file, locked; a fresh descriptor each time so that threads exclude each other too."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise TierbaseError(f"cannot open the audit head file {self.path}: {err.strerror}",
                                "Run tierbase as the OS user that owns the data dir") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def read(self, fd: int) -> HeadRead:
        best: Head | None = None
        bad = 0
        for slot in (0, 1):
            raw = os.pread(fd, SLOT, slot * SLOT).rstrip(b"\0 \n")
            if not raw:
                continue
            head = self._parse(raw)
            if head is None or head.id % 2 != slot:
                bad += 1
            elif best is None or head.id > best.id:
                best = head
        return HeadRead(best, bad)

    def _parse(self, raw: bytes) -> Head | None:
        try:
            magic, id_text, digest, mac = raw.decode("ascii").split(" ")
            id = int(id_text)
        except ValueError:
            return None
        if magic != MAGIC or not hmac.compare_digest(mac, self._mac(id, digest)):
            return None
        return Head(id, digest)

    def write(self, fd: int, head: Head) -> None:
        if os.fstat(fd).st_size < 2 * SLOT:
            # allocate both slots once, so that later writes change no metadata (fdatasync stays one flush)
            os.pwrite(fd, b"\0" * (2 * SLOT - os.fstat(fd).st_size), os.fstat(fd).st_size)
            os.fsync(fd)
        line = f"{MAGIC} {head.id} {head.hash} {self._mac(head.id, head.hash)}\n".encode()
        os.pwrite(fd, line.ljust(SLOT, b"\0"), (head.id % 2) * SLOT)
        os.fdatasync(fd)
