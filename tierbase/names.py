"""Validation of user-supplied names and durations."""

from __future__ import annotations

import re

from .errors import InvalidInput, InvalidName

NAME_RULE = "names are 1-63 characters of lowercase letters, digits and '-', starting with a letter or digit"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TTL_RE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

#: the names the platform makes itself, with what it makes them for. Taking one first would block the
#: platform (a promotion whose `-pre-N` snapshot name is taken cannot start) or plant a branch where
#: the platform expects its own, so no principal may create them; the platform's own code paths pass
#: ``platform_name=True`` to the facade instead.
RESERVED: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^.+-pre-\d+$"), "pre-promotion snapshots (<tier>-pre-<n>)"),
    (re.compile(r"^.+-rb-.+$"), "rollback branches (<tier>-rb-...)"),
    (re.compile(r"^.+-replaced-.+$"), "branches a rollback or restore replaced (*-replaced-*)"),
    (re.compile(r"^.+-before-restore-.+$"), "the state kept before a restore (*-before-restore-*)"),
    (re.compile(r"^ci-.+$"), "the workflow's CI branches (ci-<feature>)"),
    (re.compile(r"^verify-.+$"), "migration verify branches (verify-*)"),
    (re.compile(r"^.+-masked-\d+$"), "masked images of sensitive tiers (<tier>-masked-<n>)"),
    (re.compile(r"^.+-masked-\d+-src(-run)?$"), "the unmasked sources of masked images (<tier>-masked-<n>-src)"),
)


def check_name(name: str, what: str = "branch") -> str:
    """Return ``name`` if it is a valid branch/route name, else raise InvalidName."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidName(
            f"{what} name {name!r} is not allowed",
            f"Use a name that follows the rule: {NAME_RULE}",
            name=name,
            rule=NAME_RULE,
        )
    return name


class ReservedName(InvalidName):
    code = "reserved_name"


def reserved_for(name: str) -> str | None:
    """What the platform makes branches named like ``name`` for, or None when the name is free to take."""
    return next((what for pattern, what in RESERVED if pattern.fullmatch(name)), None)


#: of the reserved names, those of branches that are no principal's to use, even to branch from: a masked
#: image (masked branches of its tier are cloned from it by the platform) and its unmasked source
PLATFORM_ONLY = RESERVED[-2:]


def platform_only(name: str) -> str | None:
    """What the platform keeps a branch named ``name`` for, when it is one principals may not use."""
    return next((what for pattern, what in PLATFORM_ONLY if pattern.fullmatch(name)), None)


def check_unreserved(name: str) -> str:
    """Return ``name`` unless the platform reserves it for its own branches (then raise ReservedName)."""
    what = reserved_for(name)
    if what is not None:
        raise ReservedName(f"branch name {name!r} is reserved for the platform: it names {what}",
                           "Pick a name without that pattern (e.g. drop the `ci-`/`verify-` prefix or the "
                           "`-pre-<n>`/`-rb-` part)", name=name, reserved_for=what)
    return name


def parse_ttl(text: str) -> int:
    """Parse '90s', '30m', '12h', '7d', '2w' or combinations like '1h30m' into seconds."""
    raw = text.strip().lower() if isinstance(text, str) else ""
    pos, total = 0, 0
    for m in _TTL_RE.finditer(raw):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not raw or pos != len(raw) or total <= 0:
        raise InvalidInput(
            f"TTL {text!r} does not parse",
            "Give a positive duration such as 90s, 30m, 12h, 7d, 2w or 1h30m",
            ttl=text,
        )
    return total


def format_duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}{'' if s % size == 0 or unit == 'm' else ' ' + format_duration(s % size)}"
    return f"{s}s"
