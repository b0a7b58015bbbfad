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
from .control.store import Branch, Kind
from .errors import InvalidInput, TierbaseError
from .governance.classify import image_tiers
from .governance.config import Config
from .governance.masking import describe, parse_rules
from .governance.policy import Action

KEY = "masked_image.{}"


class Images:
    """Takes the core and the masking service (an image is masked like any masked branch)."""

    def __init__(self, core: Core, masking: Masking) -> None:
        self.core = core
        self.masking = masking

    @property
    def config(self) -> Config:
        return self.core.config

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
                     if (self.core.store.resolve_route(t) or t) == parent.name), None)
        rec = self.core.store.get_setting(KEY.format(tier)) if tier else None
        if not rec or rec.get("source") != parent.name or rec.get("masking") != self._masking_digest():
            return None
        image = self.core.store.find(str(rec["branch"]))
        owner = self.core.gate.owner
        if (image is None or image.state.value != "ready" or not image.masked_by or image.creator != owner
                or image.parent != parent.name):
            return None
        return image, rec

    def refresh_masked_images(self, tier: str | None = None) -> list[dict[str, Any]]:
        """Re-make the masked image of ``tier`` (default: every tier that keeps one); platform engineers."""
        self.core.require(Action.POLICY_RELOAD, NOBODY, quiet=True)
        tiers = image_tiers(self.config.masking)
        if tier is not None and tier not in tiers:
            raise InvalidInput(f"tier {tier!r} keeps no masked image",
                               f'Declare it: `image = ["{tier}"]` in the [masking] table of tierbase.toml')
        return [self._refresh_image(t) for t in ([tier] if tier else tiers)]

    def refresh_stale_images(self, max_age: float) -> list[str]:
        """The service's schedule: re-make each image that is not current (a rollback moved the tier, the
        rules changed) or older than ``max_age`` seconds."""
        stale = []
        for t in image_tiers(self.config.masking):
            serving = self.core.store.find(self.core.store.resolve_route(t) or t)
            rec = self.core.store.get_setting(KEY.format(t))
            if serving is not None and (self.current_image(serving) is None or rec is None
                                        or time.time() - float(rec.get("as_of", 0)) > max_age):
                stale.append(t)
        return self.refresh_quietly(stale)

    def refresh_quietly(self, tiers: list[str]) -> list[str]:
        """After a promotion or a reload: a refresh that fails leaves the image stale (masked branches
        are then masked as before), never the promotion failed."""
        said = []
        for t in tiers:
            if t not in image_tiers(self.config.masking):
                continue
            try:
                got = self._refresh_image(t)
                said.append(f"masked image of {t!r} re-made as {got['image']!r} in {got['seconds']} s")
            except TierbaseError as err:
                said.append(f"the masked image of {t!r} could not be re-made ({err.message}); masked branches of "
                            "it are masked one by one until it is")
        return said

    def _refresh_image(self, tier: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        serving = self.core.store.get(self.core.store.resolve_route(tier) or tier)
        plan = self.masking.plan(serving, force=True)
        if plan is None:
            raise InvalidInput(f"tier {tier!r} has nothing to mask", "Declare masking rules or sensitive tables")
        n = int(self.core.store.get_setting(f"{KEY.format(tier)}.n", 0)) + 1
        self.core.store.set_setting(f"{KEY.format(tier)}.n", n)
        name = f"{tier}-masked-{n}"
        digest = self._masking_digest()
        self.core.branches.create(name, serving.name, kind=Kind.FEATURE, creator=self.core.gate.owner, actor="tierbase",
                                  prepare=self.masking.hook(name, serving, plan))
        old = self.core.store.get_setting(KEY.format(tier))
        rec = {"branch": name, "source": serving.name, "masking": digest, "as_of": time.time(),
               "seconds": round(time.perf_counter() - t0, 3)}
        self.core.store.set_setting(KEY.format(tier), rec)
        self.core.gate.audit.append(actor="tierbase", action="masking.image", target=tier, allowed=True,
                                    reason=f"the masked image of {tier!r} re-made from {serving.name!r}",
                                    before=old, after=rec)
        if old and self.core.store.find(str(old["branch"])) is not None and \
                len(self.core.branches.subtree(str(old["branch"]))) == 1:  # an image nobody branched from: gone
            with contextlib.suppress(TierbaseError):
                self.core.branches.delete(str(old["branch"]))
        return {"tier": tier, "image": name, **rec}
