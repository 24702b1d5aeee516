"""The registry client: one gRPC channel, an API key, deadlines, retries, typed errors."""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import grpc
import pandas as pd
from google.protobuf import json_format

from . import errors, frames
from .v1 import case_pb2, case_pb2_grpc, common_pb2, research_pb2, research_pb2_grpc

API_KEY_ENV = "ERN_API_KEY"
DEFAULT_ADDRESS = "127.0.0.1:50051"

T = TypeVar("T")

PathOrBytes = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff and jitter, within the call's deadline.

    Only codes in ``retry_on`` are retried, and only where a retry is safe (see
    :class:`Client`). A RetryInfo delay from the server is waited out in full (when it
    fits in the deadline), never shortened by the backoff."""

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retry_on: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    )

    def backoff(self, attempt: int) -> float:
        """The pause after failed attempt ``attempt`` (1-based), without the jitter."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))


NO_RETRY = RetryPolicy(max_attempts=1)

#: SubmitCase and UpdateCase write: they are retried only on RESOURCE_EXHAUSTED, which the
#: server answers before doing anything (a rate or concurrency limit).
_WRITE_RETRY_ON = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})


def call_with_retries(
    attempt: Callable[[float | None], T],
    policy: RetryPolicy,
    timeout: float | None,
    *,
    retry_on: frozenset[grpc.StatusCode] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[int, errors.RegistryError, float], None] | None = None,
) -> T:
    """Runs ``attempt(remaining_timeout)`` until it succeeds, fails with a code not to
    retry, runs out of attempts or of the deadline ``timeout`` (seconds, for all
    attempts together). Raises the typed :class:`~ern_registry.errors.RegistryError`."""
    codes = policy.retry_on if retry_on is None else retry_on & policy.retry_on
    deadline = None if timeout is None else clock() + timeout
    number = 0
    while True:
        number += 1
        remaining = None if deadline is None else max(0.0, deadline - clock())
        if remaining is not None and remaining <= 0.0:
            # Nothing is sent once the deadline has passed: the server would answer
            # CANCELLED or DEADLINE_EXCEEDED depending on which side sees it first.
            raise errors.DeadlineExceeded("the call's deadline passed before it was sent")
        try:
            return attempt(remaining)
        except grpc.RpcError as rpc_error:
            error = errors.from_rpc_error(rpc_error)
        if error.code not in codes or not error.retryable or number >= policy.max_attempts:
            raise error
        pause = policy.backoff(number) * random.uniform(0.5, 1.0)
        if error.retry_delay is not None:
            pause = max(pause, error.retry_delay.total_seconds())
        if deadline is not None and clock() + pause >= deadline:
            raise error
        if on_retry is not None:
            on_retry(number, error, pause)
        sleep(pause)


@dataclass(frozen=True)
class Submitted:
    """A stored case: its pseudonym, version and when it was recorded."""

    pseudonym: str
    version: int
    recorded_at: _dt.datetime | None


@dataclass(frozen=True)
class SubmissionResult:
    """The outcome of one submission of a bulk stream, in the order they were sent.

    ``submitted`` when stored; otherwise ``error``, the exception a single SubmitCase
    would have raised (``InvalidArgument`` with its field violations, ``AlreadyExists``,
    ``ConsentRequired``, ...)."""

    sequence: int
    client_reference: str
    submitted: Submitted | None = None
    error: errors.RegistryError | None = None

    @property
    def ok(self) -> bool:
        return self.submitted is not None


def _read(value: PathOrBytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _timestamp(ts: Any) -> _dt.datetime | None:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=_dt.timezone.utc)


def submission(
    request: case_pb2.SubmitCaseRequest | Mapping[str, Any] | None = None,
    **fields: Any,
) -> case_pb2.SubmitCaseRequest:
    """A SubmitCaseRequest from a message, or from a dict in the proto JSON form (as in
    the README: ``{"registry": ..., "patient": {"national": {...}}, "record": {...},
    "consent": [...], "clientReference": ...}``), with ``fields`` (same form) set on top."""
    if isinstance(request, case_pb2.SubmitCaseRequest):
        message = case_pb2.SubmitCaseRequest()
        message.CopyFrom(request)
    else:
        message = json_format.ParseDict(dict(request or {}), case_pb2.SubmitCaseRequest())
    if fields:
        json_format.ParseDict(fields, message)
    return message


def national(issuing_country: str, value: str) -> dict[str, Any]:
    """Patient identifiers: a national identifier (for ``NL`` the BSN)."""
    return {"national": {"issuingCountry": issuing_country, "value": value}}


