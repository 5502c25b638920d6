"""The one exception tree of medledger.

Every error carries a human diagnosis (``str(err)``) the CLI and API print as is,
a stable ``code`` (also the ABCI/transaction result code) and an HTTP status.
Foreign exceptions are wrapped at the boundary that meets them.
"""

from __future__ import annotations


class MedledgerError(Exception):
    """Root of every error medledger raises on purpose."""

    code: int = 1
    http_status: int = 500
    issue_code: str = "exception"  # FHIR OperationOutcome issue.code
    retry_after_s: int | None = None  # HTTP Retry-After, for throttling and busy answers

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InvalidInput(MedledgerError):
    """The caller sent something malformed: bad JSON, bad FHIR, bad field, bad tx."""

    code = 2
    http_status = 400
    issue_code = "invalid"


class BadSignature(InvalidInput):
    code = 3
    http_status = 401
    issue_code = "security"


class UnknownSigner(InvalidInput):
    code = 4
    http_status = 401
    issue_code = "security"


class Replay(InvalidInput):
    """A nonce or tx hash that was already used, or a tx for another chain."""

    code = 5
    http_status = 409
    issue_code = "duplicate"


class Unauthenticated(MedledgerError):
    code = 6
    http_status = 401
    issue_code = "login"


class Forbidden(MedledgerError):
    """Policy (role, consent, share grant) denies the action."""

    code = 7
    http_status = 403
    issue_code = "forbidden"


class NotFound(MedledgerError):
    code = 8
    http_status = 404
    issue_code = "not-found"


class Conflict(MedledgerError):
    """A write that conflicts with the ledger: stale version, duplicate patient, duplicate id."""

    code = 9
    http_status = 409
    issue_code = "conflict"


class PreconditionFailed(Conflict):
    code = 10
    http_status = 412


class Gone(MedledgerError):
    """Expired or revoked (share links, tokens)."""

    code = 11
    http_status = 410
    issue_code = "expired"


class UnsupportedMediaType(InvalidInput):
    code = 2
    http_status = 415
    issue_code = "not-supported"


class TooLarge(InvalidInput):
    code = 12
    http_status = 413
    issue_code = "too-costly"


class IntegrityError(MedledgerError):
    """Stored data does not match its hashes, signatures or the replayed state."""

    code = 13
    http_status = 500
    issue_code = "exception"


class StorageError(MedledgerError):
    code = 14
    http_status = 500
    issue_code = "exception"


class Unavailable(MedledgerError):
    """The node cannot serve right now (consensus stalled, store refused)."""

    code = 15
    http_status = 503
    issue_code = "transient"


class TooManyRequests(MedledgerError):
    """Throttled (e.g. repeated failed logins): retry after ``retry_after_s`` seconds."""

    code = 16
    http_status = 429
    issue_code = "throttled"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)  # (a default: an unpickled copy is rebuilt from args)
        self.retry_after_s = max(1, int(retry_after_s))


def busy(message: str, retry_after_s: int = 1) -> Unavailable:
    """A 503 for a node that is overloaded right now (not broken): retry shortly."""
    err = Unavailable(message)
    err.retry_after_s = retry_after_s
    return err
