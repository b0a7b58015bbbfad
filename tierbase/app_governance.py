"""Facade methods of governance: config, principals, policy explain, audit, workflow history."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg

from .app_base import NOBODY, FacadeBase
from .control.branches import Prepare
from .control.store import Branch, Kind
from .errors import BranchExists, InvalidInput, TierbaseError
from .governance import mirror
from .governance.classify import MARK, default_rules, fit_rules, image_tiers, qualified, sensitive_tables
from .governance.config import Config, ConfigError, parse_config
from .governance.lineage import Lineage
from .governance.masking import MaskRule, apply_masking, check_rules, describe, masking_key, parse_rules
from .governance.policy import Action, Subject, parse_action
from .migrate.files import Migration
from .migrate.sensitivity import Col, analyze
from .provider import OWNER_ROLE
from .workflow.history import FlowHistory

AUDIT_BRANCH = "tierbase-audit"


class GovernanceOps(FacadeBase):
    # -- governance ----------------------------------------------------------------
    def reload_config(self, path: str | Path | None = None, *, dry_run: bool = False) -> dict[str, Any]:
        """Load the tierbase.toml at ``path`` (in-process callers: `tierbase up --config`, scripts, tests).

        The file is read here, by the process owner; the API never calls this with a path from a
        request (it uploads the text to :meth:`apply_config`). Without a path nothing is re-read: the
        stored source may sit in a repo that agents can write.
        """
        text = None
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as err:
                raise InvalidInput(f"cannot read {path}: {err.strerror}", "Give the path of your tierbase.toml") \
                    from err
        return self.apply_config(text, str(Path(path).absolute()) if path is not None else "", dry_run=dry_run)

    def apply_config(self, text: str | None, source: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Validate a tierbase.toml's text whole, show its diff, then (unless ``dry_run``) create missing
        tiers and put it in force. ``source`` is a label (where the platform engineer read it)."""
        old = self.config
        with self.gate.act(self.actor, Action.POLICY_RELOAD, NOBODY, before={"sha256": old.digest},
                           quiet=dry_run) as rec:  # policy first: an agent is refused before anything is read
            if text is None:
                raise InvalidInput("no tierbase.toml was given: the platform does not re-read a stored file",
                                   "Name the file: `tierbase policy reload --file tierbase.toml` (add --dry-run "
                                   "to see the diff first)")
            cfg = parse_config(text, source or "the uploaded config")
            self.gate.check_against_branches(cfg)
            self.gate.check_roles_kept(cfg, old)
            stale = self._check_masking(cfg)
            diff = cfg.diff(old)
            said = self._apply_tiers(cfg, dry_run=dry_run) + stale
            if dry_run:
                said.insert(0, f"dry run: {source or 'the config'} (sha256 {cfg.digest[:12]}) is valid; "
                               "nothing was changed")
            else:
                self.gate.store_config(cfg, source)
                said.insert(0, f"loaded {source or 'the config'} (sha256 {cfg.digest[:12]})")
                # a changed masking table re-masks each tier's image once (app_images.py)
                said += self._refresh_images_quietly(  # type: ignore[attr-defined]
                    [t for t in image_tiers(cfg.masking)
                     if cfg.masking != old.masking or self.store.get_setting(f"masked_image.{t}") is None])
                rec.after = {"sha256": cfg.digest, "diff": diff}
        return {"sha256": cfg.digest, "source": source, "said": said, "entry": cfg.entry, "diff": diff,
                "changed": cfg.digest != old.digest, "applied": not dry_run}

    def _apply_tiers(self, cfg: Config, *, dry_run: bool) -> list[str]:
        """Create the tiers ``cfg`` declares that do not exist; sync protection (or say what would be done)."""
        said = []
        # tiers first, config last: a failure half way leaves the last good config in force, and a
        # second reload finds the tiers it already made
        for name in cfg.tier_order():
            tier = cfg.tiers[name]
            b = self.store.find(name)
            if b is None and tier.parent is not None:
                if dry_run:
                    said.append(f"would create tier {name!r} from {tier.parent!r}")
                    continue
                parent = self.store.resolve_route(tier.parent) or tier.parent
                pb = self.store.get(parent)
                hook = self._mask_hook(name, pb, self._masking_plan(pb, force=tier.masked, cfg=cfg),
                                       database=str(cfg.project.get("database", "postgres")), cfg=cfg)
                self.branches.create(name, parent, kind=Kind.TIER, creator=self.gate.owner,
                                     protected=tier.protected, prepare=hook)
                said.append(f"created tier {name!r} from {tier.parent!r}")
            elif b is not None and b.protected != tier.protected:
                state = "protected" if tier.protected else "unprotected"
                if not dry_run:
                    self.store.set_protected(name, tier.protected)
                said.append(f"tier {name!r} {'would become' if dry_run else 'is now'} {state}")
        return said

    def show_config(self) -> dict[str, Any]:
        cfg = self.config
        return {"sha256": cfg.digest, "source": self.store.get_setting("config_source"), "text": cfg.text,
                "entry": cfg.entry, "tiers": cfg.tier_order()}

    def explain(self, principal: str, action: str, target: str, source: str | None = None) -> dict[str, Any]:
        """The decision the policy would take, without doing anything."""
        act = parse_action(action)
        subject = self._subject(target) if self.store.find(target) else Subject(name=target, kind="none")
        src = self._subject(source) if source else None
        decision = self.gate.decide(principal, act, subject, src)
        return {"principal": principal, "action": act.value, "target": target, **decision.to_dict()}

    def create_principal(self, name: str, role: str) -> dict[str, Any]:
        if role not in self.config.roles:
            raise InvalidInput(f"role {role!r} is not known", f"Use one of: {', '.join(self.config.roles)}")
        with self.gate.act(self.actor, Action.PRINCIPAL_MANAGE, Subject(name=name, kind="principal")) as rec:
            p, token = self.gate.principals.create(name, role, created_by=self.gate.principal(self.actor).name)
            rec.after = p.to_dict()
        return {**p.to_dict(), "token": token}

    def list_principals(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.gate.principals.all()]

    def revoke_principal(self, name: str) -> dict[str, Any]:
        with self.gate.act(self.actor, Action.PRINCIPAL_MANAGE, Subject(name=name, kind="principal")) as rec:
            rec.after = out = self.gate.principals.revoke(name).to_dict()
        return out

    def audit_log(self, **filters: Any) -> list[dict[str, Any]]:
        self._require(Action.AUDIT_READ, NOBODY, quiet=True)
        return self.gate.audit.query(**filters)

    def audit_verify(self) -> dict[str, Any]:
        """The chain, its head outside the database, and the SQL mirror against the chain."""
        out = self.gate.audit.verify().to_dict()
        out["mirror"] = self._verify_mirror()
        if out["ok"] and out["mirror"] is not None and not out["mirror"]["ok"]:
            out.update(ok=False, problem=out["mirror"]["problem"])
        return out

    # -- workflow history (the authoritative record behind .tierbase/workflow-state.json) --------
    # read-only here: transitions are commands (app_flow.py); no method appends a client's event
    def flow_history(self, feature: str) -> dict[str, Any]:
        return FlowHistory(self.store).summary(feature)

    def whoami(self) -> dict[str, Any]:
        p = self.gate.principal(self.actor)
        return {**p.to_dict(), "base_role": self.config.base_role(p.role), "read_only": self.config.read_only(p.role),
                "quota": self.config.quota(p.role)}



    # -- the audit trail as SQL ------------------------------------------------------------
    def _audit_cluster(self) -> str:
        """tierbase's own small cluster holding a read-only mirror of the audit trail (made on first use)."""
        if self.store.find(AUDIT_BRANCH) is None:
            with contextlib.suppress(BranchExists):  # a concurrent caller made it
                self.branches.create_root(AUDIT_BRANCH, creator=self.gate.owner, kind=Kind.SYSTEM)
        return AUDIT_BRANCH

    def audit_sync(self) -> int:
        """Copy the audit records the SQL mirror does not have yet; returns how many."""
        name = self._audit_cluster()
        self.branches.start(name)
        ep = self.branches.provider.endpoint(self.store.get(name).port)
        with psycopg.connect(ep.dsn(), autocommit=True, connect_timeout=10) as conn:
            copied, top = mirror.sync(conn, self.gate.audit.after)
        self._mirror_synced(top)
        return copied

    def _mirror_synced(self, top: int) -> None:
        """Remember the newest id the mirror held: rows up to it missing later were deleted, not yet to come."""
        with self.store.write() as db:
            row = db.execute("SELECT value FROM settings WHERE key = 'audit_mirror_to'").fetchone()
            if row is None or int(row[0]) < top:  # concurrent syncs: never lower it
                db.execute("INSERT INTO settings(key, value) VALUES('audit_mirror_to', ?)"
                           " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(top),))

    def _verify_mirror(self) -> dict[str, Any] | None:
        b = self.store.find(AUDIT_BRANCH)
        if b is None:
            return None  # no mirror was ever asked for
        synced_to = int(self.store.get_setting("audit_mirror_to", 0))
        try:
            self.branches.start(AUDIT_BRANCH)
            with psycopg.connect(self.branches.provider.endpoint(b.port).dsn(), autocommit=True,
                                 connect_timeout=10) as conn:
                problems = mirror.check(conn, self.gate.audit.after, synced_to)
        except (TierbaseError, psycopg.Error) as err:
            problems = [f"the SQL mirror could not be read: {str(err).strip()}"]
        return {"ok": not problems, "synced_to": synced_to, "problem": problems[0] if problems else "",
                "problems": problems}

    def audit_url(self) -> str:
        """A read-only URL on the SQL mirror of the audit trail (table audit_log), through the proxy,
        with this principal's own credentials; the proxy maps every reader to tb_reader there."""
        self._require(Action.AUDIT_READ, NOBODY, quiet=True)
        self.audit_sync()
        who = self.gate.principal(self.actor).name
        password = self._db_password()  # type: ignore[attr-defined]
        return f"postgresql://{quote(who, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.proxy_port}/" \
               f"{AUDIT_BRANCH}"

    # -- masking that branches inherit -------------------------------------------------------
    def _sensitive_lineage(self, b: Branch, cfg: Config) -> bool:
        """True when ``b`` is, or descends from, a tier declared sensitive (tier names follow routes)."""
        return any(cfg.tiers.get(self.gate.subject(x).name) is not None
                   and cfg.tiers[self.gate.subject(x).name].sensitive for x in self.gate.lineage(b))

    def _masking_plan(self, parent: Branch, *, force: bool = False, cfg: Config | None = None) -> list[MaskRule] | None:
        """The rules to apply to a new child of ``parent``, or None when it stays as its parent is.

        A masked parent's children are masked already (only rules declared since are applied: masking
        twice would break determinism). An unmasked branch of sensitive data is masked unless the
        creating principal holds the unmasked-read grant; ``force`` masks anyway (tiers declared masked).
        The defaults of unclassified columns (classify.py) are added by the hook, on the live schema.
        """
        cfg = cfg or self.config  # a reload plans with the config being loaded
        rules = parse_rules(cfg.masking)
        done = set(parent.masked_by)
        if done:  # (inherited rules need no re-masking there: a masked branch's copies are of masked values)
            return [r for r in rules if describe([r])[0] not in done]
        rules += self._inherited_rules(rules)
        if not self._sensitive_lineage(parent, cfg) or not (rules or sensitive_tables(cfg.masking)):
            return None
        if force:
            return rules
        decision = self.gate.decide(self.actor, Action.UNMASKED, self.gate.subject(parent))
        return None if decision.allowed else rules

    def _mask_hook(self, name: str, parent: Branch, rules: list[MaskRule] | None,
                   database: str | None = None, cfg: Config | None = None) -> Prepare | None:
        """The hook that masks a new volume before anyone can connect (private unix-socket compute)."""
        if rules is None:
            return None
        cfg = cfg or self.config
        tables = [t for t in sensitive_tables(cfg.masking) if f"{t}.{MARK}" not in parent.masked_by]

        def prepare(volume: str, port: int) -> list[str]:
            if not rules and not tables:
                return sorted(parent.masked_by)
            provider = self.branches.provider
            ep = provider.start_private(name, volume, port)
            db = database or str(cfg.project.get("database", "postgres"))
            try:
                key = masking_key(self.home.read_secret(self.home.root / "masking.secret", create=True).encode())
                with psycopg.connect(ep.dsn(db), autocommit=True) as conn:
                    fitted, _ = fit_rules(conn, rules, self._retired(), set(self._lineage.masked()))
                    rules[:] = fitted
                    defaults, problems = default_rules(conn, rules, tables, parent.masked_by, db)
                    if problems:
                        raise InvalidInput("; ".join(problems), "Fix the [masking] table of tierbase.toml; "
                                           "the branch was not made", problems=problems)
                    apply_masking(conn, [*rules, *defaults], key, owner=OWNER_ROLE)
            finally:
                provider.stop(name, volume)
            return sorted({*parent.masked_by, *describe([*rules, *defaults]), *(f"{t}.{MARK}" for t in tables)})

        return prepare

    @property
    def _project_database(self) -> str:
        return str(self.config.project.get("database", "postgres"))

    def _check_masking(self, cfg: Config) -> list[str]:
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
        for name, tier in cfg.tiers.items():
            b = self.store.find(self.store.resolve_route(name) or name)
            if not tier.sensitive or b is None:
                continue
            self.branches.start(b.name)
            ep = self.branches.provider.endpoint(b.port, database)
            with psycopg.connect(ep.dsn(), autocommit=True) as conn:
                fitted, stale = fit_rules(conn, rules, self._retired(), set())
                notes += stale
                defaults, more = default_rules(conn, fitted, tables, (), database)
                problems += more + check_rules(conn, [*fitted, *defaults], database)
        if problems:
            raise ConfigError(sorted(set(problems)), "the config")
        return sorted(set(notes))

    # -- rules that migrate with the schema (governance/lineage.py) ---------------------------
    @property
    def _lineage(self) -> Lineage:
        return Lineage(self.store.db)

    def _retired(self) -> dict[Col, str]:
        return {c: e.why for c, e in self._lineage.retired().items()}

    def _inherited_rules(self, rules: list[MaskRule]) -> list[MaskRule]:
        """Rules recorded from applied migrations, for columns tierbase.toml declares nothing for."""
        declared = {(*r.qualified, r.column) for r in rules}
        return [MaskRule(f"{c[0]}.{c[1]}", c[2], m) for c, m in self._lineage.masked().items() if c not in declared]

    def _masking_view(self, extra: dict[str, Any] | None = None
                      ) -> tuple[dict[Col, str], set[Col], set[tuple[str, str]]]:
        """Masked columns (-> method), classified columns and sensitive tables: the config in force,
        the recorded lineage, and ``extra`` (a change's own [masking] table, which may declare more)."""
        rules = parse_rules(self.config.masking)
        tables = sensitive_tables(self.config.masking)
        if extra:
            with contextlib.suppress(InvalidInput):  # a broken table in the change: the reload will say so
                rules = [*parse_rules(extra), *rules]
                tables += sensitive_tables(extra)
        retired = self._lineage.retired()
        masked: dict[Col, str] = {}
        for r in rules:
            col = (*r.qualified, r.column)
            if r.method != "safe" and col not in retired:
                masked.setdefault(col, r.method)
        classified = {(*r.qualified, r.column) for r in rules} | set(masked)
        for col, method in self._lineage.masked().items():
            masked.setdefault(col, method)
        return masked, classified, {qualified(t) for t in tables}

    def masking_change(self, migrations: list[Migration], masking: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``migrations`` do to masked data (migrate/sensitivity.py), read-only; ``masking``: the
        change's own [masking] table, whose declarations count as classification."""
        masked, classified, sensitive = self._masking_view(masking)
        return analyze([(m.path.name, m.sql) for m in migrations], masked, classified, sensitive).to_dict()

    def _record_lineage(self, migrations: list[Migration]) -> None:
        """After migrations were applied: record what they derived, renamed and dropped."""
        masked, classified, sensitive = self._masking_view()
        report = analyze([(m.path.name, m.sql) for m in migrations], masked, classified, sensitive)
        self._lineage.record(report, self.gate.principal(self.actor).name)

    def masking_lineage(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self._lineage.entries()]
