"""Soak: N concurrent clients for D minutes through a real `tierbase up` (SDK and CLI over the API, the proxy).

Each client (its own platform-engineer principal) loops over: a branch of its own (create, connect,
write, query, reset, query, delete), and the shared "hot" branches every client fights over (reset,
connect and query, delete and re-create, repoint a route at one and query through it); a promoter
promotes a migration into production every ~40 s and rolls one back every third time; a writer
commits on production throughout. Recorded: every error that is not a documented refusal, and the
service's open files and threads, postgres processes, mounts, loop devices and volumes over time.
After the run: no unsettled branch, orphan or missing volume, stray postgres; `audit verify` ok;
`down` leaves nothing running.

    python bench/soak.py --clients 20 --minutes 30 --out bench/results/soak.json --doc docs/reliability.md
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
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, log  # noqa: E402
from bench.faults import _kill_postgres_of, _postmasters  # noqa: E402
from tierbase import Tierbase  # noqa: E402
from tierbase.api.client import Client  # noqa: E402
from tierbase.errors import TierbaseError  # noqa: E402

#: refusals the API documents for a request that races another (error codes, HTTP 4xx/503/507)
REFUSAL_CODES = {"branch_busy", "branch_exists", "branch_not_found", "refused", "promotion_running",
                 "policy_denied", "compute_busy", "disk_full", "nothing_to_promote"}
#: what a session may be told when another client resets, deletes or repoints its branch, or its
#: compute is starting: 57P01 (ended), 57P03 (starting up), 3D000 (the route just went away)
REFUSAL_SQLSTATES = {"57P01", "57P02", "57P03", "3D000"}
HOT = [f"hot-{i}" for i in range(4)]
ROUTE = "soak-route"


class Soak:
    def __init__(self, base: Path, clients: int, minutes: float, seed: int) -> None:
        self.base, self.home = base, base / "home"
        self.clients, self.seconds = clients, minutes * 60
        self.rng = random.Random(seed)
        self.env = dict(os.environ, TIERBASE_HOME=str(self.home), PYTHONPATH=str(ROOT),
                        TIERBASE_PORT_BASE=str(20000 + self.rng.randrange(20) * 500))
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.acked = 0
        self.halt = threading.Event()
        self.t0 = 0.0

    # -- the platform --------------------------------------------------------------
    def cli(self, *args: str, token: str | None = None, check: bool = True) -> Any:
        env = dict(self.env, **({"TIERBASE_TOKEN": token} if token else {}))
        got = subprocess.run([sys.executable, "-m", "tierbase.cli.main", *args, "--json"], env=env,
                             capture_output=True, text=True, timeout=600)
        if check and got.returncode != 0:
            raise RuntimeError(f"tierbase {' '.join(args)} exited {got.returncode}: {got.stderr.strip()}")
        return json.loads(got.stdout) if got.stdout.strip() else None

    def setup(self) -> None:
        up = self.cli("up", "--btrfs-size", "12G", "--api-port", str(free_port()), "--proxy-port",
                      str(free_port()), "--idle-timeout", "60")
        self.api_url = up["api_url"]
        self.owner = (self.home / "api.token").read_text().strip()
        admin = Client(url=self.api_url, token=self.owner)
        self.tokens = [str(admin.create_principal(f"soak{i}", "platform-engineer")["token"])
                       for i in range(self.clients)]
        with psycopg.connect(admin.branch_url("production"), autocommit=True) as conn:
            conn.execute("CREATE TABLE soak_log (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
        admin.create_branch("feat", "production")  # promotions come from it
        for h in HOT:
            admin.create_branch(h, "production")
        admin.set_route(ROUTE, HOT[0])
        admin.close()
        self.migrations = self.base / "migrations"
        self.migrations.mkdir()

    def service_pid(self) -> int:
        return int(json.loads((self.home / "service.json").read_text())["pid"])

    # -- recording -----------------------------------------------------------------
    def outcome(self, op: str, err: BaseException | None, *, hot: bool) -> None:
        with self.lock:
            self.ops[op] += 1
            if err is None:
                return
            if isinstance(err, TierbaseError) and err.code in REFUSAL_CODES:
                self.refusals[f"{op}: {err.code}"] += 1
                return
            state = getattr(err, "sqlstate", None)
            if isinstance(err, psycopg.Error) and (state in REFUSAL_SQLSTATES or (hot and state in (None, "42P01"))):
                # on a hot branch another client may reset (the table goes), delete or stop it mid-session
                self.refusals[f"{op}: sqlstate {state or 'connection ended'}"] += 1
                return
            self.errors.append({"t": round(time.monotonic() - self.t0, 1), "op": op, "type": type(err).__name__,
                                "code": getattr(err, "code", None), "sqlstate": state, "message": str(err)[:400]})
            if len(self.errors) <= 50:  # visible while the run goes on
                log(f"error: {self.errors[-1]}")

    def attempt(self, op: str, fn: Any, *, hot: bool = False) -> Any:
        try:
            got = fn()
        except Exception as err:  # whatever it is, it is recorded (refusal or error)
            self.outcome(op, err, hot=hot)
            return None
        self.outcome(op, None, hot=hot)
        return got

    # -- the clients ---------------------------------------------------------------
    def client(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        sdk = Client(url=self.api_url, token=self.tokens[i])
        k = 0
        while not self.halt.is_set():
            pick = rng.random()
            if pick < 0.35:
                k += 1
                self.own_cycle(sdk, f"c{i}-{k}", rng)
            elif pick < 0.55:
                self.attempt("hot.query", lambda: self.query(sdk, rng.choice(HOT)), hot=True)
            elif pick < 0.70:
                self.attempt("hot.reset", lambda: sdk.reset_branch(rng.choice(HOT)), hot=True)
            elif pick < 0.78:
                h = rng.choice(HOT)
                self.attempt("hot.delete", lambda h=h: sdk.delete_branch(h), hot=True)
                self.attempt("hot.create", lambda h=h: sdk.create_branch(h, "production"), hot=True)
            elif pick < 0.88:
                self.attempt("route.set", lambda: sdk.set_route(ROUTE, rng.choice(HOT)), hot=True)
                self.attempt("route.query", lambda: self.query(sdk, ROUTE), hot=True)
            elif pick < 0.97:
                self.attempt("list", lambda: sdk.list_branches(with_bytes=rng.random() < 0.2))
            else:
                self.attempt("cli.list", lambda: self.cli("branch", "list", "--no-bytes", token=self.tokens[i]))
            time.sleep(rng.uniform(0.05, 0.5))
        sdk.close()

    def query(self, sdk: Client, route: str) -> None:
        with psycopg.connect(sdk.branch_url(route), autocommit=True, connect_timeout=60) as conn:
            conn.execute("SELECT count(*) FROM pg_class").fetchone()

    def own_cycle(self, sdk: Client, name: str, rng: random.Random) -> None:
        made = self.attempt("own.create", lambda: sdk.create_branch(name, "production", start=rng.random() < 0.5))
        if made is None:
            return

        def write() -> None:
            with psycopg.connect(sdk.branch_url(name), autocommit=True, connect_timeout=60) as conn:
                conn.execute("CREATE TABLE mine (id int)")
                conn.execute("INSERT INTO mine SELECT generate_series(1, 1000)")
                got = conn.execute("SELECT count(*) FROM mine").fetchone()
                assert got == (1000,), got

        def after_reset() -> None:  # the branch has its parent's data again: our table is gone
            with psycopg.connect(sdk.branch_url(name), autocommit=True, connect_timeout=60) as conn:
                got = conn.execute("SELECT to_regclass('mine') IS NULL").fetchone()
                assert got == (True,), got

        self.attempt("own.write", write)
        if rng.random() < 0.5 and self.attempt("own.reset", lambda: sdk.reset_branch(name)) is not None:
            self.attempt("own.query", after_reset)
        self.attempt("own.delete", lambda: sdk.delete_branch(name))

    def promoter(self) -> None:
        sdk = Client(url=self.api_url, token=self.owner)
        n = 0
        while not self.halt.wait(40):
            n += 1
            (self.migrations / f"V{n:04d}__t{n}.sql").write_text(f"CREATE TABLE soak_t{n} (id int);\n")
            self.attempt("migrate", lambda: sdk.migrate_apply("feat", str(self.migrations)))
            self.attempt("promote", lambda: sdk.promote("production", "feat", str(self.migrations)))
            if n % 3 == 0:
                self.attempt("rollback", lambda: sdk.rollback("production"))
        sdk.close()

    def writer(self) -> None:
        sdk = Client(url=self.api_url, token=self.owner)
        n = 0
        while not self.halt.is_set():
            try:
                with psycopg.connect(sdk.branch_url("production"), autocommit=True, connect_timeout=30) as conn:
                    while not self.halt.is_set():
                        n += 1
                        conn.execute("INSERT INTO soak_log (id) VALUES (%s) ON CONFLICT DO NOTHING", (n,))
                        self.acked += 1
                        time.sleep(0.05)
            except psycopg.Error as err:  # a rollback repoints production: its sessions get 57P01
                self.outcome("writer", err, hot=False)
                time.sleep(0.2)
        sdk.close()

    def sampler(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self.halt.wait(15):
                break

    def sample(self) -> dict[str, Any]:
        pid = self.service_pid()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text()
        field = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines() if ":" in line}
        pg = 0
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    cmd = (proc / "cmdline").read_bytes()
                    if str(self.home).encode() in cmd and b"postgres" in cmd:
                        pg += 1
        mounts = sum(str(self.home) in line for line in Path("/proc/self/mounts").read_text().splitlines())
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.count(str(self.home))
        volumes = len(os.listdir(self.home / "volumes"))
        return {"t": round(time.monotonic() - self.t0, 1), "service_fds": fds, "service_threads": int(field["Threads"]),
                "service_rss_kib": int(field["VmRSS"].split()[0]), "postgres_procs": pg,
                "postmasters": len(_postmasters(self.base)), "mounts": mounts, "loop_devices": loops,
                "volumes": volumes}

    # -- the run ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.setup()
        self.t0 = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        threads += [threading.Thread(target=f, daemon=True) for f in (self.promoter, self.writer, self.sampler)]
        for t in threads:
            t.start()
        last = 0.0
        while time.monotonic() - self.t0 < self.seconds and not self.halt.is_set():
            time.sleep(5)
            if time.monotonic() - last > 60:
                last = time.monotonic()
                s = self.samples[-1] if self.samples else {}
                log(f"{(time.monotonic() - self.t0) / 60:4.1f} min: {sum(self.ops.values())} ops, "
                    f"{sum(self.refusals.values())} refusals, {len(self.errors)} errors; {s}")
        self.halt.set()
        for t in threads:
            t.join(120)
        self.samples.append(self.sample())
        elapsed = time.monotonic() - self.t0
        return {"seconds": round(elapsed, 1), "ops": dict(self.ops), "ops_total": sum(self.ops.values()),
                "refusals": dict(self.refusals), "errors": self.errors, "error_count": len(self.errors),
                "writer_commits": self.acked, "samples": self.samples, "growth": growth(self.samples),
                "after": self.check()}

    def check(self) -> dict[str, Any]:
        """Consistency after the clients stopped, then `down` leaves nothing running."""
        tb = Tierbase(self.home)
        branches = tb.store.all()
        volumes = set(tb.driver.volumes())
        referenced = {b.volume for b in branches}
        current = {str(tb.branches.provider.datadir(b.volume)) for b in branches}
        out: dict[str, Any] = {
            "branches": len(branches),
            "unsettled": [b.name for b in branches if b.state.value != "ready"],
            "orphan_volumes": sorted(volumes - referenced),
            "missing_volumes": sorted(referenced - volumes),
            "stray_postgres": [d for d in _postmasters(self.base) if d not in current],
            "running_promotions": [p["id"] for p in tb.promotions() if p["status"] == "running"],
        }
        tb.close()
        verdict = self.cli("audit", "verify", token=self.owner, check=False) or {}
        out["audit_verify_ok"] = bool(verdict.get("ok"))
        self.cli("down")
        out["postgres_after_down"] = len(_postmasters(self.base))
        out["ok"] = not any(out[k] for k in ("unsettled", "orphan_volumes", "missing_volumes", "stray_postgres",
                                             "running_promotions", "postgres_after_down")) and out["audit_verify_ok"]
        return out

    def teardown(self) -> None:
        self.halt.set()
        with contextlib.suppress(Exception):
            self.cli("down", "--purge", check=False)
        _kill_postgres_of(self.base)
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(self.home / "volumes")], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def growth(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Each resource's highest value in the first and the last fifth of the run (after a warm-up sample)."""
    if len(samples) < 6:
        return {}
    fifth = max(1, len(samples) // 5)
    early, late = samples[1:1 + fifth], samples[-fifth:]
    keys = [k for k in samples[0] if k != "t"]
    return {k: {"early_max": max(s[k] for s in early), "late_max": max(s[k] for s in late),
                "max": max(s[k] for s in samples)} for k in keys}


def markdown(doc: dict[str, Any]) -> str:
    a, g = doc["after"], doc["growth"]
    refusals = ", ".join(f"{k} {v}" for k, v in sorted(doc["refusals"].items(), key=lambda kv: -kv[1])[:8])
    lines = [
        "| clients | minutes | operations | documented refusals | other errors | production commits | after the run |",
        "|---|---|---|---|---|---|---|",
        f"| {doc['meta']['clients']} | {doc['seconds'] / 60:.1f} | {doc['ops_total']} | "
        f"{sum(doc['refusals'].values())} | {doc['error_count']} | {doc['writer_commits']} | "
        f"{'consistent, nothing left after down' if a['ok'] else 'NOT OK: see soak.json'} |",
        "",
        "| resource (service and its computes) | max in first fifth | max in last fifth | max |",
        "|---|---|---|---|",
        *[f"| {k} | {v['early_max']} | {v['late_max']} | {v['max']} |" for k, v in g.items()],
        "",
        f"Refusals seen (most frequent): {refusals or 'none'}.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    ap.add_argument("--doc", default=None, help="rewrite the summary between the soak markers of this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: `tierbase up` loop-mounts a btrfs image")
    base = Path(tempfile.mkdtemp(prefix="tierbase-soak-", dir="/tmp"))
    base.chmod(0o711)
    soak = Soak(base, args.clients, args.minutes, args.seed)
    signal.signal(signal.SIGTERM, lambda *_: soak.halt.set())
    try:
        doc = soak.run()
    finally:
        soak.teardown()
    doc["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, shared",
                   "clients": args.clients, "minutes": args.minutes, "seed": args.seed, "cmd": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.out}")
    table = markdown(doc)
    print(table)
    if args.doc:
        path = Path(args.doc)
        text = path.read_text()
        start, end = "<!-- soak:begin -->", "<!-- soak:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        path.write_text(f"{head}{start}\n{table}\n{end}{tail}")
        log(f"wrote {path}")
    if doc["error_count"] or not doc["after"]["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
