"""Typed exceptions for the registry's gRPC status codes and their details.

The server answers errors with a canonical status code and, where it helps the caller,
``google.rpc`` details in ``grpc-status-details-bin``: field violations (``BadRequest``)
with INVALID_ARGUMENT, a ``PreconditionFailure`` naming the missing consent, a
``RetryInfo`` with the time to wait when rate limited or unavailable, a ``ResourceInfo``
with ALREADY_EXISTS. :func:`from_rpc_error` decodes them into one exception per code.
Messages and details never contain patient identifiers (the server's promise).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "RegistryError",
    "InvalidArgument",
    "FieldViolation",
    "FailedPrecondition",
    "ConsentRequired",
    "PermissionDenied",
    "Unauthenticated",
    "NotFound",
    "AlreadyExists",
    "Aborted",
    "RateLimited",
    "TooLarge",
    "Unavailable",
    "DeadlineExceeded",
    "Internal",
    "from_rpc_error",
    "from_code",
]


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path in the request (``record.diagnosis.orphacode``) and
    what is expected."""

    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    type: str
    subject: str
    description: str


class RegistryError(Exception):
    """A call the registry refused or could not answer.

    ``code`` is the gRPC status code, ``message`` the server's message, ``details`` the
    decoded ``google.rpc`` detail messages, ``retry_delay`` the wait the server asked for
    (RetryInfo), if any.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    #: Whether a retry may get another answer (when the policy retries its code).
    retryable: bool = True

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: list[Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: list[Any] = list(details or [])

    def _detail(self, kind: type) -> Any:
        return next((d for d in self.details if isinstance(d, kind)), None)

    @property
    def retry_delay(self) -> _dt.timedelta | None:
        """The RetryInfo delay: how long to wait before trying again."""
        info = self._detail(error_details_pb2.RetryInfo)
        if info is None or not info.HasField("retry_delay"):
            return None
        return info.retry_delay.ToTimedelta()

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        return self._detail(error_details_pb2.ErrorInfo)

    @property
    def field_violations(self) -> list[FieldViolation]:
        request = self._detail(error_details_pb2.BadRequest)
        if request is None:
            return []
        return [FieldViolation(v.field, v.description) for v in request.field_violations]

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, grpc.StatusCode) else str(self.code)
        return f"{name}: {self.message}"


class InvalidArgument(RegistryError):
    """INVALID_ARGUMENT: ``field_violations`` lists every invalid field at once."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __str__(self) -> str:
        fields = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
        return f"{super().__str__()} ({fields})" if fields else super().__str__()


class FailedPrecondition(RegistryError):
    """FAILED_PRECONDITION: e.g. a research question too fine to be answered safely."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    @property
    def precondition_violations(self) -> list[PreconditionViolation]:
        failure = self._detail(error_details_pb2.PreconditionFailure)
        if failure is None:
            return []
        return [PreconditionViolation(v.type, v.subject, v.description) for v in failure.violations]


class ConsentRequired(FailedPrecondition):
    """FAILED_PRECONDITION because the patient's consent (``scope``, e.g.
    ``REGISTRY_INCLUSION``) is not in force: nothing was stored."""

    @property
    def scope(self) -> str:
        for v in self.precondition_violations:
            if v.type == "CONSENT":
                return v.subject
        return ""


class PermissionDenied(RegistryError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RegistryError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(RegistryError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RegistryError):
    """ALREADY_EXISTS: the centre already has a case for this patient (use UpdateCase)."""

    code = grpc.StatusCode.ALREADY_EXISTS

    @property
    def resource_name(self) -> str:
        """The existing case's pseudonym, when the server names it."""
        info = self._detail(error_details_pb2.ResourceInfo)
        return info.resource_name if info is not None else ""


class Aborted(RegistryError):
    """ABORTED: another change came first. For an update, the case moved on since
    ``expected_version``: read it again. For a submission or a first consent decision,
    the registry's pseudonym key was rotated while the call was in flight: send it again
    (a pseudonym taken from before the rotation: name the patient by identifiers)."""

    code = grpc.StatusCode.ABORTED


class RateLimited(RegistryError):
    """RESOURCE_EXHAUSTED: a rate or concurrency limit; ``retry_delay`` says how long to
    wait."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooLarge(RegistryError):
    """RESOURCE_EXHAUSTED, not a rate limit: an export page whose first phenopacket alone
    is over the server's message limit (ErrorInfo reason
    ``PHENOPACKET_OVER_MESSAGE_LIMIT``). Retrying gets the same answer, so it is not
    retried. ``resource_name`` is that case's pseudonym (read it with ``get_case``), and
    ``page_token`` goes on after it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = False

    @property
    def resource_name(self) -> str:
        info = self._detail(error_details_pb2.ResourceInfo)
        return info.resource_name if info is not None else ""

    @property
    def page_token(self) -> str:
        info = self.error_info
        return info.metadata.get("page_token", "") if info is not None else ""


class Unavailable(RegistryError):
    """UNAVAILABLE: the server (or its database) cannot answer now; retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RegistryError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(RegistryError):
    """INTERNAL: the message carries a reference to quote to the operator."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[RegistryError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        NotFound,
        AlreadyExists,
        Aborted,
        RateLimited,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}

#: The ErrorInfo reason of :class:`TooLarge`.
OVER_MESSAGE_LIMIT = "PHENOPACKET_OVER_MESSAGE_LIMIT"

_DETAIL_TYPES = (
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
    error_details_pb2.RequestInfo,
)


def _unpack(status: status_pb2.Status | None) -> list[Any]:
    details: list[Any] = []
    if status is None:
        return details
    for any_detail in status.details:
        for kind in _DETAIL_TYPES:
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                details.append(message)
                break
    return details


def from_code(code: grpc.StatusCode, message: str, details: list[Any] | None = None) -> RegistryError:
    """The exception for ``code`` (ConsentRequired for a missing consent)."""
    cls = _BY_CODE.get(code, RegistryError)
    if cls is FailedPrecondition and any(
        isinstance(d, error_details_pb2.PreconditionFailure)
        and any(v.type == "CONSENT" for v in d.violations)
        for d in details or []
    ):
        cls = ConsentRequired
    if cls is RateLimited and any(
        isinstance(d, error_details_pb2.ErrorInfo) and d.reason == OVER_MESSAGE_LIMIT
        for d in details or []
    ):
        cls = TooLarge
    return cls(message, code=code, details=details)


def from_rpc_error(error: grpc.RpcError) -> RegistryError:
    """Decodes a grpc error (its code, message and ``google.rpc`` details)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    return from_code(code, message or "", _unpack(status))
