"""Schema diff between two databases (two branches): what changed, as text, markdown and JSON.

``snapshot`` (in ``catalog``) reads a database's schema into a plain dict;
``diff`` compares two of them. A diff reads like a review, not like a dump: a
table that was added or dropped is one change, without its columns,
constraints, indexes, triggers and owned sequences; a column added to a
partitioned table is listed on that table, not again on every partition.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..errors import ComputeError
from .catalog import snapshot

__all__ = ["KINDS", "MARKDOWN_LIMIT", "OPS", "Change", "SchemaDiff", "diff", "diff_urls", "snapshot", "snapshot_url"]

#: Kinds in the order they are reported (roughly the order a migration would create them).
KINDS = ("schema", "extension", "type", "sequence", "table", "column", "constraint", "index", "view",
         "function", "trigger")
OPS = ("added", "removed", "changed")

# kind -> the snapshot section holding it (columns live inside their table)
_SECTIONS = {"schema": "schemas", "extension": "extensions", "type": "types", "sequence": "sequences",
             "table": "tables", "constraint": "constraints", "index": "indexes", "view": "views",
             "function": "functions", "trigger": "triggers"}
_HEADINGS = {"schema": "Schemas", "extension": "Extensions", "type": "Types", "sequence": "Sequences",
             "table": "Tables", "column": "Columns", "constraint": "Constraints", "index": "Indexes",
             "view": "Views", "function": "Functions", "trigger": "Triggers"}
_SIGNS = {"added": "+", "removed": "-", "changed": "~"}
# fields not compared: a table's columns are compared one by one; whether an index, constraint or trigger
# is a partition's own or cloned from its parent's is bookkeeping (ATTACH PARTITION adopts equal ones)
_IGNORED = {"table": ("columns",), "constraint": ("inherited",), "index": ("inherited",),
            "trigger": ("inherited",)}
# fields shown first when a change is explained; the rest follow alphabetically
_FIELD_ORDER = ("kind", "type", "not_null", "default", "generated", "identity", "collation", "definition")
_LONG = 80  # a value longer than this (or spanning lines) is reported as "changed", with a diff in markdown
_MAX_DIFF_LINES = 60
#: GitHub refuses comments over 65,536 characters; leave room for whatever the caller adds.
MARKDOWN_LIMIT = 60_000


@dataclass
class Change:
    """One object that differs: ``before`` is its definition in A, ``after`` in B (None on the missing side)."""

    kind: str
    op: str
    name: str
    before: Any = None
    after: Any = None

    @property
    def details(self) -> str:
        """One line: the definition of an added or removed object, or the fields that changed."""
        if self.op == "changed":
            return "; ".join(_field_changes(self.before, self.after)) if isinstance(self.before, dict) else ""
        return describe(self.kind, self.after if self.op == "added" else self.before)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "op": self.op, "name": self.name, "before": self.before, "after": self.after,
                "details": self.details}


@dataclass
class SchemaDiff:
    """The changes that turn schema ``a`` into schema ``b``."""

    a: str
    b: str
    changes: list[Change] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes

    @property
    def counts(self) -> dict[str, int]:
        return {op: sum(1 for c in self.changes if c.op == op) for op in OPS}

    def by_kind(self) -> dict[str, list[Change]]:
        groups: dict[str, list[Change]] = {}
        for kind in sorted({c.kind for c in self.changes}, key=_kind_rank):
            groups[kind] = [c for c in self.changes if c.kind == kind]
        return groups

    def summary(self) -> str:
        """``16 changes: 9 added, 2 removed, 5 changed``, or ``No schema changes.``"""
        if self.empty:
            return "No schema changes."
        total = len(self.changes)
        parts = ", ".join(f"{n} {op}" for op, n in self.counts.items() if n)
        return f"{total} change{'' if total == 1 else 's'}: {parts}"

    def to_text(self, *, definitions: bool = False) -> str:
        """One line per change, grouped by kind; ``definitions`` adds the diff of each changed definition."""
        lines = [f"Schema diff: {self.a} -> {self.b}", self.summary()]
        for changes in self.by_kind().values():
            lines.append("")
            for c in changes:
                details = c.details
                lines.append(f"{_SIGNS[c.op]} {c.kind} {c.name}" + (f" {details}" if details else ""))
                if definitions:
                    lines += [f"    {line}" for line in self.definition_diff(c)]
        return "\n".join(lines) + "\n"

    def to_markdown(self, *, limit: int = MARKDOWN_LIMIT) -> str:
        """A PR comment: heading, summary, a table per kind, then the changed definitions (collapsed).

        Kept under ``limit`` characters (GitHub refuses comments over 65,536): the
        definitions go first, then trailing rows, with a note saying what was left out.
        """
        head = [f"### Schema diff: {self.a} -> {self.b}", ""]
        if self.empty:
            return "\n".join([*head, "No schema changes.", ""])
        total = len(self.changes)
        head += ["**{}:**{}".format(*self.summary().split(":", 1)), ""]
        rows: list[tuple[str, list[str]]] = []  # (kind heading, table rows)
        for kind, changes in self.by_kind().items():
            rows.append((f"#### {_HEADINGS.get(kind, kind.title())} ({len(changes)})",
                         [f"| {_SIGNS[c.op]} {c.op} | {_code(c.name)} | {_code(c.details) if c.details else ''} |"
                          for c in changes]))
        text = _markdown(head, rows, self._definition_blocks())
        if len(text) <= limit:
            return text
        note = f"_Changed definitions left out to fit one comment: run `tierbase diff {self.a} {self.b}`._"
        text = _markdown(head, rows, [note, ""])
        shown = sum(len(r) for _, r in rows)
        while len(text) > limit and shown > 0:
            excess = len(text) - limit + 200  # and room for the note
            while excess > 0 and shown > 0:
                while not rows[-1][1]:
                    rows.pop()
                excess -= len(rows[-1][1].pop()) + 1
                shown -= 1
            note = (f"_{total - shown} more changes and the changed definitions left out to fit one comment: "
                    f"run `tierbase diff {self.a} {self.b}`._")
            text = _markdown(head, [(h, r) for h, r in rows if r], [note, ""])
        return text

    def definition_diff(self, change: Change) -> list[str]:
        """The unified diff of a changed object's ``definition`` (views, functions, triggers, ...), or []."""
        before = change.before.get("definition") if isinstance(change.before, dict) else None
        after = change.after.get("definition") if isinstance(change.after, dict) else None
        if change.op != "changed" or not (isinstance(before, str) and isinstance(after, str)) or before == after:
            return []
        lines = list(difflib.unified_diff(before.splitlines(), after.splitlines(), self.a, self.b,
                                          lineterm="", n=2))
        if len(lines) > _MAX_DIFF_LINES:
            lines = [*lines[:_MAX_DIFF_LINES], f"... ({len(lines) - _MAX_DIFF_LINES} more lines)"]
        return lines

    def _definition_blocks(self) -> list[str]:
        """Collapsed unified diffs of changed definitions: the lines a reviewer actually reads."""
        blocks: list[str] = []
        for c in self.changes:
            lines = self.definition_diff(c)
            if lines:
                text = "\n".join(lines)
                fence = _fence(text)
                blocks += [f"{c.kind} {_code(c.name)}", "", f"{fence}diff", text, fence, ""]
        if not blocks:
            return []
        return ["<details><summary>Changed definitions</summary>", "", *blocks, "</details>", ""]

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "empty": self.empty, "counts": self.counts,
                "changes": [c.to_dict() for c in self.changes]}


