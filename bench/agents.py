"""Simulated coding agents on one platform: MCP tool calls, leased branches, pooled connections.

    python bench/agents.py --out bench/results/agents.json              # levels 2,5,10 agents x 45 s (~8 min)
    python bench/agents.py --levels 2 --seconds 15 --out /tmp/agents.json   # a dry run

Each agent is an MCP client (the SDK's own) of its own `tierbase mcp` process (stdio), acting as an
agent principal of its own, and loops: ``session_start`` (a leased branch off the entry tier),
``migration_apply``, 100 queries through the branch's pooled URL (10 connections x 10 queries),
``run_sql`` and ``schema_diff`` through the tools, ``session_end``. Measured per level: tool-call
latency p50/p95 (each tool, and all), loops done, errors, branches and running computes (sampled),
and the memory (PSS) of an idle and of a busy compute. Then 500 clients at once against one
branch: the pooled URL (proxy -> PgBouncer -> compute), the session URL (proxy -> compute, one
backend each: Postgres's max_connections stops it), and PgBouncer alone (transaction pooling,
SCRAM, no proxy) in the same run.

The issue asks for 50 agents for 10 minutes; this machine has 2 cores shared with other work, so the
levels and the length are arguments and the results say what was run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

from bench.common import free_port, log, ms, pct, write_results  # noqa: E402
from bench.proxy_platform import Platform, platform, wait_port  # noqa: E402
from tierbase.api.client import Client as Sdk  # noqa: E402
from tierbase.governance.principals import scram_verifier  # noqa: E402

CONFIG = """
[tiers.production]
protected = true

