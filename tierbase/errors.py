"""One exception root; a subclass per condition a user can act on.

Every error carries a message (what happened) and a hint (what to do), so the
CLI, the HTTP API and ``--json`` all render the same two sentences.
"""

from __future__ import annotations

import errno

TYPE_CHECKING = False  # not typing's: every CLI call imports this module, and typing costs milliseconds
if TYPE_CHECKING:
    from typing import Any, ClassVar


class TierbaseError(Exception):
    """Root of every error tierbase raises on purpose."""

    code: ClassVar[str] = "error"
    #: CLI exit code: 1 error, 2 refused by a rule (policy, gate, protection).
    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 400

    def __init__(self, message: str, hint: str = "", **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.data = data

    def __str__(self) -> str:
        return f"{self.message}. {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "hint": self.hint, "data": self.data,
                "exit_code": self.exit_code}


class InvalidName(TierbaseError):
    code = "invalid_name"


class InvalidInput(TierbaseError):
    code = "invalid_input"


class BranchNotFound(TierbaseError):
    code = "branch_not_found"
    http_status = 404

    def __init__(self, name: str) -> None:
        super().__init__(
            f"branch {name!r} does not exist",
            "Run `tierbase branch list` to see the branches",
            name=name,
        )


class BranchExists(TierbaseError):
    code = "branch_exists"
    http_status = 409

    def __init__(self, name: str) -> None:
        super().__init__(
            f"branch {name!r} already exists",
            "Pick another name, or delete the existing branch first",
            name=name,
        )


class Refused(TierbaseError):
    """An operation a rule forbids (protection, children, policy): exit 2."""

    code = "refused"
    exit_code = 2
    http_status = 403


class PolicyDenied(Refused):
    code = "policy_denied"

    def __init__(self, action: str, target: str, reason: str, rule: str = "") -> None:
        super().__init__(
            f"{action} on {target!r} is refused: {reason}",
            "Ask a platform engineer to change the declared policy if this is wrong",
            action=action,
            target=target,
            reason=reason,
            rule=rule,
        )


class StorageError(TierbaseError):
    code = "storage_error"
    http_status = 500


class DiskFull(StorageError):
    code = "disk_full"
    http_status = 507


class ComputeError(TierbaseError):
    code = "compute_error"
    http_status = 500


class NotSupported(TierbaseError):
    """An operation this platform's provider cannot do (e.g. branching at a past point in time)."""

    code = "not_supported"
    http_status = 501


class PortInUse(ComputeError):
    """A compute's own port is held by another process: it is neither taken over nor swapped silently."""

    code = "port_in_use"
    http_status = 409


class BinariesNotFound(ComputeError):
    code = "postgres_not_found"


class NotRunning(TierbaseError):
    code = "not_running"
    http_status = 503


class Unauthorized(TierbaseError):
    code = "unauthorized"
    http_status = 401


class BadDump(InvalidInput):
    """An uploaded dump is not one tierbase can restore (format, archive members, encoding)."""

    code = "bad_dump"


class UnsafeDump(BadDump):
    """A plain dump holds a psql meta-command: a dump is data, so nothing of it is run."""

    code = "unsafe_dump"


class RestoreFailed(TierbaseError):
    """Postgres or the restore tool rejected a dump; nothing of it was kept."""

    code = "restore_failed"
    http_status = 422


class UploadTooLarge(InvalidInput):
    code = "upload_too_large"
    http_status = 413


def error_from_dict(payload: dict[str, Any]) -> TierbaseError:
    """Rebuild an error received over the API as the same class."""
    code = str(payload.get("code"))
    classes = {cls.code: cls for cls in _all_subclasses(TierbaseError)}
    cls = classes.get(code)
    if cls is None:
        # a class this process has not imported (the CLI imports lazily: workflow's GateFailed is not
        # loaded by `ci runner`): keep the envelope's code and exit code, so a refusal still exits 2
        exit_code = payload.get("exit_code")
        cls = type("RemoteError", (TierbaseError,), {
            "code": code, "exit_code": exit_code if isinstance(exit_code, int) and exit_code in (1, 2) else 1})
    err = TierbaseError.__new__(cls)
    TierbaseError.__init__(err, str(payload.get("message", "")), str(payload.get("hint", "")),
                           **dict(payload.get("data") or {}))
    return err


def _all_subclasses(cls: type[TierbaseError]) -> list[type[TierbaseError]]:
    out: list[type[TierbaseError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


class ComputeBusy(TierbaseError):
    """A compute that cannot answer now (starting up, in crash recovery, shutting down)."""

    code = "compute_busy"
    http_status = 503


def space_exhausted(text: str) -> bool:
    """An OS or Postgres message saying a write found no room: a full pool, or a feature branch at the
    features' quota limit (Postgres reports EDQUOT as XX000, so the text is what tells)."""
    return "No space left on device" in text or "Disk quota exceeded" in text


def translate(err: BaseException) -> TierbaseError:
    """Errors that are not tierbase's own (psycopg, the OS), as one of ours with what to do.

    Called at the layer edges (the gate's audit, the API's envelope) so that a client always gets
    ``code``, ``message`` and ``hint``, never a bare 500.
    """
    if isinstance(err, TierbaseError):
        return err
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or space_exhausted(text):
        return DiskFull(f"no space left on the device: {text}",
                        "Free space (delete branches you no longer need) or give tierbase more room")
    sqlstate = getattr(err, "sqlstate", None)
    if sqlstate == "53100":
        return DiskFull(f"a compute ran out of disk space: {text}", "Delete branches you no longer need")
    if sqlstate in ("57P03", "57P01", "57P02") or any(w in text for w in (
            "the database system is starting up", "the database system is in recovery mode",
            "the database system is shutting down", "Connection refused")):
        return ComputeBusy(f"a compute is not ready: {text}", "Retry in a few seconds; `tierbase branch list` "
                           "shows its state")
    return TierbaseError(f"internal error ({type(err).__name__}): {text}",
                         "This is a tierbase bug or a problem of the machine; see the service log (service.log)")


class OutsideHistory(InvalidInput):
    """A point in time or LSN the tier's history cannot reach (before its window, in the future, past
    the end of its WAL): nothing was made."""

    code = "outside_history"


class ArchiveCorrupt(TierbaseError):
    """A WAL segment in an archive is missing or does not match the checksum recorded when it was
    archived: recovery through it is refused (nothing was made)."""

    code = "archive_corrupt"
    http_status = 500


class SqlFailed(TierbaseError):
    """Postgres refused a statement sent through `POST /v1/branches/{name}/sql`; nothing of the call was kept."""

    code = "sql_error"
    http_status = 422


class SqlTimeout(SqlFailed):
    """A statement ran past the call's time limit: the compute cancelled it, nothing of the call was kept."""

    code = "sql_timeout"
    http_status = 408


class QuotaExceeded(Refused):
    """A per-principal quota of tierbase.toml (``[quotas.ROLE]``) would be exceeded."""

    code = "quota_exceeded"


class SessionNotFound(TierbaseError):
    code = "session_not_found"
    http_status = 404

    def __init__(self, sid: str, ended: str | None = None) -> None:
        super().__init__(f"session {sid!r} " + (f"is over ({ended})" if ended else "does not exist"),
                         "Run `tierbase session list` to see your live sessions; start one with "
                         "`tierbase session start`", session=sid)
