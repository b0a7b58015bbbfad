"""Benchmark tierbase's Postgres proxy against a direct connection and PgBouncer.

    python bench/proxy.py --out bench/results/proxy.json

In one run, on a throwaway platform (loop-mounted btrfs, so run as root):

* pgbench (select-only ``-S`` and the default TPC-B-like mix; 1 and 8 clients;
  simple query protocol, which PgBouncer's pooling modes all accept) straight
  against a branch's compute, through tierbase's proxy (in a process of its
  own, on uvloop, with the service's resolver), and through PgBouncer (session
  pooling, SCRAM with the secret from pg_authid) in front of the same compute;
* cold start: compute stopped -> first query answered through the proxy;
* connection setup (connect + ``SELECT 1``) direct, through the proxy and PgBouncer;
* repoint: how long the switch holds new connections, and when a new
  connection first reaches the new branch.

Writes a results JSON with tables for ``bench/report.py``; does not render the page.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench.common import free_port, log, ms, pct, port_free  # noqa: E402
from tierbase import Tierbase  # noqa: E402
from tierbase.compute import find_binaries  # noqa: E402
from tierbase.proxy import Proxy, ProxyThread, new_event_loop  # noqa: E402
from tierbase.service import Resolver  # noqa: E402

RESULTS = REPO / "bench" / "results"
PGBOUNCER = "/usr/sbin/pgbouncer"
BRANCH = "bench"  # the pgbench branch, also its route through the proxy
MIXES = {"select-only": ["-S"], "TPC-B": []}
CLIENTS = (1, 8)
TARGET_SHARE = 0.90  # of PgBouncer's TPS, at 8 clients, on both mixes


def free_port_base() -> int:
    """Computes' ports above the kernel's ephemeral range (and away from the test suite's)."""
    for _ in range(100):
        base = 61000 + secrets.randbelow(40) * 100
        if all(port_free(p) for p in range(base, base + 20)):
            return base
    raise RuntimeError("no free port range in 61000-65000")


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    got = subprocess.run(args, capture_output=True, text=True, **kw)
    if got.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({got.returncode}): {got.stderr.strip()[-800:]}")
    return got


# -- the proxy under test, in a process of its own ----------------------------------------------
def serve(home: Path) -> None:
    """Child mode: run a proxy over the platform at ``home``; print its port; stop when stdin closes."""
    tb = Tierbase(home)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    proxy = Proxy(Resolver(tb))
    loop.run_until_complete(proxy.start())
    print(proxy.port, flush=True)
    stop = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    loop.run_until_complete(stop.wait())
    loop.run_until_complete(proxy.close())
    loop.close()
    tb.close()


@contextmanager
def proxy_process(home: Path) -> Iterator[int]:
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(home)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        yield port
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# -- PgBouncer ----------------------------------------------------------------------------------
@contextmanager
def pgbouncer(compute_port: int, scram_secret: str) -> Iterator[int]:
    """PgBouncer (session pooling, SCRAM end to end) in front of the compute, as the postgres user."""
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="tierbase-bench-pgbouncer-"))
    (work / "userlist.txt").write_text(f'"tierbase" "{scram_secret}"\n')
    (work / "pgbouncer.ini").write_text(f"""\
[databases]
{BRANCH} = host=127.0.0.1 port={compute_port} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {work}/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 40
logfile = {work}/pgbouncer.log
pidfile = {work}/pgbouncer.pid
""")
    for p in [work, *work.iterdir()]:
        shutil.chown(p, "postgres", "postgres")
    proc = subprocess.Popen([PGBOUNCER, str(work / "pgbouncer.ini")], user="postgres", group="postgres",
                            extra_groups=[], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


# -- pgbench ------------------------------------------------------------------------------------
@dataclass
class Bench:
    tps: float
    latency_ms: float


def pgbench(port: int, dbname: str, mix: list[str], clients: int, seconds: int, env: dict[str, str]) -> Bench:
    args = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "tierbase", "-M", "simple", *mix,
            "-c", str(clients), "-j", str(min(clients, os.cpu_count() or 1)), "-T", str(seconds), dbname]
    out = run(args, env=env, timeout=seconds + 120).stdout
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    lat = re.search(r"^latency average = ([\d.]+) ms", out, re.M)
    if not tps or not lat:
        raise RuntimeError(f"could not read pgbench's output:\n{out}")
    return Bench(float(tps.group(1)), float(lat.group(1)))


