"""The inventory app's database tests: run against any branch via DATABASE_URL."""

from __future__ import annotations

import os

import psycopg
import pytest


@pytest.fixture
def conn():
    url = os.environ.get("DATABASE_URL")
    if not url:
        pytest.skip("DATABASE_URL is not set: run through `tierbase` or export it")
    with psycopg.connect(url, autocommit=True) as c:
        yield c


def test_every_code_is_split_or_rejected(conn) -> None:
    left = conn.execute(
        "SELECT count(*) FROM inventory WHERE location_code IS NULL "
        "AND id NOT IN (SELECT inventory_id FROM inventory_code_rejects)").fetchone()[0]
    assert left == 0


def test_split_columns_have_the_expected_shape(conn) -> None:
    bad = conn.execute(
        "SELECT count(*) FROM inventory WHERE location_code IS NOT NULL AND NOT ("
        "location_code ~ '^W[0-9]{2}$' AND batch_number BETWEEN 1 AND 9999 AND serial_number > 0)").fetchone()[0]
    assert bad == 0


def test_rejects_say_why(conn) -> None:
    assert conn.execute("SELECT count(*) FROM inventory_code_rejects WHERE reason = ''").fetchone()[0] == 0


def test_quantities_are_never_negative(conn) -> None:
    assert conn.execute("SELECT count(*) FROM inventory WHERE quantity < 0").fetchone()[0] == 0
