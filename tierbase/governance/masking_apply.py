"""Masking on a live database: fit the declared rules to its schema, add defaults, then mask or check.

The facade decides what to mask (which rules, which tables, for whom); this module is the SQL
side of it, over a connection to the compute the facade names by its conninfo.
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg

from ..errors import InvalidInput
from ..provider import OWNER_ROLE
from .classify import Col3, default_rules, fit_rules
from .masking import MaskRule, apply_masking, check_rules


def mask_database(dsn: str, rules: list[MaskRule], tables: list[str], masked_by: list[str], db: str, *,
                  retired: Mapping[Col3, str], derived: set[Col3], key: bytes) -> list[MaskRule]:
    """Mask the database at ``dsn`` in place (as ``tb_owner``, masking.py); ``rules`` is narrowed to the
    columns that exist; returns the defaults added for unclassified columns of ``tables``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        fitted, _ = fit_rules(conn, rules, retired, derived)
        rules[:] = fitted
        defaults, problems = default_rules(conn, rules, tables, masked_by, db)
        if problems:
            raise InvalidInput("; ".join(problems), "Fix the [masking] table of tierbase.toml; "
                               "the branch was not made", problems=problems)
        apply_masking(conn, [*rules, *defaults], key, owner=OWNER_ROLE)
    return defaults


def check_database(dsn: str, rules: list[MaskRule], tables: list[str], database: str, *,
                   retired: Mapping[Col3, str]) -> tuple[list[str], list[str]]:
    """Check rules against the database at ``dsn``: (notes on stale rules, problems that refuse them)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        fitted, stale = fit_rules(conn, rules, retired, set())
        defaults, more = default_rules(conn, fitted, tables, (), database)
        return list(stale), more + check_rules(conn, [*fitted, *defaults], database)

