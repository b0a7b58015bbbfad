"""The commands agents and scripts call in loops, declared once (cli/spec.py), without click:
`branch create`, `delete`, `show`, `reset`, `start` and `stop`.

cli/branches.py registers them in the `branch` group through ``base.from_spec`` (so ``--help`` and
every argv the fast parser leaves alone are click's); cli/fast.py runs them without importing click.
Each ``run`` is the command's whole body: one SDK call, then text or ``--json``.
"""

from __future__ import annotations

from .render import branch_details, echo, emit_json
from .spec import TTL, Command, argument, flag, option

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..api.client import Client


def _create(sdk: Client, as_json: bool, *, name: str, parent: str | None, ttl: str | None, snapshot: bool,
            start: bool, at: str | None, lsn: str | None, exclusive: bool) -> None:
    b = sdk.create_branch(name, parent, ttl=ttl, snapshot=snapshot, start=start, at=at, lsn=lsn,
                          inclusive=not exclusive)
    if as_json:
        emit_json(b)
        return
    if b.get("target"):
        when = b["target"]["time"] or f"LSN {b['target']['lsn']}"
        echo(f"created branch {b['name']!r} from {b['parent']!r} as of {when} in {b['elapsed_ms']} ms "
             f"(base snapshot + WAL replayed to {b['fork_lsn']})")
        return
    how = "copy-on-write snapshot" if b["copy_on_write"] else "FULL COPY (copy driver, O(size))"
    echo(f"created {b['kind']} branch {b['name']!r} from {b['parent']!r} in {b['elapsed_ms']} ms ({how})")


def _delete(sdk: Client, as_json: bool, *, name: str, recursive: bool) -> None:
    gone = sdk.delete_branch(name, recursive)
    emit_json({"deleted": gone}) if as_json else echo(f"deleted {', '.join(gone)}")


def _show(sdk: Client, as_json: bool, *, name: str) -> None:
    data = sdk.get_branch(name)
    emit_json(data) if as_json else branch_details(data)


def _reset(sdk: Client, as_json: bool, *, name: str) -> None:
    b = sdk.reset_branch(name)
    emit_json(b) if as_json else echo(f"reset {name!r} to the current state of {b['parent']!r}")


def _start(sdk: Client, as_json: bool, *, name: str) -> None:
    b = sdk.start_branch(name)
    emit_json(b) if as_json else echo(f"{name}: compute {b['compute']} (pid {b['pid']}, port {b['port']})")


def _stop(sdk: Client, as_json: bool, *, name: str) -> None:
    b = sdk.stop_branch(name)
    emit_json(b) if as_json else echo(f"{name}: compute {b['compute']}")


BRANCH_CREATE = Command(
    "branch", "create", _create,
    argument("name"),
    option("parent", "--parent", "Branch to fork (default: production)."),
    TTL,
    flag("snapshot", "--snapshot", "A read-only snapshot instead of a writable branch."),
    flag("start", "--start", "Start its compute right away."),
    option("at", "--at", "PARENT as it was then: ISO 8601 with a zone, or -5m, -1h30m."),
    option("lsn", "--lsn", "PARENT as it was at this WAL position (e.g. 0/1A2B3C4)."),
    flag("exclusive", "--exclusive", "With --at/--lsn: leave out a commit exactly at the target."),
    doc="Create NAME as a copy-on-write branch of PARENT's current state (or of a past one: --at/--lsn).",
)

BRANCH_DELETE = Command(
    "branch", "delete", _delete,
    argument("name"),
    flag("recursive", "--recursive", "Also delete every descendant."),
    doc="Delete a branch (and with --recursive its descendants).",
)

BRANCH_SHOW = Command("branch", "show", _show, argument("name"), doc="Everything about one branch.")
BRANCH_RESET = Command("branch", "reset", _reset, argument("name"),
                       doc="Throw away NAME's changes: back to its parent's current state, same URL.")
BRANCH_START = Command("branch", "start", _start, argument("name"), doc="Start NAME's compute.")
BRANCH_STOP = Command("branch", "stop", _stop, argument("name"),
                      doc="Stop NAME's compute (it wakes again on the next connection).")

#: (group, command) -> declaration: what cli/fast.py may run without click
HOT = {(c.group, c.name): c for c in (BRANCH_CREATE, BRANCH_DELETE, BRANCH_SHOW, BRANCH_RESET, BRANCH_START,
                                      BRANCH_STOP)}
