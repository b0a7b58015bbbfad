"""Portable driver: plain directories; a clone copies every byte (O(size)).

A running source is copied online with ``pg_basebackup`` (consistent without
stopping it); a stopped one with ``cp -a --reflink=auto``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from ..provider.types import ComputeUser, Endpoint
from .base import Source, VolumeDriver, copy_tree, remove_tree

#: backup(endpoint, path): an online copy of the running cluster at ``endpoint`` into ``path``
#: (pg_basebackup, given by the provider: storage knows volumes, not postgres)
Backup = Callable[[Endpoint, Path], None]


class CopyDriver(VolumeDriver):
    name = "copy"
    copy_on_write = False

    def __init__(self, root: Path, user: ComputeUser, backup: Backup) -> None:
        super().__init__(root, user)
        self.backup = backup

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
            self.backup(ep, path)
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
