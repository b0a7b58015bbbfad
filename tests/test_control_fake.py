"""The control plane on a FakeProvider: no root, no btrfs, no postgres, seconds for the file.

The facade, the real SQLite store, the real gate (policy + audit chain) and the real locks run
as in production; only the substrate below the provider boundary is the fake one (directories
for volumes, pretend processes for computes). Crashes are real: a forked child runs an operation
and SIGKILLs itself at a named failpoint, then reconcile repairs what it left. The storage layer
and postgres are tested for real in test_branches, test_reconcile and test_lifecycle.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tierbase import Tierbase
from tierbase.control.lifecycle import State, TransitionError
from tierbase.errors import NotSupported, PolicyDenied, Refused, StorageError, TierbaseError
from tierbase.provider import FakeProvider, ForkPoint
from tierbase.workflow.history import FlowHistory

from .conftest import free_port_base

TOPOLOGY = """
[tiers.production]
protected = true

[tiers.staging]
parent = "production"
protected = true
entry = true
"""


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tierbase]:
    monkeypatch.setenv("TIERBASE_PORT_BASE", str(free_port_base()))
    monkeypatch.delenv("TIERBASE_FAILPOINTS", raising=False)
    home = Path(tempfile.mkdtemp(prefix="tierbase-fake-")) / "home"
    tb = Tierbase(home, provider=FakeProvider(home))
    tb.init()
    try:
        yield tb
    finally:
        tb.close()
        shutil.rmtree(home.parent, ignore_errors=True)


def provider(tb: Tierbase) -> FakeProvider:
    p = tb.provider
    assert isinstance(p, FakeProvider)
    return p


def die_at(tb: Tierbase, point: str, op: Callable[[Tierbase], Any]) -> None:
    """Run ``op`` on a new facade over the same data dir in a forked child that SIGKILLs itself at
    failpoint ``point``: its intents stay behind with a dead owner, as after a real crash."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.environ["TIERBASE_FAILPOINTS"] = point
            op(Tierbase(tb.home.root, actor=tb.actor, provider=FakeProvider(tb.home.root)))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with {status}"


def volumes_of(tb: Tierbase, name: str) -> list[str]:
    return [v for v in tb.provider.volumes() if v.split(".")[0] == name]


def audited(tb: Tierbase, action: str, target: str) -> list[dict[str, Any]]:
    return tb.gate.audit.query(action=action, target=target)


def unique(prefix: str = "b") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


# -- reconcile and repair ---------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["create:reserved", "create:cloned"])
def test_a_crashed_create_is_undone_and_audited_for_its_actor(fake: Tierbase, point: str) -> None:
    name = unique()
    die_at(fake, point, lambda tb: tb.create_branch(name, "production"))
    half = fake.store.get(name)
    assert half.state is State.CREATING
    done = fake.reconcile()
    assert f"undid the unfinished creation of {name!r}" in done
    assert fake.store.find(name) is None and volumes_of(fake, name) == []
    (rec,) = audited(fake, "branch.create.reconcile", name)
    assert rec["actor"] == "tierbase" and rec["after"]["original_actor"] == fake.gate.owner
    assert fake.create_branch(name, "production")["state"] == "ready"  # the name is free again


@pytest.mark.parametrize("point", ["delete:marked", "delete:volume-gone"])
def test_a_crashed_delete_is_finished_leaves_first(fake: Tierbase, point: str) -> None:
    name = unique()
    fake.create_branch(name, "production")
    fake.create_branch(f"{name}-kid", name, start=True)
    die_at(fake, point, lambda tb: tb.delete_branch(name, recursive=True))
    assert fake.store.get(name).state is State.DELETING
    done = fake.reconcile()
    assert f"finished deleting {name!r}" in done
    assert fake.store.find(name) is None and fake.store.find(f"{name}-kid") is None
    assert volumes_of(fake, name) == [] and volumes_of(fake, f"{name}-kid") == []
    assert audited(fake, "branch.delete.reconcile", name)


