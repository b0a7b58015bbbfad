"""Facade methods of governance: config, principals, policy explain, audit, workflow history."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .app_base import NOBODY, Core
from .app_images import Images
from .app_masking import Masking
from .control.store import Kind
from .errors import BranchExists, InvalidInput, TierbaseError
from .governance import mirror
from .governance.classify import image_tiers
from .governance.config import Config, parse_config
from .governance.policy import Action, Subject, parse_action
from .workflow.history import FlowHistory

AUDIT_BRANCH = "tierbase-audit"


class Governance:
    """Takes the core, the masking service (a config's rules are checked against the tiers, new tiers
    masked) and the images (a changed masking table re-makes them)."""

    def __init__(self, core: Core, masking: Masking, images: Images) -> None:
        self.core = core
        self.masking = masking
        self.images = images

    @property
    def config(self) -> Config:
        return self.core.config

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
        with self.core.act(Action.POLICY_RELOAD, NOBODY, before={"sha256": old.digest},
                           quiet=dry_run) as rec:  # policy first: an agent is refused before anything is read
            if text is None:
                raise InvalidInput("no tierbase.toml was given: the platform does not re-read a stored file",
                                   "Name the file: `tierbase policy reload --file tierbase.toml` (add --dry-run "
                                   "to see the diff first)")
            cfg = parse_config(text, source or "the uploaded config")
            self.core.gate.check_against_branches(cfg)
            self.core.gate.check_roles_kept(cfg, old)
            stale = self.masking.check(cfg)
            diff = cfg.diff(old)
            said = self._apply_tiers(cfg, dry_run=dry_run) + stale
            if dry_run:
                said.insert(0, f"dry run: {source or 'the config'} (sha256 {cfg.digest[:12]}) is valid; "
                               "nothing was changed")
            else:
                self.core.gate.store_config(cfg, source)
                said.insert(0, f"loaded {source or 'the config'} (sha256 {cfg.digest[:12]})")
                # a changed masking table re-masks each tier's image once (app_images.py)
                said += self.images.refresh_quietly(
                    [t for t in image_tiers(cfg.masking)
                     if cfg.masking != old.masking or self.core.store.get_setting(f"masked_image.{t}") is None])
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
            b = self.core.store.find(name)
            if b is None and tier.parent is not None:
                if dry_run:
                    said.append(f"would create tier {name!r} from {tier.parent!r}")
                    continue
                parent = self.core.store.resolve_route(tier.parent) or tier.parent
                pb = self.core.store.get(parent)
                # settled: a masked tier is cloned by every branch of it, like an image (masking_apply.freeze)
                hook = self.masking.hook(name, pb, self.masking.plan(pb, force=tier.masked, cfg=cfg),
                                         database=str(cfg.project.get("database", "postgres")), cfg=cfg,
                                         settled={})
                self.core.branches.create(name, parent, kind=Kind.TIER, creator=self.core.gate.owner,
                                          protected=tier.protected, prepare=hook)
                said.append(f"created tier {name!r} from {tier.parent!r}")
            elif b is not None and b.protected != tier.protected:
                state = "protected" if tier.protected else "unprotected"
                if not dry_run:
                    self.core.store.set_protected(name, tier.protected)
                said.append(f"tier {name!r} {'would become' if dry_run else 'is now'} {state}")
        return said

    def show_config(self) -> dict[str, Any]:
        cfg = self.config
        return {"sha256": cfg.digest, "source": self.core.store.get_setting("config_source"), "text": cfg.text,
                "entry": cfg.entry, "tiers": cfg.tier_order()}

    def explain(self, principal: str, action: str, target: str, source: str | None = None) -> dict[str, Any]:
        """The decision the policy would take, without doing anything."""
        act = parse_action(action)
        subject = self.core.subject(target) if self.core.store.find(target) else Subject(name=target, kind="none")
        src = self.core.subject(source) if source else None
        decision = self.core.gate.decide(principal, act, subject, src)
        return {"principal": principal, "action": act.value, "target": target, **decision.to_dict()}

    def create_principal(self, name: str, role: str) -> dict[str, Any]:
        if role not in self.config.roles:
            raise InvalidInput(f"role {role!r} is not known", f"Use one of: {', '.join(self.config.roles)}")
        with self.core.act(Action.PRINCIPAL_MANAGE, Subject(name=name, kind="principal")) as rec:
            p, token = self.core.gate.principals.create(name, role, created_by=self.core.principal().name)
            rec.after = p.to_dict()
        return {**p.to_dict(), "token": token}

    def list_principals(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.core.gate.principals.all()]

    def revoke_principal(self, name: str) -> dict[str, Any]:
        with self.core.act(Action.PRINCIPAL_MANAGE, Subject(name=name, kind="principal")) as rec:
            rec.after = out = self.core.gate.principals.revoke(name).to_dict()
        return out

    def audit_log(self, **filters: Any) -> list[dict[str, Any]]:
        self.core.require(Action.AUDIT_READ, NOBODY, quiet=True)
        return self.core.gate.audit.query(**filters)

    def audit_verify(self) -> dict[str, Any]:
        """The chain, its head outside the database, and the SQL mirror against the chain."""
        out = self.core.gate.audit.verify().to_dict()
        out["mirror"] = self._verify_mirror()
        if out["ok"] and out["mirror"] is not None and not out["mirror"]["ok"]:
            out.update(ok=False, problem=out["mirror"]["problem"])
        return out

    # -- workflow history (the authoritative record behind .tierbase/workflow-state.json) --------
    # read-only here: transitions are commands (app_flow.py); no method appends a client's event
    def flow_history(self, feature: str) -> dict[str, Any]:
        return FlowHistory(self.core.store).summary(feature)

    def whoami(self) -> dict[str, Any]:
        p = self.core.principal()
        return {**p.to_dict(), "base_role": self.config.base_role(p.role), "read_only": self.config.read_only(p.role),
                "quota": self.config.quota(p.role)}

    # -- the audit trail as SQL ------------------------------------------------------------
    def _audit_cluster(self) -> str:
        """tierbase's own small cluster holding a read-only mirror of the audit trail (made on first use)."""
        if self.core.store.find(AUDIT_BRANCH) is None:
            with contextlib.suppress(BranchExists):  # a concurrent caller made it
                self.core.branches.create_root(AUDIT_BRANCH, creator=self.core.gate.owner, kind=Kind.SYSTEM)
        return AUDIT_BRANCH

    def audit_sync(self) -> int:
        """Copy the audit records the SQL mirror does not have yet; returns how many."""
        name = self._audit_cluster()
        self.core.branches.start(name)
        copied, top = mirror.sync_at(self.core.branches.provider.endpoint(self.core.store.get(name).port).dsn(),
                                     self.core.gate.audit.after)
        mirror.note_synced(self.core.store, top)
        return copied

    def _verify_mirror(self) -> dict[str, Any] | None:
        b = self.core.store.find(AUDIT_BRANCH)
        if b is None:
            return None  # no mirror was ever asked for
        synced_to = int(self.core.store.get_setting("audit_mirror_to", 0))
        try:
            self.core.branches.start(AUDIT_BRANCH)
        except TierbaseError as err:
            problems = [f"the SQL mirror could not be read: {str(err).strip()}"]
        else:
            problems = mirror.check_at(self.core.branches.provider.endpoint(b.port).dsn(), self.core.gate.audit.after,
                                       synced_to)
        return {"ok": not problems, "synced_to": synced_to, "problem": problems[0] if problems else "",
                "problems": problems}

    def audit_url(self) -> str:
        """A read-only URL on the SQL mirror of the audit trail (table audit_log), through the proxy,
        with this principal's own credentials; the proxy maps every reader to tb_reader there."""
        self.core.require(Action.AUDIT_READ, NOBODY, quiet=True)
        self.audit_sync()
        who = self.core.principal().name
        password = self.core.db_password()
        return f"postgresql://{quote(who, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.core.proxy_port}/" \
               f"{AUDIT_BRANCH}"
