"""Many concurrent API callers on the same branches (issue 11): a real `tierbase up`, 50 threads creating,
resetting, deleting, starting and connecting to six shared branches through the SDK and the proxy.

Every answer is a success or a documented refusal (never a 500), and afterwards the platform is
consistent: every branch ready, no orphan or missing volume, one postmaster per running branch on
its current volume, and the audit chain verifies.
"""

from __future__ import annotations

import random
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.api.client import Client
from tierbase.errors import TierbaseError

from .conftest import free_port, make_home, needs_root_btrfs
from .test_cli import as_json, leftovers, new_env, tierbase

pytestmark = needs_root_btrfs

SHARED = [f"s{i}" for i in range(6)]  # 50 callers on 6 branches: most calls race another
THREADS, OPS = 50, 4  # the 50 concurrent callers, 200 calls in all
#: what the API documents for a request that races another one on the same branch
REFUSALS = {"branch_busy", "branch_exists", "branch_not_found", "refused", "compute_busy"}
#: what a session may hear when another caller resets, deletes or starts its branch meanwhile
SESSION_ENDED = {None, "57P01", "57P02", "57P03", "3D000"}
#: deletes are rarer than the rest, so that the branches exist most of the time
WEIGHTED = ["create", "create", "delete", "reset", "reset", "start", "connect", "connect", "connect"]


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    home = make_home() / "home"
    e = new_env(home)
    try:
        as_json(e, "up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        e["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        yield e
    finally:
        tierbase(e, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


def test_concurrent_callers_get_answers_or_documented_refusals(env: dict[str, str]) -> None:
    home = Path(env["TIERBASE_HOME"])
    sdk = Client(home, token=env["TIERBASE_TOKEN"])
    with psycopg.connect(sdk.branch_url("production"), autocommit=True) as conn:
        conn.execute("CREATE TABLE seed_c (id int)")
        conn.execute("INSERT INTO seed_c VALUES (1), (2), (3)")
    for name in SHARED:
        sdk.create_branch(name, "production")
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(THREADS)

    def note(op: str, err: BaseException | None) -> None:
        with lock:
            if err is None:
                outcomes[f"{op}: ok"] += 1
            elif isinstance(err, TierbaseError) and err.code in REFUSALS:
                outcomes[f"{op}: {err.code}"] += 1
            elif isinstance(err, psycopg.Error) and getattr(err, "sqlstate", None) in SESSION_ENDED:
                outcomes[f"{op}: session {getattr(err, 'sqlstate', None)}"] += 1
            else:
                unexpected.append(f"{op}: {type(err).__name__} {getattr(err, 'code', '')} {err}")

    def connect(c: Client, name: str) -> None:
        with psycopg.connect(c.branch_url(name), autocommit=True, connect_timeout=60) as conn:
            assert conn.execute("SELECT count(*) FROM seed_c").fetchone() == (3,)

    def caller(i: int) -> None:
        rng = random.Random(i)
        c = Client(home, token=env["TIERBASE_TOKEN"])
        ops: dict[str, Any] = {
            "create": lambda n: c.create_branch(n, "production", start=rng.random() < 0.5),
            "delete": lambda n: c.delete_branch(n),
            "reset": lambda n: c.reset_branch(n),
            "start": lambda n: c.start_branch(n),
            "connect": lambda n: connect(c, n),
        }
        go.wait()
        for _ in range(OPS):
            op = rng.choice(WEIGHTED)
            try:
                ops[op](rng.choice(SHARED))
            except Exception as err:  # every outcome is sorted: success, documented refusal, or a failure
                note(op, err)
            else:
                note(op, None)
        c.close()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads)
    assert unexpected == [], unexpected
    assert sum(outcomes.values()) == THREADS * OPS
    # How many calls succeed depends on how often a delete wins a race (46 to 70 of 200 seen on 2
    # cores): the guard is that a real share got through and every kind of call succeeded at least once.
    assert sum(v for k, v in outcomes.items() if k.endswith(": ok")) >= THREADS * OPS // 8, outcomes
    assert all(outcomes[f"{op}: ok"] for op in ("create", "delete", "reset", "connect")), outcomes

    # consistent afterwards (read while the service runs, as an operator would)
    tb = Tierbase(home)
    try:
        branches = tb.store.all()
        assert [b.name for b in branches if b.state.value != "ready"] == []
        volumes, referenced = set(tb.driver.volumes()), {b.volume for b in branches}
        assert volumes == referenced, (volumes - referenced, referenced - volumes)
        current = {str(tb.branches.provider.datadir(b.volume)) for b in branches}
        postmasters = _postmasters(home)
        assert set(postmasters) <= current and len(postmasters) == len(set(postmasters)), postmasters
    finally:
        tb.close()
    assert as_json(env, "audit", "verify")["ok"] is True
    for name in SHARED:  # every survivor still works
        if any(b["name"] == name for b in sdk.list_branches(with_bytes=False)):
            connect(sdk, name)
    sdk.close()


def _postmasters(home: Path) -> list[str]:
    from bench.faults import _postmasters as postmasters

    return postmasters(home)
