import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from ern_registry.v1 import common_pb2 as _common_pb2
from ern_registry.v1 import case_pb2 as _case_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WithdrawalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WITHDRAWAL_REASON_UNSPECIFIED: _ClassVar[WithdrawalReason]
    WITHDRAWAL_REASON_PATIENT_REQUEST: _ClassVar[WithdrawalReason]
    WITHDRAWAL_REASON_REPRESENTATIVE_REQUEST: _ClassVar[WithdrawalReason]
    WITHDRAWAL_REASON_CONSENT_INVALID: _ClassVar[WithdrawalReason]
    WITHDRAWAL_REASON_OTHER: _ClassVar[WithdrawalReason]
WITHDRAWAL_REASON_UNSPECIFIED: WithdrawalReason
WITHDRAWAL_REASON_PATIENT_REQUEST: WithdrawalReason
WITHDRAWAL_REASON_REPRESENTATIVE_REQUEST: WithdrawalReason
WITHDRAWAL_REASON_CONSENT_INVALID: WithdrawalReason
WITHDRAWAL_REASON_OTHER: WithdrawalReason

class PatientRef(_message.Message):
    __slots__ = ("identifiers", "pseudonym")
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    identifiers: _common_pb2.PatientIdentifiers
    pseudonym: str
    def __init__(self, identifiers: _Optional[_Union[_common_pb2.PatientIdentifiers, _Mapping]] = ..., pseudonym: _Optional[str] = ...) -> None: ...

class RecordConsentRequest(_message.Message):
    __slots__ = ("registry", "patient", "decisions", "client_reference")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    registry: str
    patient: PatientRef
    decisions: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScopeConsent]
    client_reference: str
    def __init__(self, registry: _Optional[str] = ..., patient: _Optional[_Union[PatientRef, _Mapping]] = ..., decisions: _Optional[_Iterable[_Union[_common_pb2.ScopeConsent, _Mapping]]] = ..., client_reference: _Optional[str] = ...) -> None: ...

class RecordConsentResponse(_message.Message):
    __slots__ = ("pseudonym", "recorded", "in_force")
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    pseudonym: str
    recorded: _containers.RepeatedCompositeFieldContainer[ConsentEvent]
    in_force: ConsentStatus
    def __init__(self, pseudonym: _Optional[str] = ..., recorded: _Optional[_Iterable[_Union[ConsentEvent, _Mapping]]] = ..., in_force: _Optional[_Union[ConsentStatus, _Mapping]] = ...) -> None: ...

class RecordConsentsRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[RecordConsentRequest]
    def __init__(self, entries: _Optional[_Iterable[_Union[RecordConsentRequest, _Mapping]]] = ...) -> None: ...

class RecordConsentsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecordConsentsResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RecordConsentsResult, _Mapping]]] = ...) -> None: ...

class RecordConsentsResult(_message.Message):
    __slots__ = ("index", "client_reference", "recorded", "rejected")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    index: int
    client_reference: str
    recorded: RecordConsentResponse
    rejected: _case_pb2.Rejection
    def __init__(self, index: _Optional[int] = ..., client_reference: _Optional[str] = ..., recorded: _Optional[_Union[RecordConsentResponse, _Mapping]] = ..., rejected: _Optional[_Union[_case_pb2.Rejection, _Mapping]] = ...) -> None: ...

class WithdrawConsentRequest(_message.Message):
    __slots__ = ("registry", "patient", "scopes", "reason")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    registry: str
    patient: PatientRef
    scopes: _containers.RepeatedScalarFieldContainer[_common_pb2.ConsentScope]
    reason: WithdrawalReason
    def __init__(self, registry: _Optional[str] = ..., patient: _Optional[_Union[PatientRef, _Mapping]] = ..., scopes: _Optional[_Iterable[_Union[_common_pb2.ConsentScope, str]]] = ..., reason: _Optional[_Union[WithdrawalReason, str]] = ...) -> None: ...

class WithdrawConsentResponse(_message.Message):
    __slots__ = ("pseudonym", "in_force", "receipt")
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    pseudonym: str
    in_force: ConsentStatus
    receipt: ErasureReceipt
    def __init__(self, pseudonym: _Optional[str] = ..., in_force: _Optional[_Union[ConsentStatus, _Mapping]] = ..., receipt: _Optional[_Union[ErasureReceipt, _Mapping]] = ...) -> None: ...

class ErasureReceipt(_message.Message):
    __slots__ = ("receipt_id", "registry", "pseudonym", "erased_at", "erased_by", "reason", "cases_erased", "versions_erased")
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    ERASED_AT_FIELD_NUMBER: _ClassVar[int]
    ERASED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CASES_ERASED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_ERASED_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    registry: str
    pseudonym: str
    erased_at: _timestamp_pb2.Timestamp
    erased_by: str
    reason: WithdrawalReason
    cases_erased: int
    versions_erased: int
    def __init__(self, receipt_id: _Optional[str] = ..., registry: _Optional[str] = ..., pseudonym: _Optional[str] = ..., erased_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., erased_by: _Optional[str] = ..., reason: _Optional[_Union[WithdrawalReason, str]] = ..., cases_erased: _Optional[int] = ..., versions_erased: _Optional[int] = ...) -> None: ...

class GetConsentRequest(_message.Message):
    __slots__ = ("registry", "pseudonym", "at")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    registry: str
    pseudonym: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, registry: _Optional[str] = ..., pseudonym: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetConsentResponse(_message.Message):
    __slots__ = ("pseudonym", "history", "in_force")
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    pseudonym: str
    history: _containers.RepeatedCompositeFieldContainer[ConsentEvent]
    in_force: ConsentStatus
    def __init__(self, pseudonym: _Optional[str] = ..., history: _Optional[_Iterable[_Union[ConsentEvent, _Mapping]]] = ..., in_force: _Optional[_Union[ConsentStatus, _Mapping]] = ...) -> None: ...

class GetErasureReceiptRequest(_message.Message):
    __slots__ = ("receipt_id",)
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    def __init__(self, receipt_id: _Optional[str] = ...) -> None: ...

class ConsentEvent(_message.Message):
    __slots__ = ("id", "scope", "state", "given_at", "form_version", "expires_at", "recorded_at", "recorded_by", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GIVEN_AT_FIELD_NUMBER: _ClassVar[int]
    FORM_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    RECORDED_BY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: int
    scope: _common_pb2.ConsentScope
    state: _common_pb2.ConsentState
    given_at: _timestamp_pb2.Timestamp
    form_version: str
    expires_at: _timestamp_pb2.Timestamp
    recorded_at: _timestamp_pb2.Timestamp
    recorded_by: str
    source: str
    def __init__(self, id: _Optional[int] = ..., scope: _Optional[_Union[_common_pb2.ConsentScope, str]] = ..., state: _Optional[_Union[_common_pb2.ConsentState, str]] = ..., given_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., form_version: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recorded_by: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ConsentStatus(_message.Message):
    __slots__ = ("at", "scopes")
    AT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    scopes: _containers.RepeatedCompositeFieldContainer[ScopeStatus]
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scopes: _Optional[_Iterable[_Union[ScopeStatus, _Mapping]]] = ...) -> None: ...

class ScopeStatus(_message.Message):
    __slots__ = ("scope", "state", "active", "given_at", "expires_at")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    GIVEN_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    scope: _common_pb2.ConsentScope
    state: _common_pb2.ConsentState
    active: bool
    given_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, scope: _Optional[_Union[_common_pb2.ConsentScope, str]] = ..., state: _Optional[_Union[_common_pb2.ConsentState, str]] = ..., active: _Optional[bool] = ..., given_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
