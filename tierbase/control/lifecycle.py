"""The branch lifecycle: its states, the transitions between them, and what each operation needs.

One table, like the workflow's (tierbase/workflow/state.py): the store applies
every state change through :func:`check_transition`, and every operation on a
branch checks :func:`check_op` under the branch's lock (control/locks.py),
after re-reading the row, so that nothing acts on a state another process has
changed since it last looked.

    (none) --reserve--> creating --commit--> ready --begin reset--> resetting --swap/undo--> ready
               creating --undo--> (gone)     ready --mark--> deleting --finish--> (gone)

A row that is not ``ready`` carries the process doing the operation (``owner``,
"pid:starttime") and the principal it acts for (``actor``); when that process
is dead, reconcile finishes or undoes the operation and audits it in the
actor's name.
"""

from __future__ import annotations

from enum import StrEnum

from ..errors import TierbaseError


class State(StrEnum):
    CREATING = "creating"
    READY = "ready"
    RESETTING = "resetting"
    DELETING = "deleting"


class Op(StrEnum):
    START = "start"
    STOP = "stop"
    SUSPEND = "suspend"
    RESET = "reset"
    DELETE = "delete"
    REPOINT = "repoint"     # a route moving to this branch
    BRANCH = "branch"       # taking a copy of it (as a parent)


#: state -> the states it may go to; None is "no row" (before reserve, after the row is removed)
TRANSITIONS: dict[State | None, frozenset[State | None]] = {
    None: frozenset({State.CREATING}),
    State.CREATING: frozenset({State.READY, None}),
    State.READY: frozenset({State.RESETTING, State.DELETING}),
    State.RESETTING: frozenset({State.READY}),
    State.DELETING: frozenset({None}),
}

#: the state a branch must be in for an operation on it; every one needs a settled branch
REQUIRES: dict[Op, State] = {op: State.READY for op in Op}

_DOING = {State.CREATING: "still being created", State.RESETTING: "being reset", State.DELETING: "being deleted"}


class TransitionError(TierbaseError):
    """The branch is in the middle of another operation (or gone): wait and retry."""

    code = "branch_busy"
    http_status = 409


def check_transition(name: str, current: State | None, to: State | None) -> None:
    if to not in TRANSITIONS[current]:
        raise TransitionError(f"branch {name!r} is {_describe(current)} and cannot become {_describe(to)}",
                              "Wait for its operation to finish (`tierbase branch get NAME`), then try again",
                              name=name, state=current.value if current else None)


def check_op(name: str, state: State, op: Op) -> None:
    if state is not REQUIRES[op]:
        raise TransitionError(f"branch {name!r} is {_DOING.get(state, state.value)}: it cannot {op.value} now",
                              "Wait for its operation to finish (`tierbase branch get NAME`), then try again",
                              name=name, state=state.value)


def _describe(state: State | None) -> str:
    return "gone" if state is None else state.value
