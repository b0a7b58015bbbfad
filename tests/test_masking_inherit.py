"""Masking declared in tierbase.toml, applied by the platform at branch creation and inherited by every descendant."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.errors import InvalidInput, Refused

from .conftest import as_, needs_root_btrfs, query
from .shop import shop_platform
from .test_masking import PAGILA

pytestmark = [needs_root_btrfs,
              pytest.mark.skipif(not PAGILA.exists(), reason=f"the pagila fixture is not at {PAGILA}")]

CONFIG = """
[project]
database = "shop"

[tiers.production]
protected = true
sensitive = true

[tiers.staging]
parent = "production"
entry = true

[tiers.qa]
parent = "staging"
masked = true

[masking]
customer.email = "email"
customer.first_name = "hash"
customer.last_name = "hash"
"address.phone" = "partial"
"payment.amount" = "noise"
"""


@pytest.fixture(scope="module")
def shop() -> Iterator[tuple[Tierbase, Path]]:
    with shop_platform(CONFIG, seed_as_superuser=False) as got:
        yield got.tb, got.base


def values(url: str, sql: str) -> set[object]:
    return {r[0] for r in query(url, sql)}


ORIGINALS = {
    "email": "SELECT email FROM customer", "first": "SELECT first_name FROM customer",
    "last": "SELECT last_name FROM customer", "phone": "SELECT phone FROM address",
}


def test_masking_is_applied_at_creation_and_inherited_two_levels_down(shop: tuple[Tierbase, Path]) -> None:
    tb, _ = shop
    prod = tb.branch_url("production", "shop", direct=True)
    originals = {k: values(prod, q) for k, q in ORIGINALS.items()}
    # staging was created by the platform engineer (unmasked-read grant): same data as production
    assert not tb.get_branch("staging")["masked"]
    # qa is declared masked
    qa = tb.get_branch("qa")
    assert qa["masked"] and "customer.email=email" in qa["masking"]
    dev = as_(tb, "dev")
    child = dev.create_branch("dev-work")  # from staging (entry): sensitive lineage, no grant -> masked
    assert child["masked"] and sorted(child["masking"]) == sorted(
        ["address.phone=partial", "customer.email=email", "customer.first_name=hash", "customer.last_name=hash",
         "payment.amount=noise"])
    grandchild = dev.create_branch("dev-work-2", "dev-work")
    assert grandchild["masked"] and grandchild["masking"] == child["masking"]
    # a masked branch is never the source of an unmasked one, whoever creates it
    owner_child = tb.create_branch("pe-from-masked", "dev-work")
    assert owner_child["masked"]
    for name in ("qa", "dev-work", "dev-work-2", "pe-from-masked"):
        url = tb.branch_url(name, "shop", direct=True)
        for what, q in ORIGINALS.items():
            assert values(url, q).isdisjoint(originals[what] - {None, ""}), (name, what)
        # joins and constraints still hold
        assert query(url, "SELECT count(*) FROM customer c JOIN address a USING (address_id)") == \
            query(prod, "SELECT count(*) FROM customer c JOIN address a USING (address_id)")
        assert query(url, "SELECT count(*) FROM payment WHERE amount < 0") == [(0,)]
        assert query(url, "SELECT count(*) - count(DISTINCT email) FROM customer") == [(0,)]
    # inheritance through two levels kept the same masked values (deterministic, not masked twice)
    assert values(tb.branch_url("dev-work", "shop", direct=True), ORIGINALS["email"]) == \
        values(tb.branch_url("dev-work-2", "shop", direct=True), ORIGINALS["email"])
    # production is untouched
    assert values(prod, ORIGINALS["email"]) == originals["email"]


def test_masked_branch_owner_gets_no_superuser(shop: tuple[Tierbase, Path]) -> None:
    tb, _ = shop
    dev = as_(tb, "dev")
    url = dev.branch_url("dev-work", "shop")
    assert url.startswith("postgresql://dev:")
    query(url, "UPDATE customer SET active = 0 WHERE customer_id = 1")  # reads and writes its data
    assert query(url, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [(False,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(url, "SELECT pg_read_binary_file('global/pg_control')")


def test_reset_of_a_masked_branch_is_masked_again(shop: tuple[Tierbase, Path]) -> None:
    tb, _ = shop
    prod = tb.branch_url("production", "shop", direct=True)
    info = as_(tb, "dev").reset_branch("dev-work-2")
    assert info["masked"]
    url = tb.branch_url("dev-work-2", "shop", direct=True)
    assert values(url, ORIGINALS["email"]).isdisjoint(values(prod, ORIGINALS["email"]))


def test_unmasked_snapshots_of_sensitive_data_are_refused(shop: tuple[Tierbase, Path]) -> None:
    tb, _ = shop
    with pytest.raises(Refused, match="snapshot of it would be unmasked"):
        as_(tb, "dev").create_branch("dev-snap", "staging", snapshot=True)
    assert tb.store.find("dev-snap") is None


def test_rules_for_unknown_columns_are_refused_at_load(shop: tuple[Tierbase, Path]) -> None:
    tb, base = shop
    before = tb.config.digest
    bad = base / "bad.toml"
    bad.write_text(CONFIG.replace('customer.email = "email"', 'customer.emial = "email"'))
    with pytest.raises(InvalidInput, match=r"masking\.customer\.emial"):
        tb.reload_config(str(bad))
    bad.write_text(CONFIG.replace('customer.email = "email"', 'customer.email = "scramble"'))
    with pytest.raises(InvalidInput, match=r"customer\.email"):
        tb.reload_config(str(bad))
    assert tb.config.digest == before
