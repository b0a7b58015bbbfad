"""The branch lifecycle under concurrency and crashes: its table, its locks, crash-safe audit, the repoint path.

Real platform (tests/conftest.py): real btrfs volumes, real postmasters, the service's own proxy in
this process. Crashes are real SIGKILLs of a child process (failpoints, see tests/test_reconcile.py);
tests/test_faults.py kills the real service at random moments instead.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.control.lifecycle import TRANSITIONS, State, TransitionError
from tierbase.control.store import Kind, Store, process_token, token_alive
from tierbase.proxy import ProxyThread
from tierbase.service import Service, make_proxy

from .conftest import free_port_base, make_home, needs_root_btrfs, query, teardown_platform
from .test_reconcile import die_at, volumes_of

pytestmark = needs_root_btrfs


def audit_since(tb: Tierbase, since: int, **match: str) -> list[dict[str, Any]]:
    rows = tb.gate.audit.after(since)
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def last_audit_id(tb: Tierbase) -> int:
    return int(tb.store.db.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0])


def after_of(rec: dict[str, Any]) -> Any:
    v = rec["after"]
    return json.loads(v) if isinstance(v, str) else v


# -- the table ----------------------------------------------------------------------------------
def test_the_table_allows_only_its_transitions(tmp_path: Path) -> None:
    assert TRANSITIONS[State.READY] == {State.RESETTING, State.DELETING}
    store = Store(tmp_path / "meta.db", default_port_base=42000)
    try:
        store.reserve(name="root", parent=None, kind=Kind.TIER, volume="root.1", creator="me", ttl_seconds=None,
                      protected=True)
        store.commit_created("root", None)
        store.reserve(name="kid", parent="root", kind=Kind.FEATURE, volume="kid.1", creator="me", ttl_seconds=None,
                      protected=False)
        with pytest.raises(TransitionError, match="still being created: it cannot reset"):
            store.begin_reset("kid", "kid.2", "me")
        with pytest.raises(TransitionError, match="still being created: it cannot delete"):
            store.mark_deleting(["kid"])
        with pytest.raises(TransitionError, match="cannot repoint"):
            store.set_route("r", "kid")
        store.commit_created("kid", None)
        with pytest.raises(TransitionError, match="ready and cannot become ready"):
            store.commit_created("kid", None)
        store.begin_reset("kid", "kid.2", "alice")
        kid = store.get("kid")
        assert kid.state is State.RESETTING and kid.actor == "alice" and kid.owner == process_token()
        with pytest.raises(TransitionError, match="being reset: it cannot reset"):
            store.begin_reset("kid", "kid.3", "bob")
        with pytest.raises(TransitionError, match="being reset: it cannot delete"):
            store.mark_deleting(["kid"])
        assert store.get("kid").state is State.RESETTING  # a refused change changes nothing
        assert store.swap_volume("kid", "kid.2", None) == "kid.1"
        kid = store.get("kid")
        assert (kid.state, kid.volume, kid.owner, kid.actor) == (State.READY, "kid.2", None, None)
        assert store.intents() == []
    finally:
        store.close()


def test_a_zombie_owner_is_dead() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        token = process_token(child.pid)
        assert token_alive(token)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert process_token(child.pid) == token  # same pid, same start time: only its state tells
        assert not token_alive(token)
    finally:
        child.wait()


# -- crash-safe audit -------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["delete", "reset"])
def test_an_effect_whose_outcome_record_was_lost_is_audited(platform: Tierbase, op: str) -> None:
    name = f"lost-{secrets.token_hex(3)}"
    platform.create_branch(name)
    volume, since = platform.store.get(name).volume, last_audit_id(platform)
    call = f"tb.delete_branch({name!r})" if op == "delete" else f"tb.reset_branch({name!r})"
    die_at(platform, "gate:acted", call)  # killed after the act, before its outcome record
    if op == "delete":
        assert platform.store.find(name) is None
    else:
        assert platform.store.get(name).volume != volume
    records = audit_since(platform, since, action=f"branch.{op}", target=name)
    assert [r["outcome"] for r in records] == ["intent"]
    assert after_of(records[0])["branch"] == name
    assert platform.audit_verify()["ok"] is True
    if op == "reset":
        platform.delete_branch(name)


def test_reconcile_audits_what_it_finishes_in_the_actors_name(platform: Tierbase) -> None:
    name = f"half-{secrets.token_hex(3)}"
    platform.create_branch(name)
    die_at(platform, "delete:marked", f"tb.delete_branch({name!r})")
    since = last_audit_id(platform)
    assert f"finished deleting {name!r}" in platform.reconcile()
    rec = audit_since(platform, since, action="branch.delete.reconcile", target=name)
    assert len(rec) == 1 and rec[0]["actor"] == "tierbase"
    assert after_of(rec[0])["original_actor"] == platform.gate.owner and after_of(rec[0])["result"] == "finished"
    assert platform.gate.owner in rec[0]["reason"]


def test_a_dead_reset_is_undone_and_audited(platform: Tierbase, branch: str) -> None:
    platform.start_branch(branch)
    query(platform.branch_url(branch, direct=True), "DELETE FROM seed WHERE id <= 10")
    die_at(platform, "reset:stopped", f"tb.reset_branch({branch!r})")  # stopped, not swapped
    assert platform.store.get(branch).state is State.RESETTING
    with pytest.raises(TransitionError, match="being reset"):  # nobody acts on it meanwhile
        platform.start_branch(branch)
    since = last_audit_id(platform)
    done = platform.reconcile()
    assert f"undid the unfinished reset of {branch!r}" in done
    assert platform.store.get(branch).state is State.READY and len(volumes_of(platform, branch)) == 1
    assert audit_since(platform, since, action="branch.reset.reconcile", target=branch)
    platform.start_branch(branch)  # its data from before the reset
    assert query(platform.branch_url(branch, direct=True), "SELECT count(*) FROM seed") == [(990,)]


# -- locks: reset against wake-ups ----------------------------------------------------------------------
def _postmasters_of(tb: Tierbase, name: str) -> set[str]:
    """Volumes of ``name`` that have a live postmaster."""
    out = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and "-D" in argv and argv[0].endswith("postgres"):
            vol = Path(argv[argv.index("-D") + 1]).name
            if vol.split(".")[0] == name and str(tb.home.root) in argv[argv.index("-D") + 1]:
                out.add(vol)
    return out


def test_wake_ups_during_resets_never_start_a_stale_volume(platform: Tierbase, branch: str) -> None:
    platform.start_branch(branch)
    url = platform.branch_url(branch)
    stop, errors, answered = threading.Event(), [], [0]
    stale: list[str] = []
    old_volumes: set[str] = set()

    def waker() -> None:  # connects again and again through the proxy: every connect may wake the compute
        while not stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=20) as conn:
                    conn.execute("SELECT 1")
                answered[0] += 1
            except psycopg.OperationalError as err:  # a reset ends the sessions on the old volume: 57P01
                if "57P01" not in str(getattr(err, "sqlstate", "")) and "terminat" not in str(err) \
                        and "closed" not in str(err) and "shut" not in str(err):
                    errors.append(str(err))

    def watcher() -> None:  # a postmaster on a volume the branch no longer has is the race
        while not stop.is_set():
            if bad := _postmasters_of(platform, branch) & old_volumes:
                stale.extend(bad)
            time.sleep(0.005)

    threads = [threading.Thread(target=waker) for _ in range(8)] + [threading.Thread(target=watcher)]
    for t in threads:
        t.start()
    try:
        for _ in range(6):
            platform.stop_branch(branch)  # so that the wake-ups race the reset's own start
            old = platform.store.get(branch).volume
            platform.reset_branch(branch)
            old_volumes.add(old)
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert stale == [] and errors == []
    assert answered[0] > 0
    assert _postmasters_of(platform, branch) <= {platform.store.get(branch).volume}
    assert volumes_of(platform, branch) == [platform.store.get(branch).volume]


# -- ports, sweep ---------------------------------------------------------------------------------------
def test_a_taken_port_is_replaced_and_recorded(platform: Tierbase, branch: str) -> None:
    port, since = platform.store.get(branch).port, last_audit_id(platform)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        platform.start_branch(branch)
    moved = platform.store.get(branch).port
    assert moved != port and platform.get_branch(branch)["compute"] == "running"
    rec = audit_since(platform, since, action="compute.port", target=branch)
    assert len(rec) == 1 and after_of(rec[0]) == {"port": moved}
    assert query(platform.branch_url(branch), "SELECT count(*) FROM seed") == [(1000,)]


def test_the_sweep_goes_past_a_branch_behind_a_route_and_audits(platform: Tierbase) -> None:
    routed, free = f"sw-a-{secrets.token_hex(3)}", f"sw-b-{secrets.token_hex(3)}"
    platform.create_branch(routed, ttl="1m")
    platform.create_branch(free, ttl="1m")
    route = f"swr-{secrets.token_hex(3)}"
    platform.set_route(route, routed)
    since = last_audit_id(platform)
    try:
        gone = platform.sweep(now=time.time() + 120)
        assert free in gone and routed not in gone
        assert platform.store.find(free) is None and platform.store.find(routed) is not None
        assert [r["outcome"] for r in audit_since(platform, since, action="branch.expire", target=free)] == \
            ["intent", "ok"]
        assert audit_since(platform, since, action="branch.expire", target=routed) == []
    finally:
        platform.set_route(route, "production")
        platform.delete_branch(routed)


# -- the one repoint path -----------------------------------------------------------------------------------
@pytest.fixture
def switched(platform: Tierbase) -> Iterator[tuple[Tierbase, ProxyThread]]:
    """A facade whose router is the service's switch, over a proxy of its own in this process."""
    t = ProxyThread(make_proxy(platform, port=0)).start()
    svc = Service.__new__(Service)  # only the parts switch() uses: the proxy and its loop
    svc.proxy, svc.loop = t.proxy, t.loop
    me = platform.as_principal(None, token=platform.home.token.read_text().strip())
    me.router = svc
    try:
        yield me, t
    finally:
        t.stop()


