"""Statements a principal sends through the API, run on a compute in one transaction (app_sql.py).

The facade has decided who may run them and as which fixed role; this module runs them over that
role's conninfo with a per-statement ``statement_timeout`` and a watchdog that cancels on the
compute when the whole call runs past its limit. The last statement's rows are streamed and cut at
the row cap or the byte cap, and the answer says so.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import json
import threading
import uuid
from collections.abc import Generator
from typing import Any, cast

import pglast
import psycopg

from ..errors import SqlFailed, SqlTimeout

#: the JSON of one answer stays under this, whatever the row cap: a huge row set is cut, and said so
MAX_RESULT_BYTES = 4 * 1024 * 1024


def execute(dsn: str, pieces: list[str], params: list[Any] | None, *, max_rows: int,
            timeout_s: float) -> dict[str, Any]:
    """Every statement in one transaction; the last one's rows streamed up to the caps."""
    ms = max(1, int(timeout_s * 1000))
    try:
        conn = psycopg.connect(dsn, connect_timeout=10, options=f"-c statement_timeout={ms}")
    except psycopg.Error as err:
        raise SqlFailed(f"cannot connect to the branch's compute: {_first_line(err)}",
                        "Retry in a few seconds; `tierbase branch show NAME` shows its state") from err
    # the per-statement limit is Postgres's own; the watchdog also bounds the call as a whole
    watchdog = threading.Timer(timeout_s + 1.0, _cancel, (conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        with conn:  # commit when every statement ran, roll back otherwise
            cur = conn.cursor()
            for piece in pieces[:-1]:
                cur.execute(piece.encode(), prepare=False)
            out = _rows(cur, pieces[-1], params, max_rows)
            # a cut stream is cancelled on the compute, which aborts the transaction: say it was not kept
            out["committed"] = conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR
            return out
    except psycopg.errors.QueryCanceled as err:
        raise SqlTimeout(f"the statement ran past the time limit of {timeout_s:g} s and was cancelled on the "
                         "compute; nothing of this call was kept",
                         "Make the query cheaper (an index, a LIMIT) or pass a larger timeout_s") from err
    except psycopg.Error as err:
        raise SqlFailed(f"Postgres refused the SQL: {_first_line(err)}; nothing of this call was kept",
                        "Fix the statement and send it again", sqlstate=err.sqlstate) from err
    finally:
        watchdog.cancel()
        conn.close()


def _rows(cur: psycopg.Cursor[Any], last: str, params: list[Any] | None, max_rows: int) -> dict[str, Any]:
    rows: list[list[Any]] = []
    size, truncated, why = 0, False, None
    columns: list[str] = []
    query = last if params else last.encode()
    if not _yields_rows(last):  # DDL, a plain INSERT: nothing to stream (stream() wants a row set)
        cur.execute(query, params or None, prepare=False)
        return {"columns": [], "rows": [], "row_count": 0, "truncated": False, "status": cur.statusmessage,
                "rowcount": cur.rowcount}
    stream = cast(Generator[Any, None, None], cur.stream(query, params or None))
    for row in stream:
        if not columns and cur.description:
            columns = [c.name for c in cur.description]
        if len(rows) >= max_rows:
            truncated, why = True, f"more than max_rows={max_rows} rows"
            break
        values = [_jsonable(v) for v in row]
        size += len(json.dumps(values, default=str))
        if size > MAX_RESULT_BYTES:
            truncated, why = True, f"more than {MAX_RESULT_BYTES // 1024 // 1024} MiB of rows"
            break
        rows.append(values)
    stream.close()  # cancels the rest of a cut result on the compute (psycopg's own early exit)
    if cur.description and not columns:
        columns = [c.name for c in cur.description]
    out: dict[str, Any] = {"columns": columns, "rows": rows, "row_count": len(rows), "truncated": truncated,
                           "status": cur.statusmessage}
    if truncated:
        out["truncated_because"] = f"the result had {why}: only the first {len(rows)} are here"
    return out


def _yields_rows(statement: str) -> bool:
    """Whether a statement returns rows (a query, RETURNING, EXPLAIN, SHOW), by Postgres's own parser."""
    try:
        (raw,) = pglast.parse_sql(statement)
    except (pglast.parser.ParseError, ValueError):
        return True  # let Postgres say what is wrong with it, through the streaming path
    node = raw.stmt
    if isinstance(node, pglast.ast.SelectStmt):
        return node.intoClause is None
    if isinstance(node, pglast.ast.InsertStmt | pglast.ast.UpdateStmt | pglast.ast.DeleteStmt):
        return bool(getattr(node, "returningClause", None) or getattr(node, "returningList", None))
    return isinstance(node, pglast.ast.ExplainStmt | pglast.ast.VariableShowStmt | pglast.ast.FetchStmt)


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, dt.date | dt.time | dt.datetime):
        return v.isoformat()
    if isinstance(v, bytes | memoryview):
        return {"base64": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, uuid.UUID | dt.timedelta):
        return str(v)
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _cancel(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(Exception):  # the connection may be gone already: nothing left to cancel
        conn.cancel_safe(timeout=5)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
