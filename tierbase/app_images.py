"""Masked images: a masked branch of a sensitive tier in O(1), as a clone of a masked copy kept current.

``[masking] image = ["production"]``: the platform keeps ``<tier>-masked-<n>``, a branch of the
branch serving the tier, masked once with every rule, inherited rule and default. A masked branch
of that tier is then a copy-on-write clone of the image (nothing to mask: its rules are the
image's), instead of a clone of the tier masked again, which costs a full rewrite of every masked
row. The image is re-made (masked once, not on every branch) after each promotion into the tier,
after a `policy reload` that changes the masking table, and by `refresh_masked_images()` (the
service's schedule, or a platform engineer). It is used only while it is *current*: made from the
branch serving the tier now (a rollback repoints the route: the image is stale) under the same
masking rules; otherwise a masked branch is masked as before. A masked branch made from an image
holds the tier's data as of the image (``masked_image.as_of`` in its description).

A refresh is incremental when it can be (migrate/remask.py, migrate/image_refresh.py): the image is
made from a read-only snapshot of the tier (``<image>-src``, kept until the next image), so the next
refresh diffs that snapshot against a new one and re-masks only the rows that changed, in a clone of
the current image; when that would not equal a full re-mask (rules changed, a migration that writes
rows, a table whose shape changed or without a primary key, ...) it masks whole and says why.

The image is a feature branch of the platform's own, under a reserved name (names.py), so nobody
can put one in its place; its children are ordinary masked branches of the tier's lineage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Any

from .app_base import NOBODY, Core
from .app_masking import Masking
from .control.branches import Branches
from .control.store import Branch, Kind, Store
from .errors import InvalidInput, TierbaseError
from .governance.classify import image_tiers, qualified, sensitive_tables
from .governance.config import Config
from .governance.masking import describe, masking_key, parse_rules
from .governance.policy import Action
from .migrate.files import Migration
from .migrate.image_refresh import ImageRefresh
from .migrate.remask import FullRemask

KEY = "masked_image.{}"


class Images:
    """Takes the core and the masking service (an image is masked like any masked branch)."""

    def __init__(self, core: Core, masking: Masking) -> None:
        self.core = core
        self.masking = masking

    @property
    def config(self) -> Config:
        return self.core.config

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def branches(self) -> Branches:
        return self.core.branches

    def _masking_digest(self) -> str:
        """What an image was masked under: the config's rules and the recorded lineage."""
        rules = describe(parse_rules(self.config.masking))
        extra = {k: self.config.masking.get(k) for k in ("sensitive",)}
        lineage = [e.to_dict() for e in self.masking.lineage.entries()]
        return hashlib.sha256(json.dumps([rules, extra, lineage], sort_keys=True, default=str).encode()).hexdigest()

    def current_image(self, parent: Branch) -> tuple[Branch, dict[str, Any]] | None:
        """The image to clone for a masked child of ``parent``, when ``parent`` serves a tier that keeps
        one and the image is current; else None."""
        tier = next((t for t in image_tiers(self.config.masking)
                     if (self.store.resolve_route(t) or t) == parent.name), None)
        rec = self.store.get_setting(KEY.format(tier)) if tier else None
        if not rec or rec.get("source") != parent.name or rec.get("masking") != self._masking_digest():
            return None
        image = self.store.find(str(rec["branch"]))
        owner = self.core.gate.owner
        if (image is None or image.state.value != "ready" or not image.masked_by or image.creator != owner
                or image.parent != parent.name):
            return None
        return image, rec

    def refresh_masked_images(self, tier: str | None = None, *, full: bool = False) -> list[dict[str, Any]]:
        """Re-make the masked image of ``tier`` (default: every tier that keeps one); platform engineers.
        Incremental when it can be; ``full``: mask the tier's data whole all the same."""
        subject = self.core.tier_subject(tier) if tier is not None else NOBODY
        intent = {"op": "refresh", "tier": tier, "full": full}
        with self.core.act(Action.MASKING_REFRESH, subject, intent=intent) as rec:
            tiers = image_tiers(self.config.masking)
            if tier is not None and tier not in tiers:
                raise InvalidInput(f"tier {tier!r} keeps no masked image",
                                   f'Declare it: `image = ["{tier}"]` in the [masking] table of tierbase.toml')
            if not tiers:
                raise InvalidInput("no tier keeps a masked image", 'Declare one: `image = ["production"]` in the '
                                   "[masking] table of tierbase.toml")
            done = [self._refresh_image(t, full=full) for t in ([tier] if tier else tiers)]
            rec.after = [{k: d.get(k) for k in ("tier", "image", "mode", "why", "rows_remasked", "seconds")}
                         for d in done]
        return done

    def refresh_stale_images(self, max_age: float) -> list[str]:
        """The service's schedule: re-make each image that is not current (a rollback moved the tier, the
        rules changed) or older than ``max_age`` seconds."""
        stale = []
        for t in image_tiers(self.config.masking):
            serving = self.store.find(self.store.resolve_route(t) or t)
            rec = self.store.get_setting(KEY.format(t))
            if serving is not None and (self.current_image(serving) is None or rec is None
                                        or time.time() - float(rec.get("as_of", 0)) > max_age):
                stale.append(t)
        return self.refresh_quietly(stale)

    def refresh_quietly(self, tiers: list[str], migrations: list[Migration] | None = None) -> list[str]:
        """After a promotion (``migrations``: its files, whose DDL an incremental refresh may apply) or a
        reload: a refresh that fails leaves the image stale (masked branches are then masked as before),
        never the promotion failed."""
        said = []
        for t in tiers:
            if t not in image_tiers(self.config.masking):
                continue
            try:
                got = self._refresh_image(t, migrations)
                how = f"{got['mode']}" + (f", {got['rows_remasked']} rows re-masked" if got["mode"] == "incremental"
                                          else f": {got['why']}")
                said.append(f"masked image of {t!r} re-made as {got['image']!r} in {got['seconds']} s ({how})")
            except TierbaseError as err:
                said.append(f"the masked image of {t!r} could not be re-made ({err.message}); masked branches of "
                            "it are masked one by one until it is")
        return said

    def masked_images(self, *, with_bytes: bool = True) -> list[dict[str, Any]]:
        """Each image tier's image: how it was last made, how stale it is (age of its data) and what it
        holds of its own (``with_bytes``: a walk of its volume)."""
        out = []
        for t in image_tiers(self.config.masking):
            rec = self.store.get_setting(KEY.format(t))
            serving = self.store.find(self.store.resolve_route(t) or t)
            current = bool(rec and serving is not None and self.current_image(serving) is not None)
            image = self.store.find(str(rec["branch"])) if rec else None
            own = None
            if with_bytes and image is not None:
                with contextlib.suppress(TierbaseError, OSError):
                    own = self.core.provider.own_bytes(image.volume)
            out.append({"tier": t, "current": current, **(rec or {}),
                        "staleness_s": round(time.time() - float(rec["as_of"]), 1) if rec else None,
                        "bytes": own})
        return out

    def _refresh_image(self, tier: str, migrations: list[Migration] | None = None, *,
                       full: bool = False) -> dict[str, Any]:
        # one refresh of a tier at a time (a promotion's refresh waits for a scheduled one), never during
        # a promotion of it (image_refresh.py)
        with self.branches.lock(f"{tier}-masked-image"):
            return self._refresh_image_locked(tier, migrations or [], full)

    def _refresh_image_locked(self, tier: str, migrations: list[Migration], full: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        secret = self.core.home.read_secret(self.core.home.root / "masking.secret", create=True).encode()
        refresh = ImageRefresh(self.branches, self.core.gate.owner, masking_key(secret),
                               str(self.config.project.get("database", "postgres")))
        refresh.refuse_while_promoting(tier)
        serving = self.store.get(self.store.resolve_route(tier) or tier)
        plan = self.masking.plan(serving, force=True)
        if plan is None:
            raise InvalidInput(f"tier {tier!r} has nothing to mask", "Declare masking rules or sensitive tables")
        old = self.store.get_setting(KEY.format(tier))
        refresh.clean(tier, keep=old.get("source_snapshot") if old else None)
        n = int(self.store.get_setting(f"{KEY.format(tier)}.n", 0)) + 1
        self.store.set_setting(f"{KEY.format(tier)}.n", n)
        name = f"{tier}-masked-{n}"
        digest = self._masking_digest()
        source, xmin = refresh.snapshot(name, serving)
        try:
            why, done = "a full re-mask was asked for" if full else self._why_full(old, digest), None
            if why is None:
                try:
                    done = refresh.incremental(name, serving, self.store.get(str(old["branch"])),
                                               self.store.get(str(old["source_snapshot"])), source, migrations,
                                               {qualified(t) for t in sensitive_tables(self.config.masking)},
                                               # row versions tell what changed only on the same branch
                                               old.get("source_xmin") if old["source"] == serving.name else None)
                except FullRemask as fallback:
                    why = fallback.why
            settled: dict[str, Any] = {}
            if done is None:
                self.branches.create(name, serving.name, kind=Kind.FEATURE, creator=self.core.gate.owner,
                                     actor="tierbase", fork=refresh.clone_of(source),
                                     prepare=self.masking.hook(name, serving, plan, settled=settled))
        except BaseException:
            with contextlib.suppress(TierbaseError):
                refresh.drop(source.name)
            raise
        now = time.time()
        rec = {"branch": name, "source": serving.name, "source_snapshot": source.name, "source_xmin": xmin,
               "masking": digest,
               "as_of": source.created_at or now, "seconds": round(time.perf_counter() - t0, 3),
               "mode": "incremental" if done is not None else "full", "why": why or "only rows changed",
               "rows_remasked": done["rows_remasked"] if done is not None else None,
               # what masking and freezing the rewritten pages cost (masking_apply.freeze)
               "mask_s": (done.get("seconds") if done is not None else settled.get("seconds")),
               "freeze_s": (done.get("freeze_s") if done is not None else settled.get("freeze_s")),
               "migrations_applied": done.get("migrations", []) if done is not None else [],
               "previous_staleness_s": round(now - float(old["as_of"]), 1) if old else None}
        self.store.set_setting(KEY.format(tier), rec)
        reason = f"the masked image of {tier!r} re-made from {serving.name!r} ({rec['mode']}: {rec['why']})"
        self.core.gate.audit.append(actor="tierbase", action="masking.image", target=tier, allowed=True,
                                    reason=reason, before=old, after=rec)
        if old and self.store.find(str(old["branch"])) is not None and \
                len(self.branches.subtree(str(old["branch"]))) == 1:  # an image nobody branched from: gone
            with contextlib.suppress(TierbaseError):
                self.branches.delete(str(old["branch"]))
        if old and old.get("source_snapshot"):  # the unmasked source is needed only by the next refresh
            with contextlib.suppress(TierbaseError):
                refresh.drop(str(old["source_snapshot"]))
        return {"tier": tier, "image": name, **rec, "detail": done}

    def _why_full(self, old: dict[str, Any] | None, digest: str) -> str | None:
        """Why the next image must be masked whole, before looking at the data; None: try incrementally."""
        if not old:
            return "the tier had no image yet"
        if old.get("masking") != digest:
            return "the masking rules changed (a rule, a default, the sensitive tables or the recorded lineage)"
        image, source = self.store.find(str(old["branch"])), self.store.find(str(old.get("source_snapshot", "")))
        if image is None or image.state.value != "ready" or not image.masked_by:
            return f"the last image {old['branch']!r} is gone"
        if source is None or source.state.value != "ready":
            return "the last image has no source snapshot to compare with"
        return None