def consent(
    scope: str,
    state: str = "granted",
    *,
    given_at: _dt.datetime | _dt.date | str,
    form_version: str,
    expires_at: _dt.datetime | _dt.date | str | None = None,
) -> dict[str, Any]:
    """One attested consent decision: ``scope`` ``registry_inclusion``,
    ``research_use`` or ``recontact``; ``state`` ``granted`` or ``refused``."""

    def instant(t: _dt.datetime | _dt.date | str) -> str:
        if isinstance(t, str):
            return t
        if not isinstance(t, _dt.datetime):
            t = _dt.datetime(t.year, t.month, t.day, tzinfo=_dt.timezone.utc)
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.timezone.utc)
        return t.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")

    item = {
        "scope": "CONSENT_SCOPE_" + scope.upper().removeprefix("CONSENT_SCOPE_"),
        "state": "CONSENT_STATE_" + state.upper().removeprefix("CONSENT_STATE_"),
        "givenAt": instant(given_at),
        "formVersion": form_version,
    }
    if expires_at is not None:
        item["expiresAt"] = instant(expires_at)
    return item


class Client:
    """A client of one registry server.

    ``address``: ``host:port``, or ``http://host:port`` / ``https://host:port``
    (https implies TLS). ``api_key``: defaults to the ``ERN_API_KEY`` environment
    variable. TLS: ``tls=True`` (or an https address) with ``root_certificates`` (PEM
    path or bytes; default: gRPC's bundled roots), and for mutual TLS
    ``client_certificate`` and ``client_key``. ``timeout``: the default deadline of a
    call in seconds, retries included (``None``: no deadline); each method takes its
    own ``timeout`` too.

    Retries (``retry``, a :class:`RetryPolicy`): the research calls and GetCase are
    reads and are retried on UNAVAILABLE and RESOURCE_EXHAUSTED; SubmitCase and
    UpdateCase (writes) only on RESOURCE_EXHAUSTED, which the server answers before doing
    anything. The bulk stream :meth:`submit_cases` is not retried: each result says what
    became of its submission.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        root_certificates: PathOrBytes | None = None,
        client_certificate: PathOrBytes | None = None,
        client_key: PathOrBytes | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        if not key.strip():
            raise ValueError(f"no API key: pass api_key= or set {API_KEY_ENV}")
        self._metadata = (("authorization", f"Bearer {key.strip()}"),)
        target = address
        if address.startswith("https://"):
            target, tls = address.removeprefix("https://"), True if tls is None else tls
        elif address.startswith("http://"):
            target = address.removeprefix("http://")
        target = target.rstrip("/")
        if (client_certificate is None) != (client_key is None):
            raise ValueError("mutual TLS needs both client_certificate and client_key")
        if tls is None:
            tls = root_certificates is not None or client_certificate is not None
        # The server bounds its answers (--max-message-bytes); grpcio's own default of
        # 4 MiB would refuse a larger one as RESOURCE_EXHAUSTED, which reads as a rate
        # limit and is retried in vain. A limit given in `options` is kept.
        channel_options = list(options)
        if not any(name == "grpc.max_receive_message_length" for name, _ in channel_options):
            channel_options.append(("grpc.max_receive_message_length", -1))
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(root_certificates),
                private_key=_read(client_key),
                certificate_chain=_read(client_certificate),
            )
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self.timeout = timeout
        self.retry = retry
        self._cases = case_pb2_grpc.CaseServiceStub(self._channel)
        self._research = research_pb2_grpc.ResearchServiceStub(self._channel)

    # -- plumbing ---------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(
        self,
        method: Callable[..., T],
        request: Any,
        timeout: float | None | type[Ellipsis],
        retry_on: frozenset[grpc.StatusCode] | None = None,
    ) -> T:
        deadline = self.timeout if timeout is ... else timeout
        return call_with_retries(
            lambda remaining: method(request, timeout=remaining, metadata=self._metadata),
            self.retry,
            deadline,  # type: ignore[arg-type]
            retry_on=retry_on,
        )

    @staticmethod
    def _filters(filters: Mapping[str | int, Iterable[str] | str] | None) -> list[research_pb2.Filter]:
        out = []
        for dimension, values in (filters or {}).items():
            if isinstance(values, str):
                values = [values]
            out.append(research_pb2.Filter(dimension=frames.dimension_value(dimension), values=list(values)))
        return out

    # -- researchers --------------------------------------------------------------------

    def count_patients_table(
        self,
        registry: str,
        group_by: Sequence[str | int] = (),
        filters: Mapping[str | int, Iterable[str] | str] | None = None,
        *,
        timeout: float | None | type[Ellipsis] = ...,
    ) -> research_pb2.CountTable:
        """CountPatients, the message as received."""
        request = research_pb2.CountPatientsRequest(
            registry=registry,
            group_by=[frames.dimension_value(d) for d in group_by],
            filters=self._filters(filters),
        )
        return self._unary(self._research.CountPatients, request, timeout)

    def count_patients(
        self,
        registry: str,
        group_by: Sequence[str | int] = (),
        filters: Mapping[str | int, Iterable[str] | str] | None = None,
        *,
        timeout: float | None | type[Ellipsis] = ...,
    ) -> pd.DataFrame:
        """Patients counted by up to four dimensions (``"country"``, ``"sex"``, ...),
        filtered by ``{dimension: values}``, as a DataFrame (:func:`frames.count_table`):
        suppressed counts are missing, ``df.ern.mask`` marks them, ``df.ern.k``,
        ``df.ern.suppressed`` and ``df.ern.as_of`` are the answer's metadata."""
        return frames.count_table(
            self.count_patients_table(registry, group_by, filters, timeout=timeout)
        )

    def diagnostic_delay_table(
        self,
        registry: str,
        group_by: Sequence[str | int] = (),
        filters: Mapping[str | int, Iterable[str] | str] | None = None,
        *,
        timeout: float | None | type[Ellipsis] = ...,
    ) -> research_pb2.DiagnosticDelayResponse:
        """DiagnosticDelay, the message as received."""
        request = research_pb2.DiagnosticDelayRequest(
            registry=registry,
            group_by=[frames.dimension_value(d) for d in group_by],
            filters=self._filters(filters),
        )
        return self._unary(self._research.DiagnosticDelay, request, timeout)

    def diagnostic_delay(
        self,
        registry: str,
        group_by: Sequence[str | int] = (),
        filters: Mapping[str | int, Iterable[str] | str] | None = None,
        *,
        timeout: float | None | type[Ellipsis] = ...,
    ) -> pd.DataFrame:
        """Diagnostic delay per group as a DataFrame (:func:`frames.delay_table`): band
        counts (suppressed ones missing), totals and quantiles in years."""
        return frames.delay_table(
            self.diagnostic_delay_table(registry, group_by, filters, timeout=timeout)
        )

    def find_expertise(
        self,
        orphacodes: Sequence[str] | str,
        *,
        countries: Sequence[str] = (),
        registries: Sequence[str] = (),
        timeout: float | None | type[Ellipsis] = ...,
    ) -> pd.DataFrame:
        """The centres with cases of these diagnoses, by volume band, as a DataFrame
        (:func:`frames.expertise_table`)."""
        if isinstance(orphacodes, str):
            orphacodes = [orphacodes]
        request = research_pb2.FindExpertiseRequest(
            orphacodes=list(orphacodes), countries=list(countries), registries=list(registries)
        )
        return frames.expertise_table(self._unary(self._research.FindExpertise, request, timeout))

    # -- physicians ---------------------------------------------------------------------

    def submit_case(
        self,
        request: case_pb2.SubmitCaseRequest | Mapping[str, Any] | None = None,
        *,
        timeout: float | None | type[Ellipsis] = ...,
        **fields: Any,
    ) -> Submitted:
        """Submits one case (a message, or a dict in the proto JSON form; see
        :func:`submission`). Raises ``InvalidArgument`` (every field violation),
        ``ConsentRequired``, ``AlreadyExists``, ``PermissionDenied``, ..."""
        message = submission(request, **fields)
        response = self._unary(self._cases.SubmitCase, message, timeout, _WRITE_RETRY_ON)
        return Submitted(response.pseudonym, response.version, _timestamp(response.recorded_at))

    def submit_cases(
        self,
        requests: Iterable[case_pb2.SubmitCaseRequest | Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> Iterator[SubmissionResult]:
        """Streams submissions through SubmitCases and yields one result per
        submission, in order, as each is committed. ``requests`` may be a generator: it
        is consumed as the stream flows. A rejected submission does not stop the stream;
        a failure of the stream itself raises (the results yielded so far stand)."""
        messages = (submission(r) for r in requests)
        responses = self._cases.SubmitCases(messages, timeout=timeout, metadata=self._metadata)
        try:
            for result in responses:
                yield _submission_result(result)
        except grpc.RpcError as rpc_error:
            raise errors.from_rpc_error(rpc_error) from None

    def submit_phenopacket(
        self,
        registry: str,
        patient: Mapping[str, Any],
        phenopacket: str | Mapping[str, Any],
        *,
        consent: Iterable[Mapping[str, Any]] = (),
        client_reference: str = "",
        timeout: float | None | type[Ellipsis] = ...,
    ) -> Submitted:
        """Submits one case as a GA4GH Phenopacket v2 (its JSON text, or the parsed JSON
        as a dict). The patient is identified by ``patient`` (as for :meth:`submit_case`),
        never by the phenopacket, whose ``id`` and ``subject.id`` the server ignores.
        Raises ``InvalidArgument`` with every element the case record cannot hold, by its
        JSON path (``phenopacket.phenotypicFeatures[1].excluded``), and as
        :meth:`submit_case` otherwise."""
        request = case_pb2.SubmitPhenopacketRequest(
            registry=registry,
            phenopacket=phenopacket if isinstance(phenopacket, str) else json.dumps(phenopacket),
            client_reference=client_reference,
        )
        json_format.ParseDict(dict(patient), request.patient)
        for item in consent:
            json_format.ParseDict(dict(item), request.consent.add())
        response = self._unary(self._cases.SubmitPhenopacket, request, timeout, _WRITE_RETRY_ON)
        return Submitted(response.pseudonym, response.version, _timestamp(response.recorded_at))

    def export_phenopackets(
        self,
        registry: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None | type[Ellipsis] = ...,
    ) -> Iterator[dict[str, Any]]:
        """Yields the caller's own centre's cases in ``registry`` as GA4GH Phenopackets v2
        (parsed JSON), page by page (``page_size``: 1 to 200; 0, the server's 50), each
        with the pseudonym as ``subject.id``, from after ``page_token`` (a pseudonym; empty:
        from the first). A case whose phenopacket alone is over the server's message limit
        raises :class:`~ern_registry.errors.TooLarge`, whose ``page_token`` goes on after
        it (pass it here) and whose ``resource_name`` is the case to read with
        ``get_case``."""
        token = page_token
        while True:
            request = case_pb2.ExportPhenopacketsRequest(
                registry=registry, page_size=page_size, page_token=token
            )
            response = self._unary(self._cases.ExportPhenopackets, request, timeout)
            for text in response.phenopackets:
                yield json.loads(text)
            token = response.next_page_token
            if not token:
                return

    def update_case(
        self,
        registry: str,
        pseudonym: str,
        expected_version: int,
        record: case_pb2.CaseRecord | Mapping[str, Any],
        *,
        consent: Iterable[Mapping[str, Any]] = (),
        timeout: float | None | type[Ellipsis] = ...,
    ) -> Submitted:
        """Stores a new version of a case of the caller's centre. Raises ``Aborted`` when
        the case is no longer at ``expected_version`` (read it again)."""
        request = case_pb2.UpdateCaseRequest(
            registry=registry, pseudonym=pseudonym, expected_version=expected_version
        )
        if isinstance(record, case_pb2.CaseRecord):
            request.record.CopyFrom(record)
        else:
            json_format.ParseDict(dict(record), request.record)
        for item in consent:
            json_format.ParseDict(dict(item), request.consent.add())
        response = self._unary(self._cases.UpdateCase, request, timeout, _WRITE_RETRY_ON)
        return Submitted(response.pseudonym, response.version, _timestamp(response.recorded_at))

    def get_case(
        self,
        registry: str,
        pseudonym: str,
        *,
        include_history: bool = False,
        timeout: float | None | type[Ellipsis] = ...,
    ) -> case_pb2.Case:
        """Reads back a case of the caller's centre."""
        request = case_pb2.GetCaseRequest(
            registry=registry, pseudonym=pseudonym, include_history=include_history
        )
        return self._unary(self._cases.GetCase, request, timeout).case


def _submission_result(result: case_pb2.SubmitCasesResult) -> SubmissionResult:
    if result.HasField("accepted"):
        a = result.accepted
        return SubmissionResult(
            result.sequence,
            result.client_reference,
            submitted=Submitted(a.pseudonym, a.version, _timestamp(a.recorded_at)),
        )
    r = result.rejected
    code = next((c for c in grpc.StatusCode if c.value[0] == r.code), grpc.StatusCode.UNKNOWN)
    details: list[Any] = []
    if r.field_violations:
        from google.rpc import error_details_pb2

        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in r.field_violations
                ]
            )
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION and "REGISTRY_INCLUSION" in r.message:
        from google.rpc import error_details_pb2

        details.append(
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type="CONSENT", subject="REGISTRY_INCLUSION", description=r.message
                    )
                ]
            )
        )
    if r.existing_case:
        from google.rpc import error_details_pb2

        details.append(error_details_pb2.ResourceInfo(resource_type="case", resource_name=r.existing_case))
    return SubmissionResult(
        result.sequence, result.client_reference, error=errors.from_code(code, r.message, details)
    )


__all__ = [
    "Client",
    "RetryPolicy",
    "NO_RETRY",
    "Submitted",
    "SubmissionResult",
    "call_with_retries",
    "submission",
    "national",
    "consent",
    "common_pb2",
]
