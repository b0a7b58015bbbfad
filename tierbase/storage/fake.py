"""A fake driver: plain directories, the volumes of the FakeProvider (provider/fake.py).

It copies nothing Postgres-specific and makes no promise of consistency for a
running source; never use it for a real cluster.
"""

from __future__ import annotations

from pathlib import Path

from .base import Source, VolumeDriver, copy_tree, remove_tree


class FakeDriver(VolumeDriver):
    name = "fake"
    copy_on_write = False

    def create(self, volume: str) -> Path:
        path = self.path(volume)
        path.mkdir(parents=True)
        return path

    def clone(self, source: Source, volume: str, *, readonly: bool = False, limited: bool = False) -> Path:
        copy_tree(self.path(source.volume), self.path(volume))
        return self.path(volume)

    def delete(self, volume: str) -> None:
        remove_tree(self.path(volume))

    def own_bytes(self, volume: str) -> int:
        return sum(p.stat().st_size for p in self.path(volume).rglob("*") if p.is_file())