def _url(tb: Tierbase, t: ProxyThread, route: str) -> str:
    return tb.branch_url(route).replace(f":{tb.proxy_port}/", f":{t.proxy.port}/")


def _cluster(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_setting('cluster_name')").fetchone()
    assert row is not None
    return str(row[0]).removeprefix("tierbase-")


def test_repoint_ends_only_the_routes_sessions_and_a_drain_lets_new_ones_through(
        switched: tuple[Tierbase, ProxyThread], platform: Tierbase) -> None:
    me, t = switched
    a, b, route = f"rp-a-{secrets.token_hex(3)}", f"rp-b-{secrets.token_hex(3)}", f"rp-{secrets.token_hex(3)}"
    for n in (a, b):
        platform.create_branch(n, start=True)
    me.set_route(route, a)
    try:
        via_route = psycopg.connect(_url(me, t, route), autocommit=True)
        by_name = psycopg.connect(_url(me, t, a), autocommit=True)
        assert _cluster(via_route) == a and _cluster(by_name) == a
        out: dict[str, Any] = {}
        mover = threading.Thread(target=lambda: out.update(me.set_route(route, b, drain=5)))
        t0 = time.monotonic()
        mover.start()
        time.sleep(0.2)
        with psycopg.connect(_url(me, t, route), autocommit=True, connect_timeout=5) as fresh:
            assert _cluster(fresh) == b  # the drain does not make new connections wait
        assert time.monotonic() - t0 < 2.0
        assert _cluster(via_route) == a  # still draining: the old session may finish its work
        via_route.close()
        mover.join(10)
        assert out["sessions_ended"] == 0 and out["previous"] == a and time.monotonic() - t0 < 4.5
        assert _cluster(by_name) == a  # it came by the branch's own name: the route's move is not its business
        # without a drain the route's sessions on the old target end at once; others stay
        via_route = psycopg.connect(_url(me, t, route), autocommit=True)
        other = psycopg.connect(_url(me, t, b), autocommit=True)
        assert me.set_route(route, a)["sessions_ended"] == 1
        with pytest.raises(psycopg.OperationalError, match=f'now points to branch "{a}"'):
            via_route.execute("SELECT 1")
        assert _cluster(other) == b and _cluster(by_name) == a
        other.close()
        by_name.close()
        records = [r for r in me.audit_log(action="route.set", target=route)][-2:]
        assert [r["outcome"] for r in records] == ["intent", "ok"]
    finally:
        me.set_route(route, "production")
        for n in (a, b):
            platform.delete_branch(n)


def test_a_repoint_to_a_branch_being_reset_waits_for_it(platform: Tierbase, branch: str) -> None:
    route = f"rw-{secrets.token_hex(3)}"
    with platform.branches.lock(branch):  # what a reset holds from its check to its swap
        platform.store.begin_reset(branch, f"{branch}.fake", "tester")
        with pytest.raises(TransitionError, match="being reset: it cannot repoint"):
            platform.set_route(route, branch)
        platform.store.end_reset(branch, f"{branch}.fake")
    assert platform.store.routes().get(route) is None


# -- promotions at start-up ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def promo() -> Iterator[tuple[Tierbase, Path]]:
    """A platform of its own (its production's route moves): production with a table and a feature branch."""
    base = make_home()
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    tb = Tierbase(base / "home")
    (base / "mig").mkdir()
    try:
        tb.init(storage="btrfs", btrfs_size="3G")
        tb.start_branch("production")
        with psycopg.connect(tb.branches.provider.endpoint(tb.store.get("production").port).dsn(),
                             autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (id int)")
        tb.create_branch("feat")
        yield tb, base / "mig"
    finally:
        teardown_platform(tb, base)


@pytest.mark.parametrize(("point", "status"), [("promote:snapshot", "rolled-back"), ("promote:applied", "succeeded")])
def test_a_dead_promotion_is_rolled_back_or_completed_at_start_up(promo: tuple[Tierbase, Path], point: str,
                                                                   status: str) -> None:
    tb, mig = promo
    n = len(list(mig.glob("V*.sql"))) + 1
    (mig / f"V{n:04d}__m{n}.sql").write_text(f"CREATE TABLE m{n} (id int);\n")
    tb.migrate_apply("feat", str(mig))
    serving = str(tb.store.resolve_route("production"))
    die_at(tb, point, f"tb.promote('production', 'feat', {str(mig)!r})")
    running = [p for p in tb.promotions("production") if p["status"] == "running"]
    assert len(running) == 1
    since = last_audit_id(tb)
    done = tb.reconcile()
    pid = running[0]["id"]
    assert f"promotion #{pid} of 'production' (by {tb.gate.owner}): {status}" in done
    rec = tb.promotions("production")[-1]
    assert rec["id"] == pid and rec["status"] == status
    now = str(tb.store.resolve_route("production"))
    if status == "rolled-back":
        assert now == f"production-rb-{pid}" and rec["serving_now"] == now
        assert audit_since(tb, since, action="route.repoint", target="production")
    else:
        assert now == serving
    audited = audit_since(tb, since, action="promote.reconcile", target="production")
    assert len(audited) == 1 and after_of(audited[0])["original_actor"] == tb.gate.owner
    assert tb.audit_verify()["ok"] is True
    # the tier is not blocked: the next promotion runs (here: nothing left to promote, or the re-apply)
    tb.migrate_apply("feat", str(mig))
    if status == "rolled-back":
        assert tb.promote("production", "feat", str(mig))["status"] == "succeeded"


def test_the_idle_suspender_spares_a_branch_just_resolved(platform: Tierbase, branch: str) -> None:
    t = ProxyThread(make_proxy(platform, port=0)).start()
    try:
        svc = Service.__new__(Service)  # the parts suspend_idle uses
        svc.tb, svc.proxy, svc.idle_timeout = platform, t.proxy, 0.5
        # every other branch of the shared platform counts as busy: only this one may be suspended
        svc._busy_at = {b.name: time.monotonic() + 3600 for b in platform.store.all() if b.name != branch}
        svc.resolver = t.proxy.resolver  # type: ignore[assignment]
        platform.start_branch(branch)
        svc.suspend_idle()  # first sight: its idle clock starts now
        time.sleep(0.6)
        svc.resolver.touched[branch] = time.monotonic()  # a connection resolved it a moment ago (fast path)
        assert branch not in svc.suspend_idle()
        assert platform.get_branch(branch)["compute"] == "running"
        seen: list[bool] = []
        real = platform.branches.suspend

        def spy(name: str, idle: Any) -> bool:  # what a resolution sees while the suspender decides
            def watched(b: Any) -> bool:
                verdict = bool(idle(b))
                seen.append(name in svc.resolver.stopping)
                return verdict
            return real(name, watched)

        platform.branches.suspend = spy  # type: ignore[method-assign]
        try:
            time.sleep(0.6)
            assert branch in svc.suspend_idle()
        finally:
            del platform.branches.suspend
        assert True in seen and branch not in svc.resolver.stopping  # announced while deciding, then cleared
        assert platform.get_branch(branch)["compute"] == "stopped"
        # the next connection wakes it through the locked path
        assert query(_url(platform, t, branch), "SELECT count(*) FROM seed") == [(1000,)]
    finally:
        t.stop()