@pytest.mark.parametrize("point", ["reset:cloned", "reset:stopped", "reset:swapped"])
def test_a_crashed_reset_leaves_one_volume_the_branch_uses(fake: Tierbase, point: str) -> None:
    name = unique()
    fake.create_branch(name, "production")
    before = fake.store.get(name).volume
    die_at(fake, point, lambda tb: tb.reset_branch(name))
    fake.reconcile()
    b = fake.store.get(name)
    assert b.state is State.READY
    assert volumes_of(fake, name) == [b.volume]
    assert fake.store.intents() == []
    # before the swap the branch keeps its data; after it, the new volume is the branch's
    assert (b.volume == before) is (point != "reset:swapped")
    assert fake.reset_branch(name)["state"] == "ready"  # and it can be reset again


def test_reconcile_removes_orphan_volumes_only(fake: Tierbase) -> None:
    name = unique()
    fake.create_branch(name, "production")
    provider(fake).driver.create("stray.0badc0de")
    done = fake.reconcile()
    assert "removed orphan volume 'stray.0badc0de'" in done
    assert "stray.0badc0de" not in fake.provider.volumes()
    assert {b.volume for b in fake.store.all()} <= set(fake.provider.volumes())
    assert fake.reconcile() == []  # nothing left to do


def test_a_live_operation_of_another_process_is_left_alone(fake: Tierbase) -> None:
    name = unique()
    fake.store.reserve(name=name, parent="production", kind=fake.store.get("production").kind, volume=f"{name}.1",
                       creator="someone", ttl_seconds=None, protected=False)  # owned by this live process
    assert fake.reconcile() == []
    assert fake.store.get(name).state is State.CREATING


# -- the lifecycle table and undo paths --------------------------------------------------------------
def test_a_branch_in_the_middle_of_an_operation_refuses_others_until_repaired(fake: Tierbase) -> None:
    name = unique()
    fake.create_branch(name, "production")
    die_at(fake, "reset:cloned", lambda tb: tb.reset_branch(name))
    assert fake.store.get(name).state is State.RESETTING
    for op in (fake.start_branch, fake.reset_branch, fake.delete_branch):
        with pytest.raises(TransitionError, match="being reset"):
            op(name)
    with pytest.raises(TierbaseError, match="is resetting"):
        fake.create_branch(unique(), name)
    assert fake.store.get(name).state is State.RESETTING  # a refused operation changed nothing
    fake.reconcile()
    assert fake.start_branch(name)["compute"] == "running"


def test_a_failed_fork_leaves_nothing_half_made_and_is_audited(fake: Tierbase) -> None:
    name = unique()
    volumes = fake.provider.volumes()
    provider(fake).fail("fork")
    with pytest.raises(StorageError, match="told to fail fork"):
        fake.create_branch(name, "production")
    assert fake.store.find(name) is None and fake.provider.volumes() == volumes
    (rec,) = [r for r in audited(fake, "branch.create", "production") if r["outcome"].startswith("error")]
    assert "told to fail fork" in rec["outcome"]


def test_a_reset_whose_stop_fails_keeps_the_old_data(fake: Tierbase) -> None:
    name = unique()
    fake.create_branch(name, "production", start=True)
    b = fake.store.get(name)
    provider(fake).fail("stop")
    with pytest.raises(StorageError):
        fake.reset_branch(name)
    after = fake.store.get(name)
    assert (after.state, after.volume) == (State.READY, b.volume)
    assert volumes_of(fake, name) == [b.volume] and fake.store.intents() == []


def test_start_stop_and_reset_keep_name_port_and_running_state(fake: Tierbase) -> None:
    name = unique()
    info = fake.create_branch(name, "production", start=True)
    assert info["compute"] == "running" and info["driver"] == "fake"
    again = fake.reset_branch(name)
    assert (again["port"], again["compute"]) == (info["port"], "running")
    assert again["fork_lsn"] != info["fork_lsn"]
    assert fake.stop_branch(name)["compute"] == "stopped"
    assert fake.status()["computes_running"] == 0