# -- connection timings -------------------------------------------------------------------------
def connect_and_query(port: int, dbname: str, password: str) -> float:
    t0 = time.perf_counter()
    with psycopg.connect(host="127.0.0.1", port=port, user="tierbase", password=password, dbname=dbname,
                         connect_timeout=60, autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()
    return time.perf_counter() - t0


def cold_starts(tb: Tierbase, proxy_port: int, password: str, runs: int) -> list[float]:
    out = []
    provider, volume = tb.branches.provider, tb.store.get(BRANCH).volume
    for _ in range(runs):
        tb.stop_branch(BRANCH)
        time.sleep(0.2)
        if provider.running_pid(volume) is not None:
            raise RuntimeError("the compute still runs after stop_branch")
        out.append(connect_and_query(proxy_port, BRANCH, password))
        if provider.running_pid(volume) is None:
            raise RuntimeError("a query was answered but no compute runs")
    return out


def repoints(tb: Tierbase, password: str, runs: int) -> dict[str, Any]:
    """Flip a route between two branches while sessions sit on the old one and a prober keeps connecting."""
    names = [f"rp-{secrets.token_hex(2)}", f"rp-{secrets.token_hex(2)}"]
    for name in names:
        tb.create_branch(name, start=True)
        with psycopg.connect(tb.branch_url(name, direct=True), autocommit=True) as conn:
            conn.execute("CREATE TABLE marker (v text)")
            conn.execute("INSERT INTO marker VALUES (%s)", (name,))
    route = f"rp-route-{secrets.token_hex(2)}"
    tb.set_route(route, names[0])
    thread = ProxyThread(Proxy(Resolver(tb))).start()
    port = thread.proxy.port
    seen: list[tuple[float, str]] = []
    stop = threading.Event()

    def prober() -> None:
        while not stop.is_set():
            with suppress(psycopg.Error), psycopg.connect(
                    host="127.0.0.1", port=port, user="tierbase", password=password, dbname=route,
                    connect_timeout=30, autocommit=True) as conn:
                row = conn.execute("SELECT v FROM marker").fetchone()
                seen.append((time.perf_counter(), str(row[0]) if row else ""))

    async def switch(to: str, old: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        async with thread.proxy.hold(route):
            await asyncio.to_thread(tb.set_route, route, to)
            ended = await thread.proxy.terminate(old, f'route "{route}" now points to branch "{to}"; reconnect')
        return time.perf_counter() - t0, ended

    switches, visible, ended_total = [], [], 0
    probe = threading.Thread(target=prober, daemon=True)
    try:
        probe.start()
        for i in range(runs):
            old, new = names[i % 2], names[(i + 1) % 2]
            idle = [psycopg.connect(host="127.0.0.1", port=port, user="tierbase", password=password,
                                    dbname=route, autocommit=True) for _ in range(4)]
            for c in idle:
                c.execute("SELECT 1")
            time.sleep(0.1)
            t0 = time.perf_counter()
            took, ended = thread.call(switch(new, old))
            deadline = time.perf_counter() + 10
            while not any(t > t0 and v == new for t, v in seen) and time.perf_counter() < deadline:
                time.sleep(0.001)
            first = min(t for t, v in seen if t > t0 and v == new)
            switches.append(took)
            visible.append(first - t0)
            ended_total += ended
            for c in idle:
                c.close()
            time.sleep(0.2)
    finally:
        stop.set()
        probe.join(30)
        thread.stop()
        for name in names:
            with suppress(Exception):
                tb.delete_branch(name)
    return {"switch": switches, "visible": visible, "sessions_ended": ended_total, "runs": runs}


# -- the report ---------------------------------------------------------------------------------
def machine() -> str:
    cpu = "unknown CPU"
    with suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    return f"{os.cpu_count()} cores {cpu}, Linux {os.uname().release}"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    pg = run([find_binaries()["postgres"], "--version"]).stdout.strip()
    bouncer = run([PGBOUNCER, "--version"]).stdout.splitlines()[0].strip()
    return {"postgres": pg, "pgbouncer": bouncer,
            "python": f"{sys.version.split()[0]}, uvloop {version('uvloop')}"}


def throughput_table(results: dict[tuple[str, int, str], list[Bench]], seconds: int, rounds: int) -> dict[str, Any]:
    rows, notes, verdicts = [], [], []
    for mix in MIXES:
        for clients in CLIENTS:
            cell = {t: results[(mix, clients, t)] for t in ("direct", "proxy", "pgbouncer")}
            tps = {t: sum(b.tps for b in v) / len(v) for t, v in cell.items()}
            lat = {t: sum(b.latency_ms for b in v) / len(v) for t, v in cell.items()}
            share = tps["proxy"] / tps["pgbouncer"]
            rows.append([mix, clients, round(tps["direct"]), round(lat["direct"], 3), round(tps["proxy"]),
                         round(lat["proxy"], 3), round(tps["pgbouncer"]), round(lat["pgbouncer"], 3),
                         f"{tps['proxy'] / tps['direct']:.0%}", f"{tps['pgbouncer'] / tps['direct']:.0%}",
                         f"{share:.0%}"])
            if clients == 8:
                verdicts.append(f"target proxy >= {TARGET_SHARE:.0%} of PgBouncer's TPS, {mix}, 8 clients: "
                                f"{'met' if share >= TARGET_SHARE else 'NOT met'} ({share:.0%})")
    notes.append(f"pgbench -M simple -T {seconds}, -j min(clients, cores); scale 10 on a tierbase branch; each cell "
                 f"is the mean of {rounds} run(s), the three targets run back to back (order reversed every "
                 "round) so that they share the machine's state.")
    notes.append("tierbase proxy: its own process, uvloop, the service's resolver; after authentication a session "
                 "is a bare byte relay. PgBouncer: session pooling, auth_type scram-sha-256 with the secret from "
                 "pg_authid, one process. Both run on the same 2 cores as postgres and pgbench.")
    return {"title": "Proxy throughput: pgbench direct, through tierbase's proxy and through PgBouncer",
            "columns": ["workload", "clients", "direct TPS", "direct latency (ms)", "proxy TPS",
                        "proxy latency (ms)", "PgBouncer TPS", "PgBouncer latency (ms)", "proxy / direct",
                        "PgBouncer / direct", "proxy / PgBouncer"],
            "rows": rows, "notes": notes + verdicts}


def timing_table(cold: list[float], connects: dict[str, list[float]], rp: dict[str, Any]) -> dict[str, Any]:
    def row(what: str, samples: list[float], target: str = "", met: bool | None = None) -> list[Any]:
        verdict = "" if met is None else (" (met)" if met else " (NOT met)")
        return [what, ms(pct(samples, 0.5)), ms(pct(samples, 0.95)), len(samples), target + verdict]

    rows = [row("cold start: stopped compute -> first query answered via the proxy", cold, "p50 < 700 ms",
                pct(cold, 0.5) < 0.7)]
    rows += [row(f"connect + SELECT 1, {what}", s) for what, s in connects.items()]
    notes_connect = ("connect + SELECT 1: a new psycopg connection each time (SCRAM-SHA-256, 4096 iterations, on "
                     "both ends). PgBouncer answers SCRAM itself and reuses its pooled server connection; the "
                     "proxy's resolver (the service's) looks the route up and checks the compute on every connect.")
    rows.append(row("repoint: hold -> route changed -> old sessions ended -> release", rp["switch"]))
    rows.append(row("repoint visible: switch start -> a new connection answered by the new branch", rp["visible"],
                    "< 100 ms", pct(rp["visible"], 0.95) < 0.1))
    notes = ["cold start: `Tierbase.stop_branch`, then psycopg connects through the proxy (SCRAM, route = branch) "
             "and runs SELECT 1; the proxy's resolver starts the compute (pg_ctl start, wait for ready). The OS page "
             "cache stays warm between runs.",
             f"repoint: {rp['runs']} flips of a route between two running branches, with 4 idle sessions on the old "
             f"one and a prober connecting in a loop ({rp['sessions_ended']} sessions ended with 57P01 in all: the "
             "idle ones, and the prober's when it was on the old branch at the switch); 'visible' is "
             "from the start of the switch to the first prober answer from the new branch, so it includes one "
             "connection setup (SCRAM) and up to one prober round.",
             notes_connect,
             "p95 interpolated between the closest ranks (close to the maximum with this few runs)."]
    return {"title": "Proxy cold start, connection setup and repoint",
            "columns": ["measure", "p50 (ms)", "p95 (ms)", "runs", "target"], "rows": rows, "notes": notes}


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "proxy.json")
    ap.add_argument("--seconds", type=int, default=15, help="pgbench -T of each run (default 15)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each (mix, clients, target) cell (default 2)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale (default 10)")
    ap.add_argument("--cold-runs", type=int, default=10)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("Error: run as root: the benchmark loop-mounts a btrfs image and runs PgBouncer as postgres.")
    if not Path(PGBOUNCER).exists():
        raise SystemExit(f"Error: {PGBOUNCER} is missing. Install it (Debian: `apt-get install pgbouncer`).")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no leaked mounts
    started = time.time()
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    root = Path(tempfile.mkdtemp(prefix="tierbase-bench-proxy-", dir="/tmp"))
    root.chmod(0o711)  # the compute user must reach into it
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    tb = Tierbase(root / "home")
    try:
        log("creating the platform")
        tb.init(storage="btrfs", btrfs_size="4G")
        tb.create_branch(BRANCH, start=True)
        password = tb.branches.provider.password
        env = dict(os.environ, PGPASSWORD=password)
        compute = tb.store.get(BRANCH).port
        log(f"pgbench -i -s {args.scale} on branch {BRANCH!r}")
        run(["pgbench", "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(compute), "-U", "tierbase",
             "postgres"], env=env, timeout=600)
        with psycopg.connect(tb.branch_url(BRANCH, direct=True), autocommit=True) as conn:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'tierbase'").fetchone()
        assert row and str(row[0]).startswith("SCRAM-SHA-256$")
        results: dict[tuple[str, int, str], list[Bench]] = {}
        connects: dict[str, list[float]] = {}
        with proxy_process(tb.home.root) as proxy_port, pgbouncer(compute, str(row[0])) as bouncer_port:
            where = {"direct": (compute, "postgres"), "proxy": (proxy_port, BRANCH),
                     "pgbouncer": (bouncer_port, BRANCH)}
            log("warm-up")
            for port, db in where.values():
                pgbench(port, db, ["-S"], 2, 2, env)
            for rnd in range(args.rounds):
                order = list(where) if rnd % 2 == 0 else list(reversed(where))
                for mix, flags in MIXES.items():
                    for clients in CLIENTS:
                        for target in order:
                            port, db = where[target]
                            got = pgbench(port, db, flags, clients, args.seconds, env)
                            results.setdefault((mix, clients, target), []).append(got)
                            log(f"round {rnd + 1} {mix:11} {clients} clients {target:9} "
                                f"{got.tps:9.0f} TPS {got.latency_ms:.3f} ms")
            for target, (port, db) in where.items():
                connects[target] = [connect_and_query(port, db, password) for _ in range(20)]
            log("cold starts through the proxy")
            cold = cold_starts(tb, proxy_port, password, args.cold_runs)
            log(f"cold start p50 {ms(pct(cold, 0.5))} ms")
        log("repoint")
        rp = repoints(tb, password, 10)
        log(f"repoint visible p50 {ms(pct(rp['visible'], 0.5))} ms")
    finally:
        log("tearing down")
        tb.down(purge=True)
        shutil.rmtree(root, ignore_errors=True)

    doc = {
        "title": "Proxy",
        "tables": [throughput_table(results, args.seconds, args.rounds), timing_table(cold, connects, rp)],
        "meta": {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                 **versions(), "cmd": "python bench/proxy.py " + " ".join(sys.argv[1:]),
                 "requires": "root (loop-mounts a btrfs image), pgbench, pgbouncer (Debian package)",
                 "duration_s": round(time.time() - started), "load_average_at_start": load_at_start},
        "raw": {"pgbench": [{"mix": k[0], "clients": k[1], "target": k[2], "tps": [b.tps for b in v],
                             "latency_ms": [b.latency_ms for b in v]} for k, v in results.items()],
                "cold_start_s": cold, "connect_s": connects, "repoint": rp},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
