"""The shipped JSON Schemas (package data) and validation against them at the boundary."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from ..errors import InvalidInput

#: name -> what it describes (``tierbase flow schema NAME`` prints it)
SCHEMAS = {
    "workflow-state": ".tierbase/workflow-state.json, the gate surface (a projection of the control plane)",
    "spec": "TDD artifact of the spec-author: stories and acceptance criteria",
    "architecture": "TDD artifact of the architect-reviewer: a decision per non-functional requirement",
    "test-list": "TDD artifact of the test-strategist: acceptance criteria mapped to named tests, in order",
    "plan": "TDD artifact of the scrum-master: cycles, their order and budget",
    "transition": "--json output of a successful flow/tdd command (init, claim, ready, ci, merge, abandon, ...)",
    "gate-failure": "--json output of a refused transition (exit 2)",
    "status": "--json output of `tierbase flow status`",
    "doctor": "--json output of `tierbase flow doctor`",
    "tdd-status": "--json output of `tierbase tdd status`",
}


@cache
def schema(name: str) -> dict[str, Any]:
    if name not in SCHEMAS:
        raise InvalidInput(f"there is no schema named {name!r}", f"Use one of: {', '.join(SCHEMAS)}")
    text = resources.files("tierbase.workflow").joinpath(f"schemas/{name}.schema.json").read_text()
    return dict(json.loads(text))


def problems(name: str, doc: Any) -> list[str]:
    """Every way ``doc`` breaks schema ``name``, each naming where (empty: valid)."""
    validator = jsonschema.Draft202012Validator(schema(name))
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        out.append(f"{where}: {e.message}")
    return out
