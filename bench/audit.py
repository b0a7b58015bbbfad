"""Benchmark: what anchoring the audit chain's head outside meta.db adds to an append.

    python bench/audit.py [--appends 100] [--rounds 3] [--out bench/results/audit.json] [--no-report]

No root, no Postgres: a throwaway meta.db and audit.head in a temp dir (default /tmp,
the filesystem a data dir lives on here). Round robin, append by append, so that other
work on the machine hits every variant alike, it times single appends of:

* chain only: the SQLite transaction of ``AuditLog`` (INSERT + head row, COMMIT with
  ``synchronous=FULL``), no head file, no lock;
* two-slot head file (what tierbase does): flock, the transaction, then ``pwrite`` of
  the signed head into slot ``id % 2`` and one ``fdatasync``;
* append-only head log: the same, but the signed head appended to a growing file;
* rename: the same, but the head written to a temp file, fsynced, renamed over the
  head file, and the directory fsynced;

then each head write alone (no SQLite), the two-slot variant with 4 threads appending at once, a folded failure
(``note_failure`` after the first of its minute) and ``verify`` of the chain written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform as host
import shlex
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import log, pct, write_results  # noqa: E402
from tierbase.control.store import Store  # noqa: E402
from tierbase.governance.anchor import MAGIC, Head, HeadFile  # noqa: E402
from tierbase.governance.audit import AuditLog  # noqa: E402

KEY = b"bench-audit-key"


class LogHead(HeadFile):
    """The alternative: every head appended to a log (a torn tail line leaves the earlier ones)."""

    def write(self, fd: int, head: Head) -> None:
        out = os.open(self.path.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(out, f"{MAGIC} {head.id} {head.hash} {self._mac(head.id, head.hash)}\n".encode())
            os.fdatasync(out)
        finally:
            os.close(out)


class RenameHead(HeadFile):
    """The alternative: a whole new head file each time, renamed into place."""

    def write(self, fd: int, head: Head) -> None:
        target = self.path.with_suffix(".renamed")
        tmp = target.with_suffix(".tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(out, f"{MAGIC} {head.id} {head.hash} {self._mac(head.id, head.hash)}\n".encode())
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(tmp, target)
        d = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(d)
        finally:
            os.close(d)


def one(log_: AuditLog, i: int) -> None:
    log_.append(actor="bench", action="bench.append", target=f"t{i}", allowed=True, reason="benchmark")


def chain_only(log_: AuditLog, i: int) -> None:
    log_._insert(actor="bench", action="bench.append", target=f"t{i}", allowed=True, reason="benchmark",
                 outcome="ok", before=None, after=None)


def once(fn: Callable[[int], None], i: int) -> float:
    t0 = time.perf_counter()
    fn(i)
    return time.perf_counter() - t0


def timed(fn: Callable[[int], None], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def threaded(log_: AuditLog, threads: int, each: int) -> float:
    """Appends per second with ``threads`` appending at once."""
    workers = [threading.Thread(target=lambda: [one(log_, i) for i in range(each)]) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return threads * each / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--appends", type=int, default=100, help="appends per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp", help="where the throwaway meta.db and head file go")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "audit.json")
    ap.add_argument("--no-report", action="store_true", help="do not re-render docs/benchmarks.md")
    args = ap.parse_args(argv)
    started = time.time()
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="tierbase-bench-audit-", dir=args.dir) as tmp:
        stores = {name: Store(Path(tmp) / f"{name}.db") for name in ("chain", "slots", "log", "rename")}
        logs = {name: AuditLog(store, KEY, head=Path(tmp) / f"{name}.head") for name, store in stores.items()}
        logs["log"].head = LogHead(logs["log"].head.path, KEY)
        logs["rename"].head = RenameHead(logs["rename"].head.path, KEY)
        variants: dict[str, Callable[[int], None]] = {
            "chain only (no head file)": lambda i: chain_only(logs["chain"], i),
            "two-slot head file (tierbase)": lambda i: one(logs["slots"], i),
            "append-only head log": lambda i: one(logs["log"], i),
            "head file by temp + rename": lambda i: one(logs["rename"], i),
        }
        samples: dict[str, list[float]] = {k: [] for k in variants}
        alone: dict[str, list[float]] = {k: [] for k in variants if k != "chain only (no head file)"}
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: {args.appends} appends per variant")
            # round robin append by append: other work on the machine (fsync latency swings by 10x here
            # when other test suites run) then hits every variant alike
            for i in range(args.appends):
                for name, fn in variants.items():
                    samples[name].append(once(fn, i))
        # the head write alone, without the SQLite transaction around it
        heads = dict(zip(alone, (logs["slots"].head, logs["log"].head, logs["rename"].head), strict=True))
        for i in range(args.rounds * args.appends):
            for name, head in heads.items():
                with head.locked(True) as fd:
                    alone[name].append(once(lambda n, head=head, fd=fd: head.write(fd, Head(n, "0" * 64)), 10_000 + i))
        rate = threaded(logs["slots"], 4, args.appends // 4)
        audit = logs["slots"]
        audit.note_failure("10.0.0.1", "anonymous", "auth", "bad")
        folded = timed(lambda i: audit.note_failure("10.0.0.1", "anonymous", "auth", "bad"), 10_000)
        audit.flush()
        records = stores["slots"].db.execute("SELECT count(*) FROM audit").fetchone()[0]
        t0 = time.perf_counter()
        assert audit.verify().ok
        verify_s = time.perf_counter() - t0
        for store in stores.values():
            store.close()
    base = pct(samples["chain only (no head file)"], 0.5)
    rows: list[list[Any]] = []
    for name, s in samples.items():
        p50 = pct(s, 0.5)
        head_alone = us(pct(alone[name], 0.5)) if name in alone else None
        rows.append([name, us(p50), us(pct(s, 0.95)), round(1 / (sum(s) / len(s))), us(p50 - base), head_alone])
    doc = {
        "title": "Audit append",
        "tables": [{
            "title": "Audit append: anchoring the head outside meta.db",
            "columns": ["variant", "append p50 (us)", "append p95 (us)", "appends/s (one thread)",
                        "added over chain only, p50 (us)", "head write alone, p50 (us)"],
            "rows": rows,
            "notes": [
                f"{len(samples['chain only (no head file)'])} appends per variant in {args.rounds} rounds, "
                f"interleaved append by append; meta.db in WAL mode with synchronous={_sync(Path(args.dir))} "
                "(its COMMIT is already one fsync), on the same filesystem as the head file.",
                "Every anchored variant holds an exclusive flock on the head file from before BEGIN IMMEDIATE "
                "to after the head write, and writes the head after COMMIT (the head is never ahead).",
                f"Two-slot head file, 4 threads appending at once: {rate:,.0f} appends/s.",
                f"A failure folded into its minute's summary (note_failure after the first): "
                f"{us(pct(folded, 0.5))} us p50; verify of the {records:,} records written: "
                f"{verify_s * 1000:.0f} ms.",
                "Whole appends swing with the machine's load (fsync latency; see p95), so the head write alone "
                "(lock held, no SQLite) is the cleaner comparison of the three ways: "
                + ", ".join(f"{name} {us(pct(v, 0.5))} us" for name, v in alone.items()) + " (p50).",
                "Picked: the two-slot head file. Like the log it pays one flush per append, but it is a fixed "
                "8 KiB file whose writes land on allocated pages (no size change, nothing to compact or rotate), "
                "and a torn write loses only the slot being written; the log grows by a line per record; "
                "temp + rename pays two fsyncs and a rename.",
            ],
        }],
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{host.machine()}, {os.cpu_count()} cores, Linux {os.uname().release}",
            "sqlite": sqlite3.sqlite_version,
            "cmd": shlex.join(["python", "bench/audit.py", *(sys.argv[1:] if argv is None else argv)]),
            "duration_s": round(time.time() - started, 1),
            "load_average_at_start": load_at_start,
        },
        "raw": {k: [us(x) for x in v] for k, v in samples.items()},
        "raw_head_alone": {k: [us(x) for x in v] for k, v in alone.items()},
    }
    write_results(doc, args.out, report=not args.no_report)
    return 0


def _sync(where: Path) -> str:
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        db = sqlite3.connect(Path(tmp) / "x.db")
        db.execute("PRAGMA journal_mode=WAL")
        value = int(db.execute("PRAGMA synchronous").fetchone()[0])
        db.close()
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(value, str(value))


if __name__ == "__main__":
    raise SystemExit(main())