def diff(a: dict[str, Any], b: dict[str, Any], *, a_label: str = "a", b_label: str = "b") -> SchemaDiff:
    """Compare two snapshots; the result lists what B has that A lacks (added), the reverse (removed), and
    objects present in both with different definitions (changed)."""
    changes: list[Change] = []
    for kind, section in _SECTIONS.items():
        changes += _compare(kind, a.get(section) or {}, b.get(section) or {}, _IGNORED.get(kind, ()))
    changes += _column_changes(a.get("tables") or {}, b.get("tables") or {})
    changes = _without_implied(changes)
    changes.sort(key=lambda c: (_kind_rank(c.kind), c.name, OPS.index(c.op)))
    return SchemaDiff(a_label, b_label, changes)


def snapshot_url(url: str, label: str, schemas: list[str] | None = None) -> dict[str, Any]:
    """Connect to ``url`` and snapshot its schema; connection and query failures become a ComputeError."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            return snapshot(conn, schemas)
    except psycopg.Error as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ComputeError(f"could not read the schema of {label!r}: {first}",
                           "Check that the branch exists and its compute can start, then try again",
                           branch=label) from err


def diff_urls(url_a: str, url_b: str, *, a_label: str, b_label: str,
              schemas: list[str] | None = None) -> SchemaDiff:
    """Snapshot both databases and diff them: what applying A -> B would change."""
    return diff(snapshot_url(url_a, a_label, schemas), snapshot_url(url_b, b_label, schemas),
                a_label=a_label, b_label=b_label)


def _markdown(head: list[str], tables: list[tuple[str, list[str]]], tail: list[str]) -> str:
    out = list(head)
    for heading, rows in tables:
        out += [heading, "", "| op | object | details |", "| --- | --- | --- |", *rows, ""]
    return "\n".join([*out, *tail])


# -- comparing -------------------------------------------------------------------------------

def _kind_rank(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def _strip(entry: Any, ignore: Iterable[str]) -> Any:
    if not isinstance(entry, dict):
        return entry
    skip = set(ignore)
    return {k: v for k, v in entry.items() if k not in skip}


def _compare(kind: str, a: dict[str, Any], b: dict[str, Any], ignore: Iterable[str] = ()) -> list[Change]:
    out: list[Change] = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            out.append(Change(kind, "removed", name, a[name], None))
        elif name not in a:
            out.append(Change(kind, "added", name, None, b[name]))
        else:
            before, after = _strip(a[name], ignore), _strip(b[name], ignore)
            if before != after:
                out.append(Change(kind, "changed", name, before, after))
    return out


def _column_changes(a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    """Column changes of tables present on both sides; a partition's column that changed exactly
    as its parent's did (Postgres propagates those) is reported once, on the parent."""
    per_table: dict[str, dict[str, Change]] = {}
    for table in sorted(set(a) & set(b)):
        cols_a, cols_b = a[table].get("columns") or {}, b[table].get("columns") or {}
        per_table[table] = {c.name: c for c in _compare("column", cols_a, cols_b)}
    out: list[Change] = []
    for table, changes in per_table.items():
        parents = _parents(a[table]) | _parents(b[table])
        for col, change in changes.items():
            if any(_same_outcome(change, per_table.get(p, {}).get(col)) for p in parents):
                continue
            change.name = f"{table}.{col}"
            out.append(change)
    return out


