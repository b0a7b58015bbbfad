"""Masking rules as tierbase.toml declares them: the methods, a rule, parsing the ``[masking]`` table,
and the masking key. No SQL and no connection here (masking.py says what each method does).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInput

METHODS = ("email", "hash", "partial", "noise", "null", "redact", "shift", "safe")
#: methods that map distinct values to distinct values (with negligible collision odds)
INJECTIVE = ("email", "hash")
TEXT_TYPES = ("text", "varchar", "bpchar", "citext")
INT_RANGES = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1), "int8": (-(2**63), 2**63 - 1)}
NUMERIC_TYPES = (*INT_RANGES, "numeric", "float4", "float8")
TIME_TYPES = ("date", "timestamp", "timestamptz")
HASHABLE = (*TEXT_TYPES, "bool", "uuid")  # hash on bool: a keyed bit per row; on uuid: a keyed uuid
SHIFT_DAYS = 30  # shift: dates and timestamps move back by a keyed whole number of days in [0, 30]
#: what ``email`` counts as a valid address (the HTML living standard's): those become
#: ``u<16 hex>@example.invalid``; any other value keeps its shape (``partial``), so it stays malformed
#: (``\x25`` is ``%``, which psycopg would take for a placeholder)
EMAIL_VALID = (r"^[A-Za-z0-9.!#$\x25&'*+/=?^_`{|}~-]+@[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
               r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$")
EMAIL_LENGTH = 30  # the shortest mask of a valid address: 'u' + 13 hex + '@example.invalid' (else as long)
HASH_LENGTH = 64
UNROLL = 64  # partial: values up to this many characters get the fast, unrolled expression
KEY_CONTEXT = b"tierbase masking v1"


@dataclass(frozen=True)
class MaskRule:
    table: str  # "customer" or "schema.table" (default schema public)
    column: str
    method: str

    @property
    def key(self) -> str:
        """The rule's key in tierbase.toml, for messages: ``masking.customer.email``."""
        return f"masking.{self.table}.{self.column}"

    @property
    def qualified(self) -> tuple[str, str]:
        schema, _, table = self.table.rpartition(".")
        return schema or "public", table


def parse_rules(mapping: Mapping[str, Any]) -> list[MaskRule]:
    """Rules from the ``[masking]`` table; nested tables (TOML dotted keys) are flattened.

    Raises InvalidInput naming every bad key: a key that is not ``table.column`` or
    ``schema.table.column``, an unknown method, or two keys for the same column.
    """
    problems: list[str] = []
    rules: list[MaskRule] = []
    seen: dict[tuple[str, str, str], str] = {}
    for key, method in _flatten({k: v for k, v in mapping.items() if k not in ("sensitive", "image")}):  # classify.py
        parts = key.split(".")
        if len(parts) not in (2, 3) or not all(p and p == p.strip() and '"' not in p for p in parts):
            problems.append(f"masking.{key}: a rule's key is table.column or schema.table.column")
            continue
        if not isinstance(method, str) or method not in METHODS:
            problems.append(f"masking.{key}: unknown method {method!r} (use one of {', '.join(METHODS)})")
            continue
        rule = MaskRule(".".join(parts[:-1]), parts[-1], method)
        ident = (*rule.qualified, rule.column)
        if ident in seen:
            problems.append(f"masking.{key}: the same column as masking.{seen[ident]}")
            continue
        seen[ident] = key
        rules.append(rule)
    if problems:
        raise InvalidInput("; ".join(problems), "Fix the [masking] table of tierbase.toml", problems=problems)
    return rules


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def describe(rules: Iterable[MaskRule]) -> list[str]:
    """One line per rule for `branch show`: ``customer.email=email``."""
    return [f"{r.table}.{r.column}={r.method}" for r in rules]


def masking_key(secret: bytes) -> bytes:
    """The HMAC key masking uses, derived from the project's secret (never used raw)."""
    if not secret:
        raise InvalidInput("the masking key is empty", "Give the project's secret as the masking key")
    return hmac.new(secret, KEY_CONTEXT, hashlib.sha256).digest()
