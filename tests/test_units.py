"""Pure units: names, durations, error envelopes, the metadata store, the fake driver."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tierbase.compute import compute_user
from tierbase.control.store import Kind, Store, process_token, token_alive
from tierbase.errors import (
    BranchNotFound,
    InvalidInput,
    InvalidName,
    PolicyDenied,
    Refused,
    TierbaseError,
    error_from_dict,
)
from tierbase.names import check_name, format_duration, parse_ttl
from tierbase.storage.base import Source
from tierbase.storage.btrfs import parse_size
from tierbase.storage.fake import FakeDriver


@pytest.mark.parametrize("good", ["a", "production", "feature-42", "x" * 63, "0day"])
def test_good_names(good: str) -> None:
    assert check_name(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 64, "A", "a_b", "a/b", "..", "-x", "a b", "a\n", "ü"])
def test_bad_names_cite_the_rule(bad: str) -> None:
    with pytest.raises(InvalidName) as exc:
        check_name(bad)
    assert "1-63 characters" in str(exc.value) and exc.value.exit_code == 1


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800),
                                               ("2w", 1209600), ("1h30m", 5400), (" 5M ", 300)])
def test_ttls(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("bad", ["", "0s", "7", "d", "7 d", "-1h", "1y", "1h-", "soon"])
def test_bad_ttls(bad: str) -> None:
    with pytest.raises(InvalidInput, match="does not parse"):
        parse_ttl(bad)


def test_format_duration() -> None:
    assert format_duration(5) == "5s"
    assert format_duration(3600 * 26) == "1d 2h"
    assert format_duration(-3) == "0s"


def test_sizes() -> None:
    assert parse_size("20G") == 20 * 1024 ** 3
    assert parse_size("512m") == 512 * 1024 ** 2
    with pytest.raises(Exception, match="does not parse"):
        parse_size("big")


def test_errors_round_trip_through_the_api_envelope() -> None:
    err = error_from_dict(PolicyDenied("promote", "production", "agents cannot promote").to_dict())
    assert isinstance(err, PolicyDenied) and isinstance(err, Refused) and err.exit_code == 2
    assert err.data["reason"] == "agents cannot promote"
    assert isinstance(error_from_dict(BranchNotFound("x").to_dict()), BranchNotFound)


def test_process_tokens() -> None:
    me = process_token()
    assert token_alive(me)
    assert not token_alive(f"{os.getpid()}:1")  # same pid, other start time: a reused pid
    assert not token_alive(None)


def test_store_reservation_rules(tmp_path: Path) -> None:
    store = Store(tmp_path / "meta.db", default_port_base=41000)
    try:
        root = store.reserve(name="root", parent=None, kind=Kind.TIER, volume="root.1", creator="me",
                             ttl_seconds=None, protected=True)
        store.commit_created("root", None)
        child = store.reserve(name="kid", parent="root", kind=Kind.FEATURE, volume="kid.1", creator="me",
                              ttl_seconds=60, protected=False)
        assert child.port != root.port and child.expires_at is not None
        with pytest.raises(TierbaseError, match=r"is creating"):
            store.reserve(name="grandkid", parent="kid", kind=Kind.FEATURE, volume="g.1", creator="me",
                          ttl_seconds=None, protected=False)
        with pytest.raises(BranchNotFound):
            store.reserve(name="x", parent="nope", kind=Kind.FEATURE, volume="x.1", creator="me",
                          ttl_seconds=None, protected=False)
        assert store.resolve_route("kid") == "kid" and store.resolve_route("nope") is None
        store.set_route("prod", "root")
        assert store.resolve_route("prod") == "root"
    finally:
        store.close()


def test_fake_driver_clones_directories(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path / "volumes", compute_user())
    driver.prepare()
    src = driver.create("a.1")
    (src / "f").write_text("hello")
    driver.clone(Source("a.1"), "b.1")
    (driver.path("b.1") / "f").write_text("changed")
    assert (src / "f").read_text() == "hello"
    assert driver.volumes() == ["a.1", "b.1"]
    driver.delete("b.1")
    driver.delete("b.1")  # idempotent
    assert driver.volumes() == ["a.1"]


def test_foreign_errors_get_the_envelope_with_what_to_do() -> None:
    import errno

    import psycopg

    from tierbase.errors import ComputeBusy, DiskFull, TierbaseError, translate

    full = translate(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, DiskFull) and full.http_status == 507 and full.hint
    assert isinstance(translate(psycopg.errors.DiskFull("could not extend file")), DiskFull)
    busy = translate(psycopg.OperationalError("FATAL:  the database system is in recovery mode"))
    assert isinstance(busy, ComputeBusy) and busy.http_status == 503 and "Retry" in busy.hint
    other = translate(RuntimeError("boom"))
    assert type(other) is TierbaseError and "RuntimeError" in other.message and other.hint
    assert other.to_dict()["code"] and other.to_dict()["hint"]
    mine = TierbaseError("x", "y")
    assert translate(mine) is mine


@pytest.mark.parametrize("feature", ["items", "split-code", "x" * 63, "0day"])
def test_the_hooks_and_the_flow_pair_git_and_database_branches_alike(feature: str) -> None:
    from tierbase.git import db_branch_for, feature_git_branch

    assert feature_git_branch(feature) == f"feature/{feature}"
    assert db_branch_for(feature_git_branch(feature)) == feature
    assert db_branch_for("fix/Inventory_Split") == "inventory-split"  # other prefixes: normalised
