"""Migrations: versioned SQL files, a ledger in each branch, squawk lint, verify on a throwaway branch.

Promotion and rollback build on these; nothing here knows about tiers or the facade.
"""

from .files import (
    NO_TRANSACTION_MARKER,
    LintBlocked,
    LintUnavailable,
    Migration,
    MigrationBusy,
    MigrationDrift,
    MigrationError,
    MigrationFailed,
    MissingUndo,
    discover,
    new_migration,
)
from .ledger import LEDGER, LEDGER_SCHEMA, Status, apply, status, undo
from .lint import DEFAULT_BLOCK, Finding, LintReport, lint
from .verify import VerifyReport, schema_dump, verify

__all__ = [
    "DEFAULT_BLOCK",
    "LEDGER",
    "LEDGER_SCHEMA",
    "NO_TRANSACTION_MARKER",
    "Finding",
    "LintBlocked",
    "LintReport",
    "LintUnavailable",
    "Migration",
    "MigrationBusy",
    "MigrationDrift",
    "MigrationError",
    "MigrationFailed",
    "MissingUndo",
    "Status",
    "VerifyReport",
    "apply",
    "discover",
    "lint",
    "new_migration",
    "schema_dump",
    "status",
    "undo",
    "verify",
]
