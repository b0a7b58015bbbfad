"""Feature names: one rule for the client kit and the platform's commands."""

from __future__ import annotations

import re

from .errors import Failure

MAX_FEATURE = 48
#: prefixes of the kit's own branches (workspaces, CI, TDD red/green)
RESERVED_PREFIXES = ("ws-", "ci-", "red-", "green-")


def check_feature(feature: str) -> Failure | None:
    ok = re.fullmatch(r"[a-z0-9][a-z0-9-]*", feature) is not None and len(feature) <= MAX_FEATURE
    if not ok:
        return Failure("invalid-feature", f"feature name {feature!r} is not allowed",
                       f"Use 1-{MAX_FEATURE} lowercase letters, digits and '-', starting with a letter or digit")
    if feature.startswith(RESERVED_PREFIXES):
        return Failure("invalid-feature", f"feature names may not start with {', '.join(RESERVED_PREFIXES)}",
                       "Those prefixes name the kit's own branches; pick another name")
    return None
