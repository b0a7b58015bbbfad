"""The one refusal of the workflow kit: a gate whose preconditions do not hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import Refused

DOCTOR_HINT = "Run `tierbase flow doctor --fix` to rewrite it from the control plane's history"


@dataclass(frozen=True)
class Failure:
    """One failing precondition: a stable code for machines, a sentence for people."""

    code: str
    message: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        if self.data:
            out["data"] = self.data
        return out


class GateFailed(Refused):
    """A transition was refused: every failing precondition is listed; nothing changed (exit 2)."""

    code = "gate_failed"

    def __init__(self, gate: str, failures: list[Failure], state: str | None = None) -> None:
        first = failures[0]
        more = f" (and {len(failures) - 1} more: {', '.join(f.code for f in failures[1:])})" if failures[1:] else ""
        hints = [f.hint for f in failures if f.hint]
        super().__init__(
            f"the {gate} gate is closed: {first.message}{more}",
            hints[0] if len(hints) == 1 else
            ("; ".join(dict.fromkeys(hints)) if hints else "Fix every listed precondition and run it again"),
            gate=gate,
            state=state,
            failures=[f.to_dict() for f in failures],
        )
        self.failures = failures
