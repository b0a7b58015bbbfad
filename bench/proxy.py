"""Benchmark the proxy inside the running tierbase service against a direct connection and PgBouncer.

    python bench/proxy.py --out bench/results/proxy.json          # the full run (~9 min)
    python bench/proxy.py --quick        # a dry run (~2 min), to /tmp/tierbase-bench-proxy-quick.json

In one run, on a platform started the way users start it (``tierbase up``, storage btrfs on a
loop-mounted image, so run as root; ``tierbase down --purge`` at the end, also on error):

* direct: the compute's own TCP port as the platform engineer's ``pe_`` login role
  (``tierbase branch url --direct``, SCRAM);
* proxy: the service's proxy (``tierbase branch url``): SCRAM against the principal's verifier, the
  policy's ``branch.connect`` decision, then a login to the compute over its unix socket as ``tb_owner``;
* PgBouncer: session pooling, SCRAM against the same principal's verifier, logging in to the compute over
  the same unix socket directory as ``tb_owner``: the same path as the proxy's.

Measured: connect + ``SELECT 1`` (N sequential connections per way, interleaved), ``pgbench -C``
(a connection per transaction), pgbench select-only and TPC-B at 1 and 8 clients (simple query protocol),
cold start through the proxy, and repoint through the API call `tierbase route set` makes and with
the command itself.
Writes the results JSON and re-renders docs/benchmarks.md (``bench/report.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench.common import log, ms, pct, write_results  # noqa: E402
from bench.proxy_platform import PGBOUNCER, Platform, Way, cpu_seconds, pgbouncer, platform, run  # noqa: E402
from tierbase.api.client import Client  # noqa: E402
from tierbase.compute import find_binaries  # noqa: E402
from tierbase.errors import TierbaseError  # noqa: E402
from tierbase.governance.principals import scram_verifier  # noqa: E402

RESULTS = REPO / "bench" / "results"
QUICK_OUT = Path("/tmp/tierbase-bench-proxy-quick.json")
BRANCH = "bench"  # the pgbench branch, also its route through the proxy and PgBouncer's database name
MIXES = {"select-only": ["-S"], "TPC-B": []}
CLIENTS = (1, 8)
WAYS = ("direct", "proxy", "pgbouncer")
#: the targets of issue 9
CONNECT_RATIO_MAX = 1.5  # proxy connect + SELECT 1 p50 / direct p50
TPS_SHARE_MIN = 0.95  # proxy TPS / PgBouncer TPS


@dataclass
class Bench:
    tps: float
    latency_ms: float
    transactions: int
    relay_cpu_s: float  # CPU the relay process (service or PgBouncer) used during the run

    @property
    def relay_us_per_tx(self) -> float:
        return self.relay_cpu_s * 1e6 / max(self.transactions, 1)


def pgbench(way: Way, flags: list[str], clients: int, seconds: int) -> Bench:
    args = ["pgbench", *way.pgbench_args(), "-M", "simple", *flags, "-c", str(clients),
            "-j", str(min(clients, os.cpu_count() or 1)), "-T", str(seconds), way.dbname]
    cpu0 = cpu_seconds(way.relay_pid)
    out = run(args, env=way.env(), timeout=seconds + 120).stdout
    cpu = cpu_seconds(way.relay_pid) - cpu0
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    lat = re.search(r"^latency average = ([\d.]+) ms", out, re.M)
    txs = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    if not tps or not lat or not txs:
        raise RuntimeError(f"could not read pgbench's output:\n{out}")
    return Bench(float(tps.group(1)), float(lat.group(1)), int(txs.group(1)), cpu)


def connect_and_query(way: Way) -> float:
    t0 = time.perf_counter()
    with psycopg.connect(way.dsn(), connect_timeout=60, autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()
    return time.perf_counter() - t0


def connects(ways: list[Way], n: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """n sequential connect + SELECT 1 + close per way, interleaved so that all see the same machine;
    also the relay's CPU per connection (clock ticks summed over the n: unbiased, not exact)."""
    out: dict[str, list[float]] = {w.name: [] for w in ways}
    cpu = dict.fromkeys(out, 0.0)
    for w in ways:  # one untimed connection each: first-use costs (pools, caches) are not setup
        connect_and_query(w)
    for i in range(n):
        for w in ways if i % 2 == 0 else reversed(ways):
            cpu0 = cpu_seconds(w.relay_pid)
            out[w.name].append(connect_and_query(w))
            cpu[w.name] += cpu_seconds(w.relay_pid) - cpu0
    return out, {name: c / n for name, c in cpu.items()}