def test_the_sweep_deletes_expired_branches_children_first_and_audits(fake: Tierbase) -> None:
    parent, kid, keep = unique("ttl"), unique("ttl"), unique("keep")
    fake.create_branch(parent, "production", ttl="1m")
    fake.create_branch(kid, parent, ttl="1m")
    fake.create_branch(keep, "production")
    gone = fake.sweep(now=time.time() + 3600)
    assert gone == [kid, parent]
    assert fake.store.find(keep) is not None
    assert [r["outcome"] for r in audited(fake, "branch.expire", parent)] == ["intent", "ok"]


def test_branching_at_a_point_in_time_is_refused_plainly(fake: Tierbase) -> None:
    p = fake.store.get("production")
    with pytest.raises(NotSupported, match="cannot branch 'production' at LSN 0/1"):
        fake.provider.fork("production", p.volume, p.port, "x.1", at=ForkPoint(lsn="0/1"))
    assert "x.1" not in fake.provider.volumes()


# -- policy on lineage ---------------------------------------------------------------------------------
@pytest.fixture
def tiers(fake: Tierbase) -> Iterator[Tierbase]:
    path = fake.home.root.parent / "tierbase.toml"
    path.write_text(TOPOLOGY)
    fake.reload_config(path)
    yield fake


def test_an_agent_cannot_branch_what_descends_from_a_protected_tier(tiers: Tierbase) -> None:
    tiers.create_principal("bot", "agent")
    bot = tiers.as_principal("bot")
    snap, kid = unique("snap"), unique("kid")
    tiers.create_branch(snap, "production", snapshot=True)  # the platform engineer may
    tiers.create_branch(kid, snap)
    for parent in ("production", snap, kid):  # names do not count: all hold production's data
        with pytest.raises(PolicyDenied, match="agents cannot create branches off") as err:
            bot.create_branch(unique("mine"), parent)
        assert err.value.data["rule"] == "builtin.agent-no-branch-off-protected"
        assert tiers.gate.audit.query(actor="bot", action="branch.create", target=parent)[-1]["decision"] == "denied"
    mine = unique("mine")
    assert bot.create_branch(mine)["parent"] == "staging"  # the entry tier is theirs to branch
    assert bot.reset_branch(mine)["state"] == "ready"  # and what they made, theirs to change


def test_protected_tiers_cannot_be_deleted_or_reset_by_anyone(tiers: Tierbase) -> None:
    for op in (tiers.delete_branch, tiers.reset_branch):
        with pytest.raises(Refused, match="protected"):
            op("staging")
    assert tiers.store.get("staging").state is State.READY


def test_a_developer_cannot_touch_another_principals_branch(tiers: Tierbase) -> None:
    tiers.create_principal("dev", "developer")
    theirs = unique("theirs")
    tiers.create_branch(theirs)
    with pytest.raises(PolicyDenied):
        tiers.as_principal("dev").delete_branch(theirs)
    assert tiers.store.find(theirs) is not None


# -- workflow history on the real store -------------------------------------------------------------
def test_the_flow_history_takes_only_the_tables_transitions(fake: Tierbase) -> None:
    history = FlowHistory(fake.store)
    feature = unique("feat")
    with pytest.raises(Refused, match="not a transition from nothing to ci-green"):
        history.record(feature, "ci", "ci-green", "bot", {})
    first = history.record(feature, "claim", "feature-claimed", "bot", {"branch": feature})
    with pytest.raises(Refused, match="refuses skipped gates"):
        history.record(feature, "merge", "merged", "bot", {})
    refused = history.record(feature, "merge-refused", "feature-claimed", "bot", {"why": "no ci"})
    assert refused["state"] == "feature-claimed" and refused["digest"] != first["digest"]
    with pytest.raises(Refused, match="cannot change the state"):
        history.record(feature, "merge-refused", "merged", "bot", {})
    for transition, state in (("ready", "pr-ready"), ("ci", "ci-green"), ("merge", "merged")):
        summary = history.record(feature, transition, state, "bot", {})
    assert summary["state"] == "merged"
    assert [e["transition"] for e in FlowHistory(fake.store).events(feature)] == [
        "claim", "merge-refused", "ready", "ci", "merge"]
