"""Validation of user-supplied names and durations."""

from __future__ import annotations

import re

from .errors import InvalidInput, InvalidName

NAME_RULE = "names are 1-63 characters of lowercase letters, digits and '-', starting with a letter or digit"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TTL_RE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


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