[tiers.staging]
parent = "production"
protected = true
entry = true
"""
MIGRATION = {"V0001__notes.sql": "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL);\n"}
QUERIES, CONNECTIONS = 100, 10
#: tools that only read or answer from the platform's metadata (no fork, no compute start or stop, no DDL)
LIGHT = ("connection_string", "run_sql")


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def compute_pids(home: Path, port: int) -> list[int]:
    """The postmaster on ``port`` of this data dir and its children (backends, background workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(home) in cmd and f"-p {port}" in cmd and "postgres" in cmd:
                    pids.append(int(proc.name))
    kids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid in pids:
                    kids.append(int(proc.name))
    return pids + kids


class Stats:
    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.loops = 0
        self.samples: list[tuple[int, int]] = []
        self.load: list[float] = []  # the machine's 1-minute load average: other work on it shows here


async def tool(client: Client, stats: Stats, name: str, args: dict[str, Any]) -> Any:
    t0 = time.perf_counter()
    res = await client.call_tool(name, args)
    stats.calls[name].append(time.perf_counter() - t0)
    if res.is_error:
        raise RuntimeError(f"{name}: {getattr(res.content[0], 'text', res) if res.content else res}")
    got = res.structured_content
    return got["result"] if isinstance(got, dict) and set(got) == {"result"} else got


async def agent_loop(p: Platform, token: str, stats: Stats, until: float) -> None:
    env = {"TIERBASE_API": p.up_info["api_url"], "TIERBASE_TOKEN": token, "HOME": str(p.root),
           "PYTHONPATH": p.env["PYTHONPATH"]}
    params = StdioServerParameters(command=sys.executable, args=["-m", "tierbase.cli.main", "mcp"], env=env)
    async with Client(params, read_timeout_seconds=300) as client:
        while time.monotonic() < until:
            try:
                lease = await tool(client, stats, "session_start", {"ttl": "10m"})
                branch = lease["branch"]
                await tool(client, stats, "migration_apply", {"branch": branch, "files": MIGRATION})
                url = (await tool(client, stats, "connection_string", {"branch": branch, "pooled": True}))["url"]
                for c in range(CONNECTIONS):
                    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                        for q in range(QUERIES // CONNECTIONS):
                            i = c * 100 + q
                            await conn.execute("INSERT INTO notes VALUES (%s, 'n') ON CONFLICT DO NOTHING", (i,),
                                               prepare=False)
                await tool(client, stats, "run_sql", {"branch": branch, "sql": "SELECT count(*) FROM notes"})
                await tool(client, stats, "schema_diff", {"a": branch})
                await tool(client, stats, "session_end", {"session_id": lease["id"]})
                stats.loops += 1
            except Exception as err:  # counted, and the agent goes on as a real one would
                stats.errors.append(f"{type(err).__name__}: {str(err)[:200]}")


async def sampler(pe: Sdk, stats: Stats, until: float) -> None:
    while time.monotonic() < until:
        with suppress(Exception):
            st = await asyncio.to_thread(pe.status)
            stats.samples.append((int(st["branches"]), int(st["computes_running"])))
            stats.load.append(os.getloadavg()[0])
        await asyncio.sleep(2)


def run_level(p: Platform, pe: Sdk, tokens: list[str], seconds: float) -> Stats:
    stats = Stats()

    async def go() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(sampler(pe, stats, until), *(agent_loop(p, t, stats, until) for t in tokens))

    asyncio.run(go())
    return stats


# -- 500 clients -----------------------------------------------------------------------------------------
@contextmanager
def pgbouncer_alone(sockets: Path, compute_port: int, user: str, password: str) -> Iterator[int]:
    """PgBouncer by itself on TCP (transaction pooling, SCRAM against the principal's verifier) in front of
    the compute's unix socket as tb_owner: the same pool settings as the platform's pooler."""
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="tierbase-bench-agents-pgb-"))
    (work / "users.txt").write_text(f'"{user}" "{scram_verifier(password)}"\n')
    (work / "pgb.ini").write_text(f"""[databases]
* = host={sockets} port={compute_port} dbname=postgres user=tb_owner

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {work}/users.txt
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 20
log_connections = 0
log_disconnections = 0
logfile = {work}/pgb.log
pidfile = {work}/pgb.pid
""")
    for f in [work, *work.iterdir()]:
        shutil.chown(f, "postgres", "postgres")
    proc = subprocess.Popen(["pgbouncer", str(work / "pgb.ini")], user="postgres", group="postgres", extra_groups=[],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def many_clients(url: str, clients: int, queries: int) -> dict[str, Any]:
    """``clients`` connections at once (50 connecting at a time), each running ``queries`` SELECTs, all held."""
    lat: list[float] = []
    errors: list[str] = []

    async def go() -> float:
        gate = asyncio.Semaphore(50)

        async def one() -> psycopg.AsyncConnection[Any] | None:
            async with gate:
                try:
                    return await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=60)
                except psycopg.Error as err:
                    errors.append(str(err).strip().splitlines()[0][:160])
                    return None

        t0 = time.perf_counter()
        conns = [c for c in await asyncio.gather(*(one() for _ in range(clients))) if c is not None]

        async def work(c: psycopg.AsyncConnection[Any]) -> None:
            for _ in range(queries):
                t = time.perf_counter()
                await c.execute("SELECT 1", prepare=False)
                lat.append(time.perf_counter() - t)

        try:
            await asyncio.gather(*(work(c) for c in conns))
        finally:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        return time.perf_counter() - t0

    wall = asyncio.run(go())
    connected = clients - len(errors)
    return {"connected": connected, "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall, 2), "qps": round(len(lat) / wall, 1) if wall else None,
            "p50_ms": ms(pct(lat, 0.5)) if lat else None, "p95_ms": ms(pct(lat, 0.95)) if lat else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="2,5,10",
                    help="agent counts to run, comma-separated; N or NxSECONDS (e.g. 1,5,10,25,50x600)")
    ap.add_argument("--seconds", type=float, default=45, help="length of each level")
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("/tmp/tierbase-bench-agents.json"))
    args = ap.parse_args(argv)
    plan = [(int(n), float(sec) if sec else args.seconds)
            for n, _, sec in (x.strip().partition("x") for x in args.levels.split(","))]
    levels = [n for n, _ in plan]
    rows: list[list[Any]] = []
    raw: dict[str, Any] = {}
    loads: list[float] = []
    with platform("4G", "--pool-port", str(free_port()), "--idle-timeout", "60") as p:
        pe = Sdk(p.home, url=p.up_info["api_url"], token=p.token)
        pe.apply_config(CONFIG, "bench")
        tokens = [pe.create_principal(f"agent-{i}", "agent")["token"] for i in range(max(levels))]
        for n, seconds in plan:
            log(f"{n} agents for {seconds:.0f} s")
            st = run_level(p, pe, tokens[:n], seconds)
            every = [x for v in st.calls.values() for x in v]
            light = [x for k in LIGHT for x in st.calls.get(k, [])]
            rows.append([n, seconds, st.loops, len(every), ms(pct(every, 0.5)) if every else None,
                         ms(pct(every, 0.95)) if every else None, ms(pct(light, 0.95)) if light else None,
                         max((b for b, _ in st.samples), default=None), max((c for _, c in st.samples), default=None),
                         len(st.errors)])
            raw[str(n)] = {"per_tool_p50_p95_ms": {k: [ms(pct(v, 0.5)), ms(pct(v, 0.95))] for k, v in st.calls.items()},
                           "errors": st.errors[:20], "load_average_1m_max": max(st.load, default=None)}
            loads.append(max(st.load, default=0.0))
            log(f"  {rows[-1]}")
        # memory: an idle compute (started, no client) and a busy one (8 clients in transactions)
        bot = Sdk(p.home, url=p.up_info["api_url"], token=tokens[0])
        b = bot.create_branch("mem-probe")
        bot.start_branch("mem-probe")
        time.sleep(2)
        idle_kib = pss_kib(compute_pids(p.home, b["port"]))
        url = bot.branch_url("mem-probe")
        conns = [psycopg.connect(url, autocommit=True) for _ in range(8)]
        for c in conns:
            c.execute("SELECT count(*) FROM generate_series(1, 200000)")
        busy_kib = pss_kib(compute_pids(p.home, b["port"]))
        for c in conns:
            c.close()
        # 500 clients on one branch: pooled, session (direct through the proxy), PgBouncer alone
        bot.run_sql("mem-probe", "SELECT 1")
        pooled, session = bot.branch_url("mem-probe", pooled=True), bot.branch_url("mem-probe")
        d = conninfo_to_dict(session)
        sockets = p.home / "sockets"
        ways = []
        for name, target in (("tierbase pooled URL (proxy -> PgBouncer -> compute)", pooled),
                             ("tierbase session URL (proxy -> compute)", session)):
            log(f"{args.clients} clients: {name}")
            ways.append([name, *many_clients(target, args.clients, 20).values()])
        with pgbouncer_alone(sockets, b["port"], str(d["user"]), str(d["password"])) as port:
            alone = make_conninfo(host="127.0.0.1", port=port, user=str(d["user"]), password=str(d["password"]),
                                  dbname="postgres", sslmode="disable")
            log(f"{args.clients} clients: PgBouncer alone")
            got = many_clients(alone, args.clients, 20)
            ways.append(["PgBouncer alone (transaction pooling, SCRAM)", *got.values()])
        bot.delete_branch("mem-probe")
    best = max((r[0] for r in rows if r[5] is not None and r[5] < 1000 and r[9] == 0), default=None)
    best_light = max((r[0] for r in rows if r[6] is not None and r[6] < 1000 and r[9] == 0), default=None)
    full = next((r for r in rows if r[0] >= 50 and r[1] >= 600), None)
    doc = {
        # the issue's targets: 50 agents for 10 minutes with 0 errors, and 500 clients on one branch; the most
        # agents whose p95 stays under 1 s is a number it asks to report, not a goal it sets
        "targets": [{"target": "50 agents x 10 min (session loops), errors", "goal": "0",
                     "measured": (f"{full[9]} errors in {full[3]} tool calls, {full[2]} loops" if full else
                                  "not run (no level of 50 agents for 600 s or more)"),
                     "met": bool(full and full[9] == 0)},
                    {"target": f"{args.clients} clients on one branch through the pooled URL",
                     "goal": f"{args.clients} connected, 0 errors",
                     "measured": f"{ways[0][1]} connected, {ways[0][2]} errors",
                     "met": ways[0][1] == args.clients and ways[0][2] == 0}],
        "reported": {"most agents whose p95 tool call stays under 1 s (0 errors)": best,
                     "most agents whose p95 of the light tools stays under 1 s (0 errors)": best_light},
        "tables": [
            {"title": "Simulated agents (MCP over stdio, one `tierbase mcp` per agent, leased branches)",
             "columns": ["agents", "seconds", "loops", "tool calls", "p50 ms", "p95 ms", "p95 ms light tools",
                         "branches (max)",
                         "computes running (max)", "errors"],
             "rows": rows,
             "notes": [f"a loop: session_start, migration_apply, {QUERIES} queries over {CONNECTIONS} pooled "
                       "connections, run_sql, schema_diff, session_end; every agent a principal of its own",
                       f"run at {', '.join(f'{n} agents x {sec:.0f} s' for n, sec in plan)} on this 2-core "
                       "machine; the per-tool p50/p95 are in the JSON (raw)",
                       f"the machine's 1-minute load average reached {max(loads, default=0):.1f} during the levels "
                       f"({os.cpu_count()} CPUs; the agents' own MCP processes and clients run on them too): "
                       "latencies include waiting for a CPU",
                       "the most agents whose p95 tool call stayed under 1 s with 0 errors: "
                       f"{best or 'none of the levels'}; counting only the light tools: {best_light or 'none'}",
                       "light tools: run_sql and connection_string (no fork, no compute start or stop, no DDL); "
                       "the others wait on the platform's own work (a branch fork and compute start, migrations, "
                       "pg_dump for the diff, a compute stop and volume delete)"]},
            {"title": "Memory of one compute (PSS, postmaster + its processes)",
             "columns": ["state", "MiB"],
             "rows": [["stopped (suspended, the default after the idle timeout)", 0.0],
                      ["idle (running, no client)", round(idle_kib / 1024, 1)],
                      ["busy (8 clients, after a query each)", round(busy_kib / 1024, 1)]],
             "notes": ["PSS shares shared_buffers pages among the processes touching them, so the sum is the "
                       "compute's own cost"]},
            {"title": f"{args.clients} clients at once on one branch, 20 SELECTs each",
             "columns": ["way", "connected", "errors", "first error", "wall s", "queries/s", "p50 ms", "p95 ms"],
             "rows": ways,
             "notes": ["clients connect 50 at a time and all stay connected until every one has run its queries",
                       "the session URL gives each client a backend of its own, so the compute's max_connections "
                       "refuses the rest: that is what the pooled URL is for"]},
        ],
        "raw": raw,
        "meta": {"cmd": f"python bench/agents.py --levels {args.levels} --out bench/results/agents.json",
                 "date": dt.date.today().isoformat(), "levels": levels, "seconds": [sec for _, sec in plan],
                 "cpus": os.cpu_count()},
    }
    write_results(doc, args.out, report=args.out.resolve().parent == (REPO / "bench" / "results"))
    print(json.dumps(doc["targets"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
