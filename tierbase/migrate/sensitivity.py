"""What a change does to masked data, read from its migration files with pglast (no database needed).

* **derived**: a column filled from a masked column (``UPDATE t SET x = f(email)``,
  ``INSERT INTO r (x) SELECT email ...``, ``CREATE TABLE a AS SELECT lower(email) AS x ...``, a
  trigger function assigning ``NEW.x := f(NEW.email)``; also when read through a CTE, a subquery
  in FROM, a UNION or a ``*``) inherits the source's rule: masking
  replaces the source's values, so a copy made in production would otherwise stay raw on every
  masked branch. Chains follow (a copy of a copy), in file order.
* **unclassified**: a column added to a table declared sensitive (``ALTER TABLE ... ADD COLUMN``,
  ``CREATE TABLE``) that no rule, ``safe`` declaration or derivation classifies.
* **moved**: a masked column renamed (its rule follows the new name) or dropped (its rule is
  retired), so the rules migrate with the schema.

Views and materialized views need nothing: views read the masked tables, and materialized
views are refreshed after masking. Names resolve against every relation the statement names
(an over-approximation: a column that might come from a masked one counts as derived).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pglast
from pglast import ast
from pglast.enums import AlterTableType, ObjectType

Col = tuple[str, str, str]  # schema, table, column


@dataclass(frozen=True)
class Derived:
    target: Col
    source: Col
    method: str
    where: str  # file:line
    how: str

    def to_dict(self) -> dict[str, Any]:
        return {"column": ".".join(self.target), "from": ".".join(self.source), "method": self.method,
                "where": self.where, "how": self.how}


@dataclass
class Report:
    derived: list[Derived] = field(default_factory=list)
    unclassified: list[tuple[Col, str]] = field(default_factory=list)  # column, file:line
    renamed: list[tuple[Col, Col, str, str]] = field(default_factory=list)  # old, new, method, file:line
    dropped: list[tuple[Col, str, str]] = field(default_factory=list)  # column, method, file:line

    def to_dict(self) -> dict[str, Any]:
        return {"derived": [d.to_dict() for d in self.derived],
                "unclassified": [{"column": ".".join(c), "where": w} for c, w in self.unclassified],
                "renamed": [{"from": ".".join(a), "to": ".".join(b), "method": m, "where": w}
                            for a, b, m, w in self.renamed],
                "dropped": [{"column": ".".join(c), "method": m, "where": w} for c, m, w in self.dropped]}


def analyze(files: Iterable[tuple[str, str]], masked: Mapping[Col, str], classified: Iterable[Col],
            sensitive: Iterable[tuple[str, str]]) -> Report:
    """Read ``files`` (name, SQL) in order. ``masked``: column -> method of every masked column;
    ``classified``: columns with any rule (``safe`` included); ``sensitive``: (schema, table)."""
    state = _State(dict(masked), set(classified) | set(masked), set(sensitive))
    for name, text in files:
        try:
            stmts = pglast.parse_sql(text)
        except pglast.parser.ParseError:
            continue  # verify and lint report syntax errors with their lines
        for raw in stmts:
            if raw.stmt is None:
                continue
            line = text.count("\n", 0, raw.stmt_location or 0) + 1
            state.statement(raw.stmt, f"{name}:{line}")
            state.trigger_bodies()  # a trigger keeps deriving: its source may become masked later
    state.finish()
    return state.report


class _State:
    def __init__(self, masked: dict[Col, str], classified: set[Col], sensitive: set[tuple[str, str]]) -> None:
        self.masked, self.classified, self.sensitive = masked, classified, sensitive
        self.added: dict[Col, str] = {}  # columns added to sensitive tables -> where
        # trigger functions and their triggers may come in either order
        self.triggers: dict[str, list[tuple[str, str]]] = {}
        self.bodies: dict[str, tuple[str, str]] = {}
        self.report = Report()

    def finish(self) -> None:
        self.report.unclassified = [(c, w) for c, w in self.added.items() if c not in self.classified]

    def derive(self, target: Col, sources: set[Col], where: str, how: str) -> None:
        hit = sorted(s for s in sources if s in self.masked and s != target)
        if not hit or target in self.masked:
            return
        method = self.masked[hit[0]]
        self.masked[target] = method
        self.classified.add(target)
        self.report.derived.append(Derived(target, hit[0], method, where, how))

    def statement(self, s: ast.Node, where: str) -> None:
        if isinstance(s, ast.AlterTableStmt) and s.relation is not None:
            rel = _rel(s.relation)
            for cmd in s.cmds or ():
                if cmd.subtype == AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
                    self.add_column((*rel, str(cmd.def_.colname)), where)
                elif cmd.subtype == AlterTableType.AT_DropColumn and cmd.name:
                    self.drop((*rel, str(cmd.name)), where)
        elif isinstance(s, ast.CreateStmt) and s.relation is not None:
            rel = _rel(s.relation)
            for elt in s.tableElts or ():
                if isinstance(elt, ast.ColumnDef):
                    self.add_column((*rel, str(elt.colname)), where)
        elif isinstance(s, ast.RenameStmt) and s.renameType == ObjectType.OBJECT_COLUMN and s.relation is not None:
            old, new = (*_rel(s.relation), str(s.subname)), (*_rel(s.relation), str(s.newname))
            if old in self.masked:
                method = self.masked.pop(old)
                self.masked[new] = method
                self.classified.add(new)
                self.report.renamed.append((old, new, method, where))
            elif old in self.classified:
                self.classified.add(new)
        elif isinstance(s, ast.UpdateStmt) and s.relation is not None:
            scope = _scope(s)
            for t in s.targetList or ():
                if isinstance(t, ast.ResTarget) and t.name:
                    self.derive((*_rel(s.relation), str(t.name)), scope.sources(t.val), where, "UPDATE ... SET")
        elif isinstance(s, ast.InsertStmt) and s.relation is not None and isinstance(s.selectStmt, ast.SelectStmt):
            # the WITH clause of an INSERT sits on the statement, not on its SELECT
            scope = _scope(s.selectStmt, _scope(s.withClause).rows if s.withClause is not None else None)
            names = [str(c.name) for c in s.cols or () if isinstance(c, ast.ResTarget)]
            for i, t in enumerate(s.selectStmt.targetList or ()):
                if isinstance(t, ast.ResTarget):
                    name = names[i] if i < len(names) else f"#{i + 1}"  # no column list: by position
                    self.derive((*_rel(s.relation), name), scope.sources(t.val), where, "INSERT ... SELECT")
        elif (isinstance(s, ast.CreateTableAsStmt) and s.objtype == ObjectType.OBJECT_TABLE
              and isinstance(s.query, ast.SelectStmt) and s.into is not None and s.into.rel is not None):
            scope = _scope(s.query)
            given = [str(c.sval) for c in s.into.colNames or () if isinstance(c, ast.String)]
            into = _rel(s.into.rel)
            for i, t in enumerate(s.query.targetList or ()):
                if isinstance(t, ast.ResTarget) and _is_star(t):
                    # SELECT *: the copy keeps the source's column names
                    star = scope.star()
                    for col in [c for c in self.masked if c[:2] in star]:
                        self.derive((*into, col[2]), {col}, where, "CREATE TABLE AS")
                    for rows in scope.rows.values():
                        for name, cols in rows.columns.items():
                            self.derive((*into, name), cols, where, "CREATE TABLE AS")
                elif isinstance(t, ast.ResTarget):
                    name = given[i] if i < len(given) else _output_name(t, i)
                    self.derive((*into, name), scope.sources(t.val), where, "CREATE TABLE AS")
        elif isinstance(s, ast.CreateTrigStmt) and s.relation is not None:
            self.triggers.setdefault(_last(s.funcname), []).append(_rel(s.relation))
        elif isinstance(s, ast.CreateFunctionStmt):
            body = next((str(o.arg[0].sval) for o in s.options or ()
                         if isinstance(o, ast.DefElem) and o.defname == "as" and isinstance(o.arg, tuple)
                         and o.arg and isinstance(o.arg[0], ast.String)), "")
            self.bodies[_last(s.funcname)] = (body, where)

    def trigger_bodies(self) -> None:
        for fn, rels in self.triggers.items():
            if fn not in self.bodies:
                continue
            body, fwhere = self.bodies[fn]
            for rel in rels:
                for target, rhs in _ASSIGN.findall(body):
                    sources = {(*rel, c.lower()) for c in _NEW_REF.findall(rhs)}
                    self.derive((*rel, target.lower()), sources, fwhere, f"trigger function {fn}()")

    def add_column(self, col: Col, where: str) -> None:
        if col[:2] in self.sensitive and col not in self.added:
            self.added[col] = where

    def drop(self, col: Col, where: str) -> None:
        if col in self.masked:
            self.report.dropped.append((col, self.masked.pop(col), where))


_ASSIGN = re.compile(r"\bNEW\s*\.\s*\"?(\w+)\"?\s*:?=\s*([^;]+);", re.IGNORECASE)
_NEW_REF = re.compile(r"\bNEW\s*\.\s*\"?(\w+)\"?", re.IGNORECASE)


def _rel(r: ast.RangeVar) -> tuple[str, str]:
    return str(r.schemaname or "public"), str(r.relname)


def _last(names: Any) -> str:
    parts = [str(n.sval) for n in names or () if isinstance(n, ast.String)]
    return parts[-1] if parts else ""


def _output_name(t: ast.ResTarget, i: int) -> str:
    if t.name:
        return str(t.name)
    if isinstance(t.val, ast.ColumnRef):
        fields = [f for f in t.val.fields or () if isinstance(f, ast.String)]
        if fields:
            return str(fields[-1].sval)
    return f"#{i + 1}"


def _walk(node: Any) -> Iterator[Any]:
    if isinstance(node, tuple | list):
        for x in node:
            yield from _walk(x)
    elif isinstance(node, ast.Node):
        yield node
        for attr in getattr(node, "__slots__", ()):
            yield from _walk(getattr(node, attr, None))


@dataclass
class _Rows:
    """A subquery in FROM or a CTE: what each output column reads (``*`` passes its relations' columns)."""

    columns: dict[str, set[Col]]
    star: set[tuple[str, str]]

    def lookup(self, name: str) -> set[Col]:
        return self.columns.get(name, {(*rel, name) for rel in self.star})


@dataclass
class _Scope:
    """Every relation a statement names, by alias and by name (subqueries included), and the subqueries
    and CTEs it reads from by name: a column read through one is read from what it selects."""

    rels: dict[str, tuple[str, str]]
    rows: dict[str, _Rows]

    def sources(self, expr: Any) -> set[Col]:
        """Columns an expression may read: qualified ones by their relation, bare ones from every relation."""
        out: set[Col] = set()
        for n in _walk(expr):
            if not isinstance(n, ast.ColumnRef):
                continue
            fields = [str(f.sval) for f in n.fields or () if isinstance(f, ast.String)]
            if not fields:
                continue
            if len(fields) >= 2 and fields[-2] in self.rows:
                out |= self.rows[fields[-2]].lookup(fields[-1])
            elif len(fields) >= 2 and fields[-2] in self.rels:
                out.add((*self.rels[fields[-2]], fields[-1]))
            else:
                out.update((*rel, fields[-1]) for rel in set(self.rels.values()))
                for rows in self.rows.values():
                    out |= rows.lookup(fields[-1])
        return out

    def star(self) -> set[tuple[str, str]]:
        """The relations whose columns a ``*`` of this scope passes on under their own names."""
        out = set(self.rels.values())
        for rows in self.rows.values():
            out |= rows.star
        return out


def _scope(stmt: ast.Node, outer: dict[str, _Rows] | None = None) -> _Scope:
    scope = _Scope({}, dict(outer or {}))
    for n in _walk(stmt):
        if isinstance(n, ast.RangeVar) and n.relname:
            rel = _rel(n)
            scope.rels.setdefault(str(n.relname), rel)
            if n.alias is not None and n.alias.aliasname:
                scope.rels[str(n.alias.aliasname)] = rel
        elif isinstance(n, ast.CommonTableExpr) and n.ctename and isinstance(n.ctequery, ast.SelectStmt):
            # WITH parts AS (SELECT split_part(email, '@', 1) AS local FROM customer) ... parts.local
            scope.rows[str(n.ctename)] = _rows(n.ctequery, scope.rows, _names(n.aliascolnames))
        elif (isinstance(n, ast.RangeSubselect) and n.alias is not None and n.alias.aliasname
              and isinstance(n.subquery, ast.SelectStmt)):
            scope.rows[str(n.alias.aliasname)] = _rows(n.subquery, scope.rows, _names(n.alias.colnames))
    return scope


def _rows(query: ast.SelectStmt, outer: dict[str, _Rows], names: list[str]) -> _Rows:
    """The output columns of ``query`` (a UNION's by position from both sides) and what each reads."""
    if query.larg is not None and query.rarg is not None:
        left, right = _rows(query.larg, outer, names), _rows(query.rarg, outer, [])
        for (name, cols), other in zip(left.columns.items(), right.columns.values(), strict=False):
            left.columns[name] = cols | other
        return _Rows(left.columns, left.star | right.star)
    scope = _scope(query, outer)
    out = _Rows({}, set())
    for i, t in enumerate(query.targetList or ()):
        if not isinstance(t, ast.ResTarget):
            continue
        if _is_star(t):
            out.star |= scope.star()
            for rows in scope.rows.values():
                for name, cols in rows.columns.items():
                    out.columns.setdefault(name, set()).update(cols)
            continue
        out.columns[names[i] if i < len(names) else _output_name(t, i)] = scope.sources(t.val)
    return out


def _names(nodes: Any) -> list[str]:
    return [str(c.sval) for c in nodes or () if isinstance(c, ast.String)]


def _is_star(t: ast.ResTarget) -> bool:
    return isinstance(t.val, ast.ColumnRef) and any(isinstance(f, ast.A_Star) for f in t.val.fields or ())