def _parents(table: dict[str, Any]) -> set[str]:
    found = set(table.get("inherits") or [])
    if table.get("partition_of"):
        found.add(table["partition_of"])
    return found


def _same_outcome(child: Change, parent: Change | None) -> bool:
    if parent is None or parent.op != child.op:
        return False
    return bool(child.before == parent.before if child.op == "removed" else child.after == parent.after)


def _owner(change: Change) -> str | None:
    """The table or view an object belongs to, if its fate follows that relation's."""
    entry = change.after if change.op == "added" else change.before
    if not isinstance(entry, dict):
        return None
    if change.kind in ("constraint", "index", "trigger"):
        owner = entry.get("table")
        return owner if isinstance(owner, str) else None
    if change.kind == "sequence" and entry.get("owned_by"):
        return str(entry["owned_by"][0])
    return None


def _without_implied(changes: list[Change]) -> list[Change]:
    """Drop what follows from another change: the parts of relations added or removed whole, and the
    clones Postgres makes (or drops) on partitions when an index, constraint or trigger of the parent is."""
    gone = {(c.op, c.name) for c in changes if c.kind in ("table", "view") and c.op != "changed"}
    out: list[Change] = []
    for c in changes:
        entry = c.after if c.op == "added" else c.before
        if c.op != "changed" and ((c.op, _owner(c)) in gone or (isinstance(entry, dict) and entry.get("inherited"))):
            continue
        out.append(c)
    return out


# -- rendering -------------------------------------------------------------------------------

def describe(kind: str, entry: Any) -> str:
    """A one-line description of a definition from a snapshot."""
    if not isinstance(entry, dict):
        return "" if entry is None else str(entry)
    render = _DESCRIBE.get(kind)
    return render(entry) if render else ""


