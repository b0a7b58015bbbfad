"""`import`: a real-world plain SQL dump (pagila's schema) restored into a branch, then branched."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tierbase import Tierbase
from tierbase.errors import InvalidInput, TierbaseError

from .conftest import query

PAGILA = Path(__file__).resolve().parent / "fixtures" / "pagila" / "pagila-schema.sql"


@pytest.mark.skipif(not PAGILA.exists(), reason=f"the pagila fixture is not at {PAGILA}")
def test_import_pagila_into_a_new_database_and_branch_it(platform: Tierbase) -> None:
    db = f"pagila_{secrets.token_hex(3)}"
    got = platform.import_dump(str(PAGILA), "production", db)
    assert got["database"] == db
    prod = platform.branch_url("production", db, direct=True)
    tables = query(prod, "SELECT count(*) FROM information_schema.tables WHERE table_schema='public' "
                         "AND table_type='BASE TABLE'")
    assert tables[0][0] >= 15
    name = f"pg-{secrets.token_hex(3)}"
    platform.create_branch(name)
    try:
        platform.start_branch(name)
        branch = platform.branch_url(name, db, direct=True)
        assert query(branch, "SELECT count(*) FROM pg_views WHERE schemaname='public'") == \
            query(prod, "SELECT count(*) FROM pg_views WHERE schemaname='public'")
    finally:
        platform.delete_branch(name)


def test_import_errors_are_clear(platform: Tierbase, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        platform.import_dump(str(tmp_path / "missing.sql"))
    broken = tmp_path / "broken.sql"
    broken.write_text("CREATE TABLE ok_before (x int);\nCREATE TABLE oops (;\n")
    broken.chmod(0o644)
    db = f"broken_{secrets.token_hex(3)}"
    with pytest.raises(TierbaseError, match="syntax error"):
        platform.import_dump(str(broken), "production", db)
    # nothing half-made: the database created for the import is gone again
    prod = platform.branch_url("production", direct=True)
    assert query(prod, "SELECT count(*) FROM pg_database WHERE datname=%s", db) == [(0,)]
    query(prod, "CREATE TABLE IF NOT EXISTS import_target (x int)")
    broken.write_text("CREATE TABLE half_made (x int);\nSELECT 1/0;\n")
    with pytest.raises(TierbaseError, match="division by zero"):
        platform.import_dump(str(broken), "production", "postgres")
    assert query(prod, "SELECT to_regclass('half_made')") == [(None,)]
