"""Destructive filesystem operations prove ownership: the data dir's marker."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tierbase import Tierbase
from tierbase.errors import Refused, TierbaseError

from .conftest import free_port_base, make_home, needs_root_btrfs

pytestmark = needs_root_btrfs


def test_purge_refuses_a_directory_tierbase_did_not_make() -> None:
    base = make_home()
    try:
        (base / "precious.txt").write_text("the user's own file")
        with pytest.raises(Refused, match="not a tierbase data dir"):
            Tierbase(base).down(purge=True)
        assert (base / "precious.txt").read_text() == "the user's own file"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_first_up_into_a_non_empty_foreign_directory_is_refused() -> None:
    base = make_home()
    try:
        (base / "precious.txt").write_text("mine")
        with pytest.raises(TierbaseError, match="not empty and is not a tierbase data dir"):
            Tierbase(base).init(storage="btrfs", btrfs_size="1G")
        assert sorted(p.name for p in base.iterdir()) == ["precious.txt"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_failed_first_up_removes_only_what_it_made(tmp_path: Path) -> None:
    base = make_home()
    home = base / "home"
    home.mkdir()
    home.chmod(0o711)
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    try:
        # an image too small for mkfs.btrfs: the first `up` fails after it began to make the data dir
        with pytest.raises(TierbaseError):
            Tierbase(home).init(storage="btrfs", btrfs_size="1M")
        assert home.is_dir() and list(home.iterdir()) == []  # the empty dir the user made stays
        assert base.is_dir()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_purge_of_a_real_data_dir_removes_it() -> None:
    base = make_home()
    home = base / "home"
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    tb = Tierbase(home)
    try:
        tb.init(storage="btrfs", btrfs_size="1G")
        assert tb.home.owned()
        tb.down(purge=True)
        assert not home.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
