"""Portable driver: plain directories; a clone copies every byte (O(size)).

A running source is copied online with ``pg_basebackup`` (consistent without
stopping it); a stopped one with ``cp -a --reflink=auto``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..compute import Postgres
from .base import Source, VolumeDriver, copy_tree, remove_tree


class CopyDriver(VolumeDriver):
    name = "copy"
    copy_on_write = False

    def __init__(self, root: Path, pg: Postgres) -> None:
        super().__init__(root, pg.user)
        self.pg = pg

    def prepare(self) -> list[str]:
        super().prepare()
        self._own_dir(self.root)
        return ["storage driver 'copy': every branch is a full copy (O(size) in time and disk); "
                "use btrfs (run as root, or put TIERBASE_HOME on btrfs) for O(1) branches"]

    def create(self, volume: str) -> Path:
        path = self.path(volume)
        path.mkdir()
        self._own_dir(path)
        return path

    def clone(self, source: Source, volume: str, *, readonly: bool = False, limited: bool = False) -> Path:
        path = self.path(volume)
        ep = source.endpoint
        if ep is None:
            copy_tree(self.path(source.volume), path)
            return path
        self.create(volume)
        try:
            self.pg.run(
                [self.pg.bins["pg_basebackup"], "-D", str(path), "-h", ep.host, "-p", str(ep.port), "-U", ep.user,
                 "-X", "stream", "-c", "fast", "-w"],
                what="pg_basebackup", where=path, env=dict(os.environ, PGPASSWORD=ep.password),
            )
        except BaseException:
            self.delete(volume)
            raise
        return path

    def delete(self, volume: str) -> None:
        remove_tree(self.path(volume))

    def own_bytes(self, volume: str) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.path(volume)):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
        return total
