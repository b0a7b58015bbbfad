"""Masking that branches inherit: which rules a new branch gets, the hook that applies them, and the
rules that migrate with the schema (governance/lineage.py).

The SQL runs below the facade (governance/masking_apply.py, on a private compute of the new volume);
this service decides what to mask and for whom.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .app_base import Core
from .control.branches import Prepare
from .control.store import Branch
from .errors import InvalidInput
from .governance.classify import MARK, qualified, sensitive_tables
from .governance.config import Config, ConfigError
from .governance.lineage import Lineage
from .governance.masking import MaskRule, describe, masking_key, parse_rules
from .governance.masking_apply import check_database, mask_database
from .governance.policy import Action
from .migrate.files import Migration
from .migrate.sensitivity import Col, analyze


class Masking:
    """Takes the core only: every other service that masks or records lineage goes through it."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def as_principal(self, name: str | None) -> Masking:
        """The same rules, decided for another principal (a reset masks as its branch's creator did)."""
        return Masking(self.core.as_principal(name))

    # -- masking that branches inherit -------------------------------------------------------
    def sensitive_lineage(self, b: Branch, cfg: Config) -> bool:
        """True when ``b`` is, or descends from, a tier declared sensitive (tier names follow routes)."""
        gate = self.core.gate
        return any(cfg.tiers.get(gate.subject(x).name) is not None
                   and cfg.tiers[gate.subject(x).name].sensitive for x in gate.lineage(b))

    def plan(self, parent: Branch, *, force: bool = False, cfg: Config | None = None) -> list[MaskRule] | None:
        """The rules to apply to a new child of ``parent``, or None when it stays as its parent is.

        A masked parent's children are masked already (only rules declared since are applied: masking
        twice would break determinism). An unmasked branch of sensitive data is masked unless the
        creating principal holds the unmasked-read grant; ``force`` masks anyway (tiers declared masked).
        The defaults of unclassified columns (classify.py) are added by the hook, on the live schema.
        """
        cfg = cfg or self.core.config  # a reload plans with the config being loaded
        rules = parse_rules(cfg.masking)
        done = set(parent.masked_by)
        if done:  # (inherited rules need no re-masking there: a masked branch's copies are of masked values)
            return [r for r in rules if describe([r])[0] not in done]
        rules += self.inherited_rules(rules)
        if not self.sensitive_lineage(parent, cfg) or not (rules or sensitive_tables(cfg.masking)):
            return None
        if force:
            return rules
        gate = self.core.gate
        decision = gate.decide(self.core.actor, Action.UNMASKED, gate.subject(parent))
        return None if decision.allowed else rules

    def hook(self, name: str, parent: Branch, rules: list[MaskRule] | None,
             database: str | None = None, cfg: Config | None = None,
             settled: dict[str, Any] | None = None) -> Prepare | None:
        """The hook that masks a new volume before anyone can connect (private unix-socket compute).

        ``settled``: the volume will be cloned (a masked image): what masking rewrote is frozen before
        the compute stops (masking_apply.freeze), and the masking's timings are put in ``settled``."""
        if rules is None:
            return None
        cfg = cfg or self.core.config
        tables = [t for t in sensitive_tables(cfg.masking) if f"{t}.{MARK}" not in parent.masked_by]
        home = self.core.home

        def prepare(volume: str, port: int) -> list[str]:
            if not rules and not tables:
                return sorted(parent.masked_by)
            provider = self.core.branches.provider
            ep = provider.start_private(name, volume, port)
            db = database or str(cfg.project.get("database", "postgres"))
            try:
                key = masking_key(home.read_secret(home.root / "masking.secret", create=True).encode())
                defaults, report = mask_database(ep.dsn(db), rules, tables, parent.masked_by, db,
                                                 retired=self.retired(), derived=set(self.lineage.masked()),
                                                 key=key, settle=settled is not None)
            finally:
                provider.stop(name, volume)  # a fast stop: its shutdown checkpoint leaves a clone no redo
            if settled is not None:
                settled.update({k: report[k] for k in ("seconds", "freeze_s") if k in report})
            return sorted({*parent.masked_by, *describe([*rules, *defaults]), *(f"{t}.{MARK}" for t in tables)})

        return prepare

    def check(self, cfg: Config) -> list[str]:
        """Masking rules must name real columns of the sensitive tiers' project database, and every
        unclassified column of a sensitive table must have a default mask. Returns notes on stale
        rules (columns a migration dropped or renamed): those are skipped, not refused."""
        rules = parse_rules(cfg.masking)
        tables = sensitive_tables(cfg.masking)
        if not rules and not tables:
            return []
        problems: list[str] = []
        notes: list[str] = []
        database = str(cfg.project.get("database", "postgres"))
        store, branches = self.core.store, self.core.branches
        for name, tier in cfg.tiers.items():
            b = store.find(store.resolve_route(name) or name)
            if not tier.sensitive or b is None:
                continue
            branches.start(b.name)
            stale, more = check_database(branches.provider.endpoint(b.port, database).dsn(), rules, tables,
                                         database, retired=self.retired())
            notes += stale
            problems += more
        if problems:
            raise ConfigError(sorted(set(problems)), "the config")
        return sorted(set(notes))

    # -- rules that migrate with the schema (governance/lineage.py) ---------------------------
    @property
    def lineage(self) -> Lineage:
        return Lineage(self.core.store.db)

    def retired(self) -> dict[Col, str]:
        return {c: e.why for c, e in self.lineage.retired().items()}

    def inherited_rules(self, rules: list[MaskRule]) -> list[MaskRule]:
        """Rules recorded from applied migrations, for columns tierbase.toml declares nothing for."""
        declared = {(*r.qualified, r.column) for r in rules}
        return [MaskRule(f"{c[0]}.{c[1]}", c[2], m) for c, m in self.lineage.masked().items() if c not in declared]

    def view(self, extra: dict[str, Any] | None = None) -> tuple[dict[Col, str], set[Col], set[tuple[str, str]]]:
        """Masked columns (-> method), classified columns and sensitive tables: the config in force,
        the recorded lineage, and ``extra`` (a change's own [masking] table, which may declare more)."""
        config = self.core.config
        rules = parse_rules(config.masking)
        tables = sensitive_tables(config.masking)
        if extra:
            with contextlib.suppress(InvalidInput):  # a broken table in the change: the reload will say so
                rules = [*parse_rules(extra), *rules]
                tables += sensitive_tables(extra)
        lineage = self.lineage
        retired = lineage.retired()
        masked: dict[Col, str] = {}
        for r in rules:
            col = (*r.qualified, r.column)
            if r.method != "safe" and col not in retired:
                masked.setdefault(col, r.method)
        classified = {(*r.qualified, r.column) for r in rules} | set(masked)
        for col, method in lineage.masked().items():
            masked.setdefault(col, method)
        return masked, classified, {qualified(t) for t in tables}

    def masking_change(self, migrations: list[Migration], masking: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``migrations`` do to masked data (migrate/sensitivity.py), read-only; ``masking``: the
        change's own [masking] table, whose declarations count as classification."""
        masked, classified, sensitive = self.view(masking)
        return analyze([(m.path.name, m.sql) for m in migrations], masked, classified, sensitive).to_dict()

    def record_lineage(self, migrations: list[Migration]) -> None:
        """After migrations were applied: record what they derived, renamed and dropped."""
        masked, classified, sensitive = self.view()
        report = analyze([(m.path.name, m.sql) for m in migrations], masked, classified, sensitive)
        self.lineage.record(report, self.core.principal().name)

    def masking_lineage(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.lineage.entries()]