def _describe_column(c: dict[str, Any]) -> str:
    parts = [str(c.get("type"))]
    if c.get("collation"):
        parts.append(f"collate {c['collation']}")
    if c.get("not_null"):
        parts.append("not null")
    if c.get("default") is not None:
        parts.append(f"default {c['default']}")
    if c.get("generated"):
        parts.append(f"generated always as ({c['generated']}) stored")
    identity = c.get("identity")
    if identity:
        generation = identity.get("generation") if isinstance(identity, dict) else identity
        parts.append(f"generated {generation} as identity")
    return " ".join(parts)


def _describe_table(t: dict[str, Any]) -> str:
    if t.get("partition_of"):
        return f"partition of {t['partition_of']} {t.get('partition_bound') or ''}".rstrip()
    head = str(t.get("kind", "table"))
    if t.get("partition_key"):
        head += f" by {t['partition_key']}"
    columns = t.get("columns") or {}
    cols = ", ".join(f"{name} {col.get('type')}" for name, col in columns.items())
    return _shorten(f"{head} ({cols})", 160)


def _describe_function(f: dict[str, Any]) -> str:
    text = f"{f.get('kind', 'function')} ({f.get('arguments') or ''})"
    if f.get("returns"):
        text += f" returns {f['returns']}"
    return text + (f" language {f['language']}" if f.get("language") else "")


def _describe_sequence(s: dict[str, Any]) -> str:
    text = f"{s.get('type')} start {s.get('start')} increment {s.get('increment')}"
    if s.get("owned_by"):
        text += " owned by " + ".".join(str(p) for p in s["owned_by"])
    return text


def _describe_type(t: dict[str, Any]) -> str:
    kind = t.get("kind")
    if kind == "enum":
        labels = ", ".join("'" + str(v).replace("'", "''") + "'" for v in t.get("labels") or [])
        return f"enum ({labels})"
    if kind == "domain":
        parts = [f"domain over {t.get('base')}"]
        if t.get("not_null"):
            parts.append("not null")
        if t.get("default") is not None:
            parts.append(f"default {t['default']}")
        parts += [str(v) for v in (t.get("constraints") or {}).values()]
        return " ".join(parts)
    if kind == "composite":
        return f"composite ({', '.join(t.get('attributes') or [])})"
    if kind == "range":
        return f"range of {t.get('subtype')}"
    return f"{kind} type"


def _describe_index(i: dict[str, Any]) -> str:
    return str(i.get("definition")) + ("" if i.get("valid", True) else " (INVALID)")


_DESCRIBE: dict[str, Callable[[dict[str, Any]], str]] = {
    "column": _describe_column,
    "table": _describe_table,
    "function": _describe_function,
    "sequence": _describe_sequence,
    "type": _describe_type,
    "index": _describe_index,
    "constraint": lambda c: str(c.get("definition")),
    "trigger": lambda t: str(t.get("definition")) + ("" if t.get("enabled", "enabled") == "enabled"
                                                      else f" ({t['enabled']})"),
    "view": lambda v: str(v.get("kind", "view")),
    "extension": lambda e: f"version {e.get('version')} in schema {e.get('schema')}",
    "schema": lambda s: "",
}


def _field_order(key: str) -> tuple[int, str]:
    return (_FIELD_ORDER.index(key) if key in _FIELD_ORDER else len(_FIELD_ORDER), key)


def _field_changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in sorted(set(before) | set(after), key=_field_order):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        label = prefix + key
        if isinstance(old, dict) and isinstance(new, dict):
            out += _field_changes(old, new, label + ".")
        elif isinstance(old, list) and isinstance(new, list):
            out.append(_list_change(label, old, new))
        elif _is_long(old) or _is_long(new):
            out.append(f"{label} changed")
        else:
            out.append(f"{label}: {_fmt(old)} -> {_fmt(new)}")
    return out


def _list_change(label: str, old: list[Any], new: list[Any]) -> str:
    added = [f"+{_fmt(v)}" for v in new if v not in old]
    removed = [f"-{_fmt(v)}" for v in old if v not in new]
    return f"{label}: {' '.join(added + removed)}" if added or removed else f"{label} reordered"


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _is_long(value: Any) -> bool:
    text = _fmt(value)
    return "\n" in text or len(text) > _LONG


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def _code(text: str) -> str:
    """A markdown code span safe inside a table cell (pipes escaped, one line)."""
    text = " ".join(text.split()).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if longest else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)
