"""Fault harness: kill -9 of the service at random moments, then restart it and check the platform.

One real platform (btrfs loop mount, real postgres), its service started as
`tierbase up` starts it (``python -m tierbase.service HOME``). A writer with
its own principal inserts into production through the proxy for the whole run
and remembers every row whose commit was acknowledged. Each trial picks an
operation (create / delete / reset / promote / rollback through the API, or a
kill -9 of production's compute under the writer's load), SIGKILLs the service
after a random delay (not at failpoints: anywhere in the operation), sometimes
restarts it before the dead one is reaped (a zombie owner), waits for the new
service (its start-up reconciles), then checks:

    unsettled        every branch is ready (no creating/resetting/deleting left)
    orphan_volume    every subvolume belongs to a branch
    missing_volume   every branch has its subvolume
    stray_postgres   every postmaster of this data dir serves a branch's current volume, one per branch
    promotion        no promotion is left running
    rows_kept        every acknowledged row is on production or on a branch production's route left
    routes           production answers through the proxy as the writer; every route names a ready branch
    audited          every change of a branch, route, port or promotion since the trial began has a record
    audit_verify     `audit verify` is ok (chain, anchored head, mirror)
    writer           the writer commits again within 30 s of the restart (or of the compute's kill)

    python bench/faults.py --trials 100 --out bench/results/faults.json --doc docs/reliability.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, log  # noqa: E402
from tierbase import Tierbase  # noqa: E402
from tierbase.compute import compute_user  # noqa: E402
from tierbase.control.store import Kind  # noqa: E402
from tierbase.governance.principals import db_password  # noqa: E402
from tierbase.home import Home  # noqa: E402
from tierbase.launch import service_env, service_python  # noqa: E402

CHECKS = ("unsettled", "orphan_volume", "missing_volume", "stray_postgres", "promotion", "rows_kept", "routes",
          "audited", "audit_verify", "writer")
OPS = ("create", "delete", "reset", "promote", "rollback", "compute")
#: how long each operation usually takes here (s, measured on this 2-core machine with small tables): kills land
#: uniformly in [0, 1.3 x this], so that most of them hit the operation itself and some land just after it
SPAN = {"create": 0.45, "delete": 0.25, "reset": 0.6, "promote": 0.35, "rollback": 0.6}


class Writer(threading.Thread):
    """Inserts into production through the proxy with its own principal's credentials, all run long."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="writer")
        self.url = url
        self.acked: set[int] = set()
        self.last_ack = time.monotonic()
        self.errors = 0
        self._next = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    while not self._halt.is_set():
                        self._next += 1
                        n = self._next
                        conn.execute("INSERT INTO faults_log(id) VALUES (%s)", (n,))
                        with self._lock:  # acknowledged: it must survive whatever happens next
                            self.acked.add(n)
                            self.last_ack = time.monotonic()
                        time.sleep(0.01)
            except psycopg.Error:
                self.errors += 1
                time.sleep(0.1)

    def snapshot(self) -> set[int]:
        with self._lock:
            return set(self.acked)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@dataclass