def cold_starts(sdk: Client, proxy: Way, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        sdk.stop_branch(BRANCH)
        if sdk.get_branch(BRANCH)["compute"] != "stopped":
            raise RuntimeError("the compute still runs after `branch stop`")
        time.sleep(0.2)
        out.append(connect_and_query(proxy))
        if sdk.get_branch(BRANCH)["compute"] != "running":
            raise RuntimeError("a query was answered through the proxy but no compute runs")
    return out


def repoints(sdk: Client, p: Platform, proxy: Way, runs: int) -> dict[str, Any]:
    """Flip a route between two branches while sessions sit on the old one and a prober keeps connecting:
    ``runs`` times through the API call `tierbase route set` makes, then ``runs`` times with the command."""
    names = [f"rp-{secrets.token_hex(2)}", f"rp-{secrets.token_hex(2)}"]
    for name in names:
        sdk.create_branch(name, start=True)
        with psycopg.connect(replace(proxy, dbname=name).dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE marker (v text)")
            conn.execute("INSERT INTO marker VALUES (%s)", (name,))
    route = f"rp-route-{secrets.token_hex(2)}"
    sdk.set_route(route, names[0])
    on_route = replace(proxy, dbname=route)
    seen: list[tuple[float, str]] = []
    stop = threading.Event()

    def prober() -> None:
        while not stop.is_set():
            with suppress(psycopg.Error), psycopg.connect(on_route.dsn(), connect_timeout=30,
                                                          autocommit=True) as conn:
                row = conn.execute("SELECT v FROM marker").fetchone()
                seen.append((time.perf_counter(), str(row[0]) if row else ""))

    def flip(switch: Callable[[str, str], Any], new: str, out: dict[str, list[float]]) -> int:
        idle = [psycopg.connect(on_route.dsn(), autocommit=True) for _ in range(4)]
        for c in idle:
            c.execute("SELECT 1")
        time.sleep(0.1)
        t0 = time.perf_counter()
        got = switch(route, new)
        out["call"].append(time.perf_counter() - t0)
        deadline = time.perf_counter() + 10
        while not any(t > t0 and v == new for t, v in seen) and time.perf_counter() < deadline:
            time.sleep(0.001)
        first = min((t for t, v in seen if t > t0 and v == new), default=None)
        if first is None:
            raise RuntimeError(f"no new connection reached branch {new!r} within 10 s of the repoint")
        out["switch"].append(float(got["switch_ms"]) / 1000)
        out["visible"].append(first - t0)
        for c in idle:
            c.close()
        time.sleep(0.2)
        return int(got.get("sessions_ended", 0))

    ways: dict[str, Callable[[str, str], Any]] = {
        "api": sdk.set_route, "cli": lambda r, b: p.cli("route", "set", r, b)}
    result: dict[str, Any] = {"runs": runs, "sessions_ended": 0}
    probe = threading.Thread(target=prober, daemon=True)
    try:
        probe.start()
        flips = 0
        for how, switch in ways.items():
            out: dict[str, list[float]] = {"switch": [], "call": [], "visible": []}
            for _ in range(runs):
                flips += 1
                result["sessions_ended"] += flip(switch, names[flips % 2], out)
            result[how] = out
    finally:
        stop.set()
        probe.join(30)
    return result


# -- the tables ---------------------------------------------------------------------------------
def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def target(what: str, goal: str, measured: str, met: bool) -> dict[str, Any]:
    return {"target": what, "goal": goal, "measured": measured, "met": met}


def throughput_table(results: dict[tuple[str, int, str], list[Bench]], seconds: int, rounds: int,
                     scale: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows, targets = [], []
    for mix in MIXES:
        for clients in CLIENTS:
            tps = {w: mean([b.tps for b in results[(mix, clients, w)]]) for w in WAYS}
            lat = {w: mean([b.latency_ms for b in results[(mix, clients, w)]]) for w in WAYS}
            cpu = {w: mean([b.relay_us_per_tx for b in results[(mix, clients, w)]]) for w in WAYS}
            share = tps["proxy"] / tps["pgbouncer"]
            rows.append([mix, clients, round(tps["direct"]), round(lat["direct"], 3), round(tps["proxy"]),
                         round(lat["proxy"], 3), round(tps["pgbouncer"]), round(lat["pgbouncer"], 3),
                         f"{tps['proxy'] / tps['direct']:.0%}", f"{tps['pgbouncer'] / tps['direct']:.0%}",
                         f"{share:.0%}", round(cpu["proxy"]), round(cpu["pgbouncer"])])
            targets.append(target(f"pgbench {mix}, {clients} client{'s' if clients > 1 else ''}: proxy TPS",
                                  f">= {TPS_SHARE_MIN:.2f}x PgBouncer", f"{share:.2f}x", share >= TPS_SHARE_MIN))
    notes = [f"pgbench -M simple -T {seconds}, -j min(clients, cores), scale {scale} on a tierbase branch; each "
             f"cell is the mean of {rounds} run(s); the three ways run back to back (order reversed every round) "
             "so that they share the machine's state.",
             "One session per pgbench client for the whole run: after authentication the proxy is a bare byte "
             "relay, so this is the relay's cost; PgBouncer parses every message. On 2 cores shared by postgres, "
             "pgbench and the relay, the relay's CPU per transaction (the service process, all threads; "
             "PgBouncer) is what it takes from the other two."]
    return ({"title": "Proxy throughput: pgbench direct, through the service's proxy and through PgBouncer",
             "columns": ["workload", "clients", "direct TPS", "direct latency (ms)", "proxy TPS",
                         "proxy latency (ms)", "PgBouncer TPS", "PgBouncer latency (ms)", "proxy / direct",
                         "PgBouncer / direct", "proxy / PgBouncer", "proxy CPU per tx (us)",
                         "PgBouncer CPU per tx (us)"],
             "rows": rows, "notes": notes}, targets)


def connection_table(samples: dict[str, list[float]], conn_cpu: dict[str, float], per_conn: dict[str, Bench],
                     conn_seconds: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    direct = pct(samples["direct"], 0.5)
    rows = []
    for name, s in samples.items():
        tps = per_conn.get(name)
        relay = name != "direct"
        rows.append([name, ms(pct(s, 0.5)), ms(pct(s, 0.95)), len(s), f"{pct(s, 0.5) / direct:.2f}x",
                     round(conn_cpu[name] * 1000, 2) if relay else None,
                     round(tps.tps) if tps else None,
                     f"{tps.tps / per_conn['direct'].tps:.2f}x" if tps else None,
                     round(tps.relay_us_per_tx / 1000, 2) if tps and relay else None])
    ratio = pct(samples["proxy"], 0.5) / direct
    targets = [target("connect + SELECT 1: proxy p50", f"<= {CONNECT_RATIO_MAX}x direct p50",
                      f"{ratio:.2f}x ({ms(pct(samples['proxy'], 0.5))} ms vs {ms(direct)} ms)",
                      ratio <= CONNECT_RATIO_MAX)]
    notes = [f"connect + SELECT 1: {len(samples['direct'])} sequential psycopg connections per way (connect, "
             "SELECT 1, close), the ways interleaved; each client does the SCRAM-SHA-256 proof (4096 PBKDF2 "
             "iterations) whichever way it connects.",
             "direct: postgres authenticates the pe_ role (SCRAM over TCP) and forks a backend. proxy: the service "
             "authenticates the principal (SCRAM against its stored verifier), asks the policy (branch.connect, "
             "audited by window), resolves the route, then logs in to the compute over its unix socket as tb_owner "
             "(peer auth, a new backend per client connection). PgBouncer: answers SCRAM itself and hands the "
             "client a pooled server connection (no backend fork).",
             f"pgbench -C: select-only, 8 clients, -T {conn_seconds}, a new connection for every transaction "
             "(what an application without a pool of its own sees).",
             "sslmode=disable for all (the compute and PgBouncer have no TLS here); 'proxy (TLS)' is the proxy "
             "with sslmode=require, for the cost of the handshake.",
             "relay CPU: user + system CPU of the process between client and compute (the tierbase service, "
             "all its threads; PgBouncer) per connection, from /proc clock ticks summed over the run. Postgres's "
             "own backends and the clients are not in it."]
    return ({"title": "Connection setup: direct, through the service's proxy and through PgBouncer",
             "columns": ["way", "connect + SELECT 1 p50 (ms)", "p95 (ms)", "runs", "p50 / direct p50",
                         "relay CPU per connect (ms)", "pgbench -C TPS", "-C TPS / direct",
                         "-C relay CPU per connect (ms)"],
             "rows": rows, "notes": notes}, targets)


def timing_table(cold: list[float], rp: dict[str, Any]) -> dict[str, Any]:
    def row(what: str, samples: list[float], goal: str = "", met: bool | None = None) -> list[Any]:
        verdict = "" if met is None else (" (met)" if met else " (NOT met)")
        return [what, ms(pct(samples, 0.5)), ms(pct(samples, 0.95)), len(samples), goal + verdict]

    api, cli = rp["api"], rp["cli"]
    rows = [row("cold start: stopped compute -> first query answered via the proxy", cold, "p50 < 700 ms",
                pct(cold, 0.5) < 0.7),
            row("repoint, in the service: hold -> route changed -> old sessions ended -> release",
                api["switch"] + cli["switch"]),
            row("repoint, the API call (PUT /v1/routes/NAME)", api["call"]),
            row("repoint visible: API call start -> a new connection answered by the new branch", api["visible"],
                "p95 < 100 ms", pct(api["visible"], 0.95) < 0.1),
            row("repoint, the command `tierbase route set` (incl. its Python start-up)", cli["call"]),
            row("repoint visible: command start -> a new connection answered by the new branch", cli["visible"])]
    notes = ["cold start: `branch stop` through the API, then psycopg connects through the proxy (route = branch) "
             "and runs SELECT 1; the service's resolver starts the compute (pg_ctl start, wait for ready). The OS "
             "page cache stays warm between runs.",
             f"repoint: {2 * rp['runs']} flips of a route between two running branches ({rp['runs']} through the "
             f"API call that `tierbase route set` makes, {rp['runs']} with the command itself), with 4 idle "
             f"sessions on the old one and a prober connecting in a loop ({rp['sessions_ended']} sessions ended in "
             "all); 'visible' includes the call, one connection setup and up to one prober round.",
             "p95 interpolated between the closest ranks (close to the maximum with this few runs)."]
    return {"title": "Proxy cold start and repoint (through the service)",
            "columns": ["measure", "p50 (ms)", "p95 (ms)", "runs", "target"], "rows": rows, "notes": notes}


# -- the machine --------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu, mem = "unknown CPU", ""
    with suppress(OSError, StopIteration, ValueError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    with suppress(OSError, StopIteration, ValueError):
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal:"))
        mem = f", {kb / 2**20:.1f} GiB RAM"
    from importlib.metadata import version

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"machine": f"{os.cpu_count()} cores {cpu}{mem}, Linux {os.uname().release}",
            "postgres": run([find_binaries()["postgres"], "--version"]).stdout.strip(),
            "pgbouncer": run([PGBOUNCER, "--version"]).stdout.splitlines()[0].strip(),
            "pgbench": run(["pgbench", "--version"]).stdout.strip(),
            "python": f"{sys.version.split()[0]}, psycopg {version('psycopg')}, uvloop {version('uvloop')}",
            "tierbase": f"commit {commit or 'unknown'}"}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def caveats(load_start: str, quick: bool) -> dict[str, str]:
    """Say on the page when the numbers are a dry run's, or other work shared the machine."""
    one, cores = float(load_start.split()[0]), os.cpu_count() or 1
    said = []
    if quick:
        said.append("a dry run (--quick: pgbench -T 3, one round), to show that the benchmark works, not its "
                    "numbers")
    if one > 0.5 * cores:
        said.append(f"other work shared this machine (load average {one:.2f} on {cores} cores at the start), so "
                    "the numbers are noisy")
    return {"note": "; ".join(said) + ": re-run `python bench/proxy.py` on a quiet machine"} if said else {}


# -- main ---------------------------------------------------------------------------------------
def measure(p: Platform, args: argparse.Namespace) -> dict[str, Any]:
    p.cli("branch", "create", BRANCH, "--start")
    proxy = replace(Way.from_url("proxy", p.cli("branch", "url", BRANCH)["url"]), relay_pid=p.service_pid())
    direct = Way.from_url("direct", p.cli("branch", "url", BRANCH, "--direct")["url"])
    log(f"pgbench -i -s {args.scale} on branch {BRANCH!r} (direct, as {direct.user})")
    run(["pgbench", "-i", "-q", "-s", str(args.scale), *direct.pgbench_args(), direct.dbname], env=direct.env(),
        timeout=900)
    sockets = p.home / "sockets"  # where the service's computes listen (0700, the compute user's)
    with pgbouncer(sockets, direct.port, proxy.user, scram_verifier(proxy.password), BRANCH) as (bport, bpid):
        bouncer = Way("pgbouncer", "127.0.0.1", bport, proxy.user, proxy.password, BRANCH, relay_pid=bpid)
        ways = {"direct": direct, "proxy": proxy, "pgbouncer": bouncer}
        log("warm-up")
        for w in ways.values():
            pgbench(w, ["-S"], 2, 2)
        log(f"connect + SELECT 1, {args.connects} per way")
        samples, conn_cpu = connects([*ways.values(), proxy.with_tls()], args.connects)
        for name, s in samples.items():
            log(f"  {name:11} p50 {ms(pct(s, 0.5))} ms p95 {ms(pct(s, 0.95))} ms, relay CPU "
                f"{ms(conn_cpu[name])} ms per connection")
        per_conn: dict[str, Bench] = {}
        for name, w in ways.items():
            per_conn[name] = pgbench(w, ["-S", "-C"], 8, args.connect_seconds)
            log(f"  pgbench -C {name:9} {per_conn[name].tps:9.0f} TPS, relay CPU "
                f"{per_conn[name].relay_us_per_tx / 1000:.2f} ms per connection")
        results: dict[tuple[str, int, str], list[Bench]] = {}
        for rnd in range(args.rounds):
            order = list(WAYS) if rnd % 2 == 0 else list(reversed(WAYS))
            for mix, flags in MIXES.items():
                for clients in CLIENTS:
                    for name in order:
                        got = pgbench(ways[name], flags, clients, args.seconds)
                        results.setdefault((mix, clients, name), []).append(got)
                        log(f"round {rnd + 1} {mix:11} {clients} clients {name:9} "
                            f"{got.tps:9.0f} TPS {got.latency_ms:.3f} ms, relay CPU {got.relay_us_per_tx:.0f} us/tx")
    sdk = Client(p.home, token=p.token)
    try:
        log("cold starts through the proxy")
        cold = cold_starts(sdk, proxy, args.cold_runs)
        log(f"  cold start p50 {ms(pct(cold, 0.5))} ms")
        log("repoint through the API")
        rp = repoints(sdk, p, proxy, args.repoint_runs)
        log(f"  repoint visible p50 {ms(pct(rp['api']['visible'], 0.5))} ms (API), "
            f"{ms(pct(rp['cli']['visible'], 0.5))} ms (`tierbase route set`)")
    finally:
        sdk.close()
    return {"samples": samples, "conn_cpu": conn_cpu, "per_conn": per_conn, "results": results, "cold": cold,
            "repoint": rp, "users": {"direct": direct.user, "proxy": proxy.user}}


def document(m: dict[str, Any], args: argparse.Namespace, started: float, load_start: str) -> dict[str, Any]:
    conn_table, conn_targets = connection_table(m["samples"], m["conn_cpu"], m["per_conn"], args.connect_seconds)
    tput_table, tput_targets = throughput_table(m["results"], args.seconds, args.rounds, args.scale)
    targets = conn_targets + tput_targets
    met = sum(t["met"] for t in targets)
    log(f"targets met: {met} of {len(targets)}")
    for t in targets:
        log(f"  {'met    ' if t['met'] else 'NOT met'} {t['target']} {t['goal']}: {t['measured']}")
    return {
        "title": "Proxy",
        "targets": targets,
        "tables": [conn_table, tput_table, timing_table(m["cold"], m["repoint"])],
        "meta": {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), **machine(),
                 "cmd": "python bench/proxy.py " + " ".join(sys.argv[1:]),
                 "requires": "root (loop-mounts a btrfs image), pgbench, pgbouncer (Debian package)",
                 "platform": "started with `tierbase up --storage btrfs --idle-timeout 0`, stopped with "
                             "`tierbase down --purge`; the proxy measured is the service's",
                 "logins": f"direct as {m['users']['direct']}; proxy and PgBouncer as principal "
                           f"{m['users']['proxy']}, then tb_owner on the compute",
                 "duration_s": round(time.time() - started), "load_average_at_start": load_start,
                 "load_average_at_end": load(), "quick": bool(args.quick), **caveats(load_start, args.quick)},
        "raw": {"connect_s": m["samples"],
                "relay_cpu_per_connect_s": m["conn_cpu"],
                "pgbench_connect_per_transaction": {k: v.__dict__ for k, v in m["per_conn"].items()},
                "pgbench": [{"mix": k[0], "clients": k[1], "way": k[2], "tps": [b.tps for b in v],
                             "latency_ms": [b.latency_ms for b in v], "transactions": [b.transactions for b in v],
                             "relay_cpu_s": [b.relay_cpu_s for b in v]} for k, v in m["results"].items()],
                "cold_start_s": m["cold"], "repoint": m["repoint"]},
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results JSON (default {RESULTS.relative_to(REPO)}/proxy.json; --quick: {QUICK_OUT})")
    ap.add_argument("--quick", action="store_true", help="a dry run: -T 3, one round, fewer samples")
    ap.add_argument("--seconds", type=int, default=None, help="pgbench -T of each run (default 15; --quick 3)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of each (mix, clients, way) cell (default 2)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale (default 10)")
    ap.add_argument("--connects", type=int, default=None, help="connect + SELECT 1 per way (default 200)")
    ap.add_argument("--connect-seconds", type=int, default=None, help="pgbench -C -T (default 10; --quick 3)")
    ap.add_argument("--cold-runs", type=int, default=None, help="default 10; --quick 3")
    ap.add_argument("--repoint-runs", type=int, default=None, help="default 10; --quick 3")
    ap.add_argument("--btrfs-size", default="4G")
    ap.add_argument("--no-report", action="store_true", help="write the JSON only, not docs/benchmarks.md")
    args = ap.parse_args(argv)
    quick = args.quick
    if args.out is None:  # a dry run's noisy numbers must not land on the published page by default
        args.out, args.no_report = (QUICK_OUT, True) if quick else (RESULTS / "proxy.json", args.no_report)
    for name, full, dry in (("seconds", 15, 3), ("rounds", 2, 1), ("connects", 200, 200),
                            ("connect_seconds", 10, 3), ("cold_runs", 10, 3), ("repoint_runs", 10, 3)):
        if getattr(args, name) is None:
            setattr(args, name, dry if quick else full)
    if min(args.seconds, args.rounds, args.connects, args.connect_seconds, args.cold_runs, args.repoint_runs) < 1:
        ap.error("every count and duration must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        raise SystemExit("Error: the benchmark must run as root. It loop-mounts a btrfs image and runs "
                         "PgBouncer as postgres: run it with sudo.")
    if not Path(PGBOUNCER).exists():
        raise SystemExit(f"Error: {PGBOUNCER} is missing. Install it (Debian: `apt-get install pgbouncer`).")
    if shutil.which("pgbench") is None:
        raise SystemExit("Error: pgbench is not on PATH. Install it (Debian: `apt-get install postgresql-client`).")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: `tierbase down --purge`
    started, load_start = time.time(), load()
    try:
        with platform(args.btrfs_size) as p:
            m = measure(p, args)
    except (RuntimeError, psycopg.Error, TierbaseError) as err:
        print(f"Error: the benchmark stopped: {err}", file=sys.stderr)
        return 1
    doc = document(m, args, started, load_start)
    write_results(doc, args.out, report=not args.no_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
