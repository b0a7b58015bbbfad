"""tierbase.toml: parsed with tomllib, checked against a JSON Schema, then for meaning.

Every problem names the key it is about (``tiers.qa.parent``), so the
platform engineer can go straight to it. A config that fails any check is
never stored: the platform keeps running on its last good one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from ..errors import InvalidInput
from ..names import reserved_for

BUILTIN_ROLES = ("platform-engineer", "developer", "agent", "ci")
#: how much a built-in role may do; a built-in role may be declared like itself or a weaker one only
POWER = {"platform-engineer": 3, "developer": 2, "ci": 2, "agent": 1}
#: the grants agents never hold, whatever the config says (the built-in agent rules deny them anyway:
#: a config saying otherwise would only mislead its reader)
AGENT_NEVER = ("unmasked_read", "repoint", "delete_any")
DEFAULT_TIERS: dict[str, Any] = {"production": {"protected": True, "entry": True}}


class ConfigError(InvalidInput):
    code = "invalid_config"

    def __init__(self, problems: list[str], source: str) -> None:
        super().__init__(
            f"{source} is not valid: " + "; ".join(problems),
            "Fix the named keys and load it again; the platform keeps its last good config",
            problems=problems,
        )


@dataclass(frozen=True)
class Tier:
    name: str
    parent: str | None
    protected: bool
    entry: bool
    sensitive: bool
    masked: bool
    git_branch: str | None
    promote: tuple[str, ...]
    branch: tuple[str, ...] | None  # None: the default rule (everyone, agents not off protected tiers)
    smoke: str | None


@dataclass(frozen=True)
class Config:
    raw: dict[str, Any]
    text: str
    tiers: dict[str, Tier]
    roles: dict[str, str]  # role -> the built-in role it behaves like
    grants: dict[str, tuple[str, ...]]
    masking: dict[str, str]
    project: dict[str, Any] = field(default_factory=dict)
    #: roles whose principals may only read (``roles.X.read_only``): enforced by the policy and the compute role
    read_only_roles: frozenset[str] = frozenset()
    #: per-principal limits by role (``quotas.ROLE`` or ``quotas.default``): branches, computes, bytes
    quotas: dict[str, dict[str, int]] = field(default_factory=dict)

    def read_only(self, role: str) -> bool:
        return role in self.read_only_roles

    def quota(self, role: str) -> dict[str, int]:
        """The limits a principal of ``role`` lives under ({} when none is declared)."""
        return dict(self.quotas.get(role, self.quotas.get("default", {})))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def root(self) -> str:
        return next(t.name for t in self.tiers.values() if t.parent is None)

    @property
    def entry(self) -> str:
        return next((t.name for t in self.tiers.values() if t.entry), self.root)

    def base_role(self, role: str) -> str:
        """The built-in role ``role`` behaves like; a role the config no longer declares is an agent
        (least power: dropping a declaration must not lift the agent rules off its holders)."""
        return self.roles.get(role, "agent")

    def agent_roles(self) -> set[str]:
        return {r for r, base in self.roles.items() if base == "agent"}

    def tier_order(self) -> list[str]:
        """Tiers parents-first, so each can be created from an existing parent."""
        order: list[str] = []
        while len(order) < len(self.tiers):
            for t in self.tiers.values():
                if t.name not in order and (t.parent is None or t.parent in order):
                    order.append(t.name)
        return order

    def diff(self, other: Config | None) -> str:
        before = other.text.splitlines() if other else []
        return "\n".join(difflib.unified_diff(before, self.text.splitlines(), "before", "after", lineterm=""))


def _schema() -> dict[str, Any]:
    text = resources.files("tierbase.governance").joinpath("schemas/config.schema.json").read_text()
    return dict(json.loads(text))


def default_config() -> Config:
    return parse_config('[tiers.production]\nprotected = true\nentry = true\n', "the default config")


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise InvalidInput(f"cannot read {p}: {err.strerror}", "Give the path of your tierbase.toml") from err
    return parse_config(text, str(p))


def parse_config(text: str, source: str = "tierbase.toml") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"TOML syntax: {err}"], source) from err
    problems = [_schema_problem(e) for e in sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(raw),
                                                    key=lambda e: list(e.absolute_path))]
    if problems:
        raise ConfigError(problems, source)
    roles = {r: r for r in BUILTIN_ROLES}
    roles.update({name: spec["like"] for name, spec in raw.get("roles", {}).items()})
    tiers = {name: _tier(name, spec) for name, spec in raw.get("tiers", DEFAULT_TIERS).items()}
    grants = {k: tuple(v) for k, v in raw.get("grants", {}).items()}
    grants.setdefault("unmasked_read", ("platform-engineer",))
    problems = _meaning(tiers, roles, grants) + _no_weakening(raw.get("roles", {}), tiers, roles, grants)
    if problems:
        raise ConfigError(problems, source)
    try:
        from .classify import image_tiers, sensitive_tables
        from .masking import parse_rules

        parse_rules(raw.get("masking", {}))
        sensitive_tables(raw.get("masking", {}))
        unknown = [t for t in image_tiers(raw.get("masking", {})) if not tiers.get(t) or not tiers[t].sensitive]
        if unknown:
            raise InvalidInput(f"masking.image: {', '.join(map(repr, unknown))} is not a tier declared sensitive",
                               "List sensitive tiers only")
    except InvalidInput as err:
        raise ConfigError([err.message], source) from err
    read_only = frozenset(n for n, spec in raw.get("roles", {}).items() if spec.get("read_only"))
    quotas, problems = _quotas(raw.get("quotas", {}), roles)
    if problems:
        raise ConfigError(problems, source)
    return Config(raw=raw, text=text, tiers=tiers, roles=roles, grants=grants, masking=dict(raw.get("masking", {})),
                  project=dict(raw.get("project", {})), read_only_roles=read_only, quotas=quotas)


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _quotas(raw: dict[str, Any], roles: dict[str, str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """``[quotas.ROLE]`` tables as numbers; a role that is not declared, or a size that is not one, is a problem."""
    out: dict[str, dict[str, int]] = {}
    problems = []
    for role, spec in raw.items():
        if role != "default" and role not in roles:
            problems.append(f"quotas.{role}: unknown role {role!r} (known: default, {', '.join(roles)})")
            continue
        limits = {k: int(v) for k, v in spec.items() if k != "bytes"}
        if "bytes" in spec:
            text = str(spec["bytes"]).strip().upper().removesuffix("B").removesuffix("I")
            unit = text[-1:] if text[-1:] in _UNITS else ""
            number = text[:-1] if unit else text
            if not number.isdigit():
                problems.append(f"quotas.{role}.bytes: {spec['bytes']!r} is not a size (e.g. 2G, 512M, 1048576)")
                continue
            limits["bytes"] = int(number) * _UNITS[unit]
        out[role] = limits
    return out, problems


def _schema_problem(err: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        return f"{where}: {err.message} (allowed: {', '.join(sorted(err.schema.get('properties', {})))})"
    return f"{where}: {err.message}"


def _tier(name: str, spec: dict[str, Any]) -> Tier:
    return Tier(name=name, parent=spec.get("parent"), protected=bool(spec.get("protected", False)),
                entry=bool(spec.get("entry", False)), sensitive=bool(spec.get("sensitive", False)),
                masked=bool(spec.get("masked", False)), git_branch=spec.get("git_branch"),
                promote=tuple(spec.get("promote", ("platform-engineer",))),
                branch=tuple(spec["branch"]) if "branch" in spec else None, smoke=spec.get("smoke"))


def _meaning(tiers: dict[str, Tier], roles: dict[str, str], grants: dict[str, tuple[str, ...]]) -> list[str]:
    problems: list[str] = []
    roots = [t.name for t in tiers.values() if t.parent is None]
    if len(roots) != 1:
        problems.append(f"tiers: exactly one tier must have no parent (the root), found {roots or 'none'}")
    for t in tiers.values():
        if t.parent is not None and t.parent not in tiers:
            problems.append(f"tiers.{t.name}.parent: unknown tier {t.parent!r} (declared: {', '.join(tiers)})")
        for key in ("promote", "branch"):
            for role in getattr(t, key) or ():
                if role not in roles:
                    problems.append(f"tiers.{t.name}.{key}: unknown role {role!r} (known: {', '.join(roles)})")
    for t in tiers.values():  # cycles: walk up at most len(tiers) steps
        seen, cur = [t.name], t.parent
        while cur is not None and cur in tiers:
            if cur in seen:
                problems.append(f"tiers.{t.name}.parent: cycle {' -> '.join([*seen, cur])}")
                break
            seen.append(cur)
            cur = tiers[cur].parent
    entries = [t.name for t in tiers.values() if t.entry]
    if len(entries) > 1:
        problems.append(f"tiers: only one tier may be the entry tier, found {entries}")
    for grant, who in grants.items():
        for role in who:
            if role not in roles:
                problems.append(f"grants.{grant}: unknown role {role!r} (known: {', '.join(roles)})")
    return sorted(set(problems))


def _no_weakening(declared: dict[str, Any], tiers: dict[str, Tier], roles: dict[str, str],
                  grants: dict[str, tuple[str, ...]]) -> list[str]:
    """Keys that would weaken the built-in rules: refused, not silently overridden at decision time."""
    problems: list[str] = []
    for name, spec in declared.items():
        like = spec["like"]
        if name == "platform-engineer" and like != name:
            problems.append(f"roles.platform-engineer.like: the platform-engineer role cannot be redefined "
                            f"(it would take the platform from its engineers); declare a new role like {like!r}")
        elif name in POWER and POWER[like] > POWER[name]:
            problems.append(f"roles.{name}.like: the built-in role {name!r} cannot be like the stronger "
                            f"{like!r}; declare a new role like {like!r} and give it to the principals who "
                            "need it")
    for t in tiers.values():
        what = reserved_for(t.name)
        if what is not None:  # the tier's own snapshots and rollbacks would be named like it
            problems.append(f"tiers.{t.name}: the name is reserved for the platform ({what}); rename the tier")
    agents = {r for r, base in roles.items() if base == "agent"}
    for grant in AGENT_NEVER:
        for role in sorted(agents & set(grants.get(grant, ()))):
            problems.append(f"grants.{grant}: {role!r} is an agent role and agents never hold {grant} "
                            "(built-in rule); remove it")
    for t in tiers.values():
        for role in sorted(agents & set(t.promote)):
            problems.append(f"tiers.{t.name}.promote: {role!r} is an agent role and agents never promote "
                            "(built-in rule); remove it")
        reachable = t.entry and t.parent is not None  # agents branch off the entry tier only, never the root
        for role in sorted(agents & set(t.branch or ())) if t.protected and not reachable else ():
            problems.append(f"tiers.{t.name}.branch: {role!r} is an agent role and agents never branch off "
                            f"the protected tier {t.name!r} (built-in rule); remove it")
    return problems