class Trial:
    n: int
    op: str
    delay: float
    killed_during: bool = False
    zombie: bool = False
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class Harness:
    def __init__(self, base: Path, seed: int, say: bool = True) -> None:
        self.base = base
        self.home = base / "home"
        self.migrations = base / "migrations"
        self.rng = random.Random(seed)
        self.say = say
        self.env = dict(os.environ, TIERBASE_HOME=str(self.home), PYTHONPATH=str(ROOT),
                        TIERBASE_SWEEP_INTERVAL="3600")
        self.proc: subprocess.Popen[bytes] | None = None
        self.zombies: list[subprocess.Popen[bytes]] = []
        self.tb: Tierbase | None = None
        self.features: list[str] = []
        self.made = 0
        self.version = 0
        self.replaced_seen: dict[str, set[int]] = {}  # branches production's route left: their rows, read once
        self.writer: Writer | None = None

    # -- the platform ---------------------------------------------------------------
    def setup(self) -> None:
        base = str(20000 + self.rng.randrange(20) * 500)  # computes' ports stay below the ephemeral range
        os.environ["TIERBASE_PORT_BASE"] = self.env["TIERBASE_PORT_BASE"] = base
        self.migrations.mkdir(parents=True)
        tb = Tierbase(self.home)
        tb.init(storage="btrfs", btrfs_size="6G", api_port=free_port(), proxy_port=free_port())
        writer_token = str(tb.create_principal("writer", "platform-engineer")["token"])
        self.owner_token = tb.home.token.read_text().strip()
        self.tb = tb
        self.start_service()
        self.api("POST", "/v1/branches/production/start")
        direct = self.tb.branches.provider.endpoint(self.tb.store.get("production").port)
        with psycopg.connect(direct.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE faults_log (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
            conn.execute("ALTER TABLE faults_log OWNER TO tb_owner")
        self.api("POST", "/v1/branches", json={"name": "feat", "parent": "production"})  # promotions come from it
        url = f"postgresql://writer:{db_password(writer_token)}@127.0.0.1:{tb.proxy_port}/production"
        self.writer = Writer(url)
        self.writer.start()
        self.wait_writer(30)

    def start_service(self) -> None:
        # as `tierbase up` starts it: the data dir handed to the compute user, the service run as that user
        # (kept as a Popen of ours, so that a killed one can be left unreaped: a zombie owner)
        user = compute_user()
        Home(self.home).hand_over(user)
        python = service_python()
        env = {**service_env(user, python), **{k: v for k, v in self.env.items() if k.startswith("TIERBASE_")}}
        env["PYTHONPATH"] = self.env["PYTHONPATH"]
        log_file = open(self.home / "service.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([python, "-m", "tierbase.service", str(self.home)], env=env, cwd="/",
                                     stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                     **user.run_kwargs())  # type: ignore[call-overload]
        log_file.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                info = json.loads((self.home / "service.json").read_text())
                if info["pid"] == self.proc.pid:
                    self.api_url = str(info["api_url"])
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"the service exited {self.proc.returncode}: see {self.home / 'service.log'}")
            time.sleep(0.05)
        raise SystemExit("the service did not start within 120 s")

    def kill_service(self, reap: bool = True) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        if reap:
            self.proc.wait()
        else:  # left a zombie until the new service has started: its owner tokens must count as dead
            while not _zombie(self.proc.pid):
                time.sleep(0.005)
            self.zombies.append(self.proc)

    def api(self, method: str, path: str, timeout: float = 120, **kw: Any) -> Any:
        r = httpx.request(method, self.api_url + path, headers={"Authorization": f"Bearer {self.owner_token}"},
                          timeout=timeout, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json()

    def teardown(self) -> None:
        """Leave nothing behind, whatever failed: service, zombies, computes, mount, files."""
        try:
            if self.writer is not None:
                self.writer.stop()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for z in self.zombies:
                z.wait()
        tb = self.tb or Tierbase(self.home)
        try:
            if self.home.exists():
                tb.down(purge=True)
        finally:
            _kill_postgres_of(self.base)
            with contextlib.suppress(Exception):
                subprocess.run(["umount", "-l", str(self.home / "volumes")], capture_output=True)
            shutil.rmtree(self.base, ignore_errors=True)

    # -- one trial ----------------------------------------------------------------------
    def trial(self, n: int, op: str | None = None) -> Trial:
        assert self.tb is not None and self.writer is not None
        op = op or self.pick()
        t = Trial(n, op, 0.0)
        t0 = time.monotonic()
        before_audit = self._last_audit_id()
        before = self.state()
        if op == "compute":
            self.kill_compute()
            self.wait_writer(30, t)
        else:
            request = self.prepare(op)
            t.delay = round(self.rng.uniform(0, SPAN[op] * 1.3), 3)
            done = threading.Event()

            def call() -> None:
                with contextlib.suppress(Exception):
                    self.api_request(*request)
                done.set()

            caller = threading.Thread(target=call, daemon=True)
            caller.start()
            time.sleep(t.delay)
            t.killed_during = not done.is_set()
            t.zombie = self.rng.random() < 0.3
            self.kill_service(reap=not t.zombie)
            caller.join(30)
            self.start_service()
            for z in self.zombies:
                z.wait()
            self.zombies.clear()
            self.wait_writer(30, t)
        self.check(t, before, before_audit)
        t.seconds = round(time.monotonic() - t0, 2)
        return t

    def pick(self) -> str:
        assert self.tb is not None
        self.features = [f for f in self.features if self.tb.store.find(f)]
        ops = ["create", "promote", "compute"]
        if self.features:
            ops += ["delete", "reset", "reset"]
        if self.tb is not None and self.tb.promotions("production") and \
                any(p["status"] == "succeeded" for p in self.tb.promotions("production")):
            ops.append("rollback")
        return self.rng.choice(ops)

    def prepare(self, op: str) -> tuple[Any, ...]:
        """The API request of ``op``, after what it needs (not killed): a branch, a migration on feat."""
        assert self.tb is not None
        self.features = [f for f in self.features if self.tb.store.find(f)]
        if op == "create":
            self.made += 1
            name = f"f{self.made}"
            self.features.append(name)
            return ("POST", "/v1/branches", 120, {"json": {"name": name, "parent": "production",
                                                           "start": self.rng.random() < 0.5}})
        if op == "delete":
            name = self.features.pop(self.rng.randrange(len(self.features)))
            return ("DELETE", f"/v1/branches/{name}", 120, {})
        if op == "reset":
            name = self.rng.choice(self.features)
            if self.rng.random() < 0.5:
                self.api("POST", f"/v1/branches/{name}/start")
            return ("POST", f"/v1/branches/{name}/reset", 120, {})
        if op == "promote":
            self.version += 1
            (self.migrations / f"V{self.version:04d}__t{self.version}.sql").write_text(
                f"CREATE TABLE t{self.version} (id int);\n")
            files = {f.name: f.read_text() for f in sorted(self.migrations.glob("*.sql"))}  # content, not a path
            self.api("POST", "/v1/migrations/apply", json={"branch": "feat", "files": files})
            return ("POST", "/v1/tiers/production/promote", 300, {"json": {"source": "feat", "files": files}})
        if op == "rollback":
            return ("POST", "/v1/tiers/production/rollback", 300, {"json": {}})
        raise ValueError(op)

    def api_request(self, method: str, path: str, timeout: float, kw: dict[str, Any]) -> Any:
        return self.api(method, path, timeout, **kw)

    def kill_compute(self) -> None:
        """kill -9 of the postmaster serving production (under the writer's load)."""
        assert self.tb is not None
        b = self.tb.store.get(str(self.tb.store.resolve_route("production")))
        pid = self.tb.branches.provider.running_pid(b.volume)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def wait_writer(self, seconds: float, t: Trial | None = None) -> None:
        assert self.writer is not None
        since = time.monotonic()
        while time.monotonic() - since < seconds:
            if self.writer.last_ack > since:
                return
            time.sleep(0.05)
        if t is not None:
            t.failures["writer"] = f"no acknowledged commit within {seconds:.0f} s"

    # -- checks -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        assert self.tb is not None
        store = self.tb.store
        return {"branches": {b.name: (b.volume, b.port) for b in store.all()}, "routes": store.routes(),
                "promotions": {p["id"]: p["status"] for p in self.tb.promotions()}}

    def _last_audit_id(self) -> int:
        assert self.tb is not None
        row = self.tb.store.db.execute("SELECT max(id) FROM audit").fetchone()
        return int(row[0] or 0)

    def check(self, t: Trial, before: dict[str, Any], before_audit: int) -> None:
        assert self.tb is not None and self.writer is not None
        tb, fail = self.tb, t.failures
        store, driver = tb.store, tb.branches.provider.driver
        branches = store.all()
        if bad := [f"{b.name}={b.state.value}" for b in branches if b.state.value != "ready"]:
            fail["unsettled"] = ", ".join(bad)
        volumes, referenced = set(driver.volumes()), {b.volume for b in branches}
        if orphans := volumes - referenced:
            fail["orphan_volume"] = ", ".join(sorted(orphans))
        if missing := referenced - volumes:
            fail["missing_volume"] = ", ".join(sorted(missing))
        if stray := self._stray_postgres(branches):
            fail["stray_postgres"] = stray
        if running := [p for p in tb.promotions() if p["status"] == "running"]:
            fail["promotion"] = f"#{running[0]['id']} still running"
        try:
            self._check_rows(t)
        except (psycopg.Error, RuntimeError) as err:
            fail["rows_kept"] = f"cannot read the rows: {err}"
        for route, target in store.routes().items():
            b = store.find(target)
            if b is None or b.state.value != "ready" or b.kind is Kind.SNAPSHOT:
                fail["routes"] = f"route {route!r} -> {target!r} ({b.state.value if b else 'missing'})"
        after = self.state()
        self._check_audited(t, before, after, before_audit)
        verdict = tb.audit_verify()
        if not verdict["ok"]:  # the service may be appending this instant: look once more
            time.sleep(0.5)
            verdict = tb.audit_verify()
            if not verdict["ok"]:
                fail["audit_verify"] = str(verdict.get("problem"))

    def _stray_postgres(self, branches: list[Any]) -> str:
        assert self.tb is not None
        want = {str(self.tb.branches.provider.datadir(b.volume)): b.name for b in branches}
        seen: Counter[str] = Counter()
        stray = []
        for datadir in _postmasters(self.base):
            if datadir not in want:
                stray.append(datadir)
            seen[datadir] += 1
        twice = [d for d, k in seen.items() if k > 1]
        return ", ".join(stray + [f"{d} twice" for d in twice])

    def _check_rows(self, t: Trial) -> None:
        assert self.tb is not None and self.writer is not None
        acked = self.writer.snapshot()
        serving = str(self.tb.store.resolve_route("production"))
        # the route answers through the proxy, as the writer (its own credentials)
        try:
            with psycopg.connect(self.writer.url, autocommit=True, connect_timeout=10) as conn:
                on_route = {int(r[0]) for r in conn.execute("SELECT id FROM faults_log").fetchall()}
        except psycopg.Error as err:
            t.failures["routes"] = f"production does not answer through the proxy: {err}"
            on_route = set()
        lineage = [b for b in self.tb.store.all()
                   if b.kind is Kind.TIER and b.name != serving and b.name not in self.replaced_seen
                   and self.tb.gate.tier_of(b) == "production"]
        for b in lineage:  # a branch the route left gets no more writes: read it once, then let it rest
            self.tb.branches.start(b.name)
            with psycopg.connect(self.tb.branches.provider.endpoint(self.tb.store.get(b.name).port).dsn(),
                                 autocommit=True) as conn:
                self.replaced_seen[b.name] = {int(r[0]) for r in conn.execute("SELECT id FROM faults_log")}
            self.tb.branches.stop(b.name)
        kept = on_route.union(*self.replaced_seen.values())
        if lost := acked - kept:
            t.failures["rows_kept"] = f"{len(lost)} acknowledged rows lost (e.g. {sorted(lost)[:5]})"

    def _check_audited(self, t: Trial, before: dict[str, Any], after: dict[str, Any], since: int) -> None:
        assert self.tb is not None
        records = self.tb.gate.audit.after(since)
        text = [json.dumps({k: _unjson(v) for k, v in r.items()}) for r in records]

        def recorded(word: str, actions: tuple[str, ...]) -> bool:
            return any(r["action"].startswith(actions) and f'"{word}"' in s for r, s in zip(records, text, strict=True))

        missing = []
        b0, b1 = before["branches"], after["branches"]
        for name in b1.keys() - b0.keys():
            if not recorded(name, ("branch.create", "promote", "route.repoint")):
                missing.append(f"created {name}")
        for name in b0.keys() - b1.keys():
            if not recorded(name, ("branch.delete", "branch.expire", "branch.create")):
                missing.append(f"deleted {name}")
        for name in b0.keys() & b1.keys():
            if b0[name][0] != b1[name][0] and not recorded(name, ("branch.reset",)):
                missing.append(f"reset {name}")
            if b0[name][1] != b1[name][1] and not recorded(name, ("compute.port",)):
                missing.append(f"port of {name}")
        for route in set(before["routes"]) | set(after["routes"]):
            if before["routes"].get(route) != after["routes"].get(route) and \
                    not recorded(route, ("route.", "promote")):
                missing.append(f"route {route}")
        for pid, status in after["promotions"].items():
            if before["promotions"].get(pid) != status and not recorded("production", ("promote",)):
                missing.append(f"promotion #{pid} {status}")
        if missing:
            t.failures["audited"] = "; ".join(missing)


def _unjson(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "{[":
        with contextlib.suppress(ValueError):
            return json.loads(v)
    return v


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _postmasters(base: Path) -> list[str]:
    """The data dirs of the live postmasters (not their children) started on volumes under ``base``."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] == "Z" or not argv or not argv[0].endswith("postgres") or "-D" not in argv:
            continue
        datadir = argv[argv.index("-D") + 1]
        if datadir.startswith(str(base)):
            out.append(datadir)
    return out


def _kill_postgres_of(base: Path) -> None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                if str(base) in cmd and "postgres" in cmd:
                    os.kill(int(proc.name), signal.SIGKILL)


def run(trials: int, seed: int, say: bool = True) -> dict[str, Any]:
    """Run ``trials`` kill trials on a fresh platform; the summary (and every trial) as a dict."""
    base = Path(tempfile.mkdtemp(prefix="tierbase-faults-", dir="/tmp"))
    base.chmod(0o711)
    h = Harness(base, seed, say)
    results: list[Trial] = []
    t0 = time.monotonic()
    try:
        h.setup()
        for n in range(1, trials + 1):
            t = h.trial(n)
            results.append(t)
            if say:
                log(f"trial {n:3d} {t.op:8s} kill at {t.delay:5.3f}s{' (zombie)' if t.zombie else '':9s} "
                    f"{'ok' if not t.failures else t.failures} ({t.seconds}s)")
        acked = len(h.writer.acked) if h.writer else 0
    finally:
        h.teardown()
    failures = Counter(c for t in results for c in t.failures)
    return {
        "trials": len(results), "seed": seed, "seconds": round(time.monotonic() - t0, 1),
        "ops": dict(Counter(t.op for t in results)),
        "killed_mid_operation": sum(t.killed_during for t in results),
        "zombie_restarts": sum(t.zombie for t in results),
        "rows_acknowledged": acked,
        "failures": {c: failures.get(c, 0) for c in CHECKS},
        "failed_trials": [{"n": t.n, "op": t.op, "delay": t.delay, "failures": t.failures}
                          for t in results if t.failures],
        "runs": [{"n": t.n, "op": t.op, "delay": t.delay, "killed_during": t.killed_during, "zombie": t.zombie,
                  "seconds": t.seconds} for t in results],
    }


def markdown(summary: dict[str, Any]) -> str:
    ops = ", ".join(f"{op} {summary['ops'].get(op, 0)}" for op in OPS)
    lines = [
        "| trials | ops | killed mid-operation | zombie restarts | rows acknowledged | failed trials |",
        "|---|---|---|---|---|---|",
        f"| {summary['trials']} | {ops} | {summary['killed_mid_operation']} | {summary['zombie_restarts']} | "
        f"{summary['rows_acknowledged']} | {len(summary['failed_trials'])} |",
        "",
        "| check | failures |",
        "|---|---|",
        *[f"| {c} | {k} |" for c, k in summary["failures"].items()],
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    ap.add_argument("--doc", default=None, help="rewrite the summary table between the markers of this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the harness loop-mounts a btrfs image")
    summary = run(args.trials, args.seed)
    summary["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores",
                       "cmd": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {args.out}")
    table = markdown(summary)
    print(table)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        start, end = "<!-- faults:begin -->", "<!-- faults:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        doc.write_text(f"{head}{start}\n{table}\n{end}{tail}")
        log(f"wrote {doc}")
    if any(summary["failures"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
