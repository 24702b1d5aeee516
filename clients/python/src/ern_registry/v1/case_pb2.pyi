import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from ern_registry.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CaseRecord(_message.Message):
    __slots__ = ("birth_year_month", "sex", "status", "date_of_death", "first_contact_date", "onset_kind", "onset_date", "undiagnosed", "diagnosis", "diagnosis_date", "genetic_findings", "hpo_terms", "icf_codes")
    BIRTH_YEAR_MONTH_FIELD_NUMBER: _ClassVar[int]
    SEX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DATE_OF_DEATH_FIELD_NUMBER: _ClassVar[int]
    FIRST_CONTACT_DATE_FIELD_NUMBER: _ClassVar[int]
    ONSET_KIND_FIELD_NUMBER: _ClassVar[int]
    ONSET_DATE_FIELD_NUMBER: _ClassVar[int]
    UNDIAGNOSED_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSIS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSIS_DATE_FIELD_NUMBER: _ClassVar[int]
    GENETIC_FINDINGS_FIELD_NUMBER: _ClassVar[int]
    HPO_TERMS_FIELD_NUMBER: _ClassVar[int]
    ICF_CODES_FIELD_NUMBER: _ClassVar[int]
    birth_year_month: str
    sex: _common_pb2.Sex
    status: _common_pb2.PatientStatus
    date_of_death: str
    first_contact_date: str
    onset_kind: _common_pb2.OnsetKind
    onset_date: str
    undiagnosed: bool
    diagnosis: Diagnosis
    diagnosis_date: str
    genetic_findings: _containers.RepeatedCompositeFieldContainer[GeneticFinding]
    hpo_terms: _containers.RepeatedScalarFieldContainer[str]
    icf_codes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, birth_year_month: _Optional[str] = ..., sex: _Optional[_Union[_common_pb2.Sex, str]] = ..., status: _Optional[_Union[_common_pb2.PatientStatus, str]] = ..., date_of_death: _Optional[str] = ..., first_contact_date: _Optional[str] = ..., onset_kind: _Optional[_Union[_common_pb2.OnsetKind, str]] = ..., onset_date: _Optional[str] = ..., undiagnosed: _Optional[bool] = ..., diagnosis: _Optional[_Union[Diagnosis, _Mapping]] = ..., diagnosis_date: _Optional[str] = ..., genetic_findings: _Optional[_Iterable[_Union[GeneticFinding, _Mapping]]] = ..., hpo_terms: _Optional[_Iterable[str]] = ..., icf_codes: _Optional[_Iterable[str]] = ...) -> None: ...

class Diagnosis(_message.Message):
    __slots__ = ("orphacode", "icd10", "icd11", "omim")
    ORPHACODE_FIELD_NUMBER: _ClassVar[int]
    ICD10_FIELD_NUMBER: _ClassVar[int]
    ICD11_FIELD_NUMBER: _ClassVar[int]
    OMIM_FIELD_NUMBER: _ClassVar[int]
    orphacode: str
    icd10: _containers.RepeatedScalarFieldContainer[str]
    icd11: _containers.RepeatedScalarFieldContainer[str]
    omim: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, orphacode: _Optional[str] = ..., icd10: _Optional[_Iterable[str]] = ..., icd11: _Optional[_Iterable[str]] = ..., omim: _Optional[_Iterable[str]] = ...) -> None: ...

class GeneticFinding(_message.Message):
    __slots__ = ("gene", "variants")
    GENE_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    gene: str
    variants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, gene: _Optional[str] = ..., variants: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitCaseRequest(_message.Message):
    __slots__ = ("registry", "patient", "record", "consent", "client_reference")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    registry: str
    patient: _common_pb2.PatientIdentifiers
    record: CaseRecord
    consent: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScopeConsent]
    client_reference: str
    def __init__(self, registry: _Optional[str] = ..., patient: _Optional[_Union[_common_pb2.PatientIdentifiers, _Mapping]] = ..., record: _Optional[_Union[CaseRecord, _Mapping]] = ..., consent: _Optional[_Iterable[_Union[_common_pb2.ScopeConsent, _Mapping]]] = ..., client_reference: _Optional[str] = ...) -> None: ...

class SubmitCaseResponse(_message.Message):
    __slots__ = ("pseudonym", "version", "recorded_at", "replaced_codes", "code_releases")
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    REPLACED_CODES_FIELD_NUMBER: _ClassVar[int]
    CODE_RELEASES_FIELD_NUMBER: _ClassVar[int]
    pseudonym: str
    version: int
    recorded_at: _timestamp_pb2.Timestamp
    replaced_codes: _containers.RepeatedCompositeFieldContainer[CodeReplacement]
    code_releases: str
    def __init__(self, pseudonym: _Optional[str] = ..., version: _Optional[int] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replaced_codes: _Optional[_Iterable[_Union[CodeReplacement, _Mapping]]] = ..., code_releases: _Optional[str] = ...) -> None: ...

class CodeReplacement(_message.Message):
    __slots__ = ("field", "given", "stored", "note")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    GIVEN_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    field: str
    given: str
    stored: str
    note: str
    def __init__(self, field: _Optional[str] = ..., given: _Optional[str] = ..., stored: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class SubmitCasesResult(_message.Message):
    __slots__ = ("sequence", "client_reference", "accepted", "rejected")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    client_reference: str
    accepted: SubmitCaseResponse
    rejected: Rejection
    def __init__(self, sequence: _Optional[int] = ..., client_reference: _Optional[str] = ..., accepted: _Optional[_Union[SubmitCaseResponse, _Mapping]] = ..., rejected: _Optional[_Union[Rejection, _Mapping]] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("code", "message", "field_violations", "existing_case")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    EXISTING_CASE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field_violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    existing_case: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field_violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ..., existing_case: _Optional[str] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class GetCaseRequest(_message.Message):
    __slots__ = ("registry", "pseudonym", "include_history")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    registry: str
    pseudonym: str
    include_history: bool
    def __init__(self, registry: _Optional[str] = ..., pseudonym: _Optional[str] = ..., include_history: _Optional[bool] = ...) -> None: ...

class GetCaseResponse(_message.Message):
    __slots__ = ("case",)
    CASE_FIELD_NUMBER: _ClassVar[int]
    case: Case
    def __init__(self, case: _Optional[_Union[Case, _Mapping]] = ...) -> None: ...

class Case(_message.Message):
    __slots__ = ("registry", "pseudonym", "centre", "country", "current", "history")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    CENTRE_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    registry: str
    pseudonym: str
    centre: str
    country: str
    current: CaseVersion
    history: _containers.RepeatedCompositeFieldContainer[CaseVersion]
    def __init__(self, registry: _Optional[str] = ..., pseudonym: _Optional[str] = ..., centre: _Optional[str] = ..., country: _Optional[str] = ..., current: _Optional[_Union[CaseVersion, _Mapping]] = ..., history: _Optional[_Iterable[_Union[CaseVersion, _Mapping]]] = ...) -> None: ...

class CaseVersion(_message.Message):
    __slots__ = ("version", "recorded_at", "recorded_by", "record", "code_releases")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    RECORDED_BY_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CODE_RELEASES_FIELD_NUMBER: _ClassVar[int]
    version: int
    recorded_at: _timestamp_pb2.Timestamp
    recorded_by: str
    record: CaseRecord
    code_releases: str
    def __init__(self, version: _Optional[int] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recorded_by: _Optional[str] = ..., record: _Optional[_Union[CaseRecord, _Mapping]] = ..., code_releases: _Optional[str] = ...) -> None: ...

class SubmitPhenopacketRequest(_message.Message):
    __slots__ = ("registry", "patient", "phenopacket", "consent", "client_reference")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    PHENOPACKET_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    registry: str
    patient: _common_pb2.PatientIdentifiers
    phenopacket: str
    consent: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScopeConsent]
    client_reference: str
    def __init__(self, registry: _Optional[str] = ..., patient: _Optional[_Union[_common_pb2.PatientIdentifiers, _Mapping]] = ..., phenopacket: _Optional[str] = ..., consent: _Optional[_Iterable[_Union[_common_pb2.ScopeConsent, _Mapping]]] = ..., client_reference: _Optional[str] = ...) -> None: ...

class ExportPhenopacketsRequest(_message.Message):
    __slots__ = ("registry", "page_size", "page_token")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    registry: str
    page_size: int
    page_token: str
    def __init__(self, registry: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ExportPhenopacketsResponse(_message.Message):
    __slots__ = ("phenopackets", "next_page_token")
    PHENOPACKETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    phenopackets: _containers.RepeatedScalarFieldContainer[str]
    next_page_token: str
    def __init__(self, phenopackets: _Optional[_Iterable[str]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateCaseRequest(_message.Message):
    __slots__ = ("registry", "pseudonym", "expected_version", "record", "consent")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    registry: str
    pseudonym: str
    expected_version: int
    record: CaseRecord
    consent: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScopeConsent]
    def __init__(self, registry: _Optional[str] = ..., pseudonym: _Optional[str] = ..., expected_version: _Optional[int] = ..., record: _Optional[_Union[CaseRecord, _Mapping]] = ..., consent: _Optional[_Iterable[_Union[_common_pb2.ScopeConsent, _Mapping]]] = ...) -> None: ...

class UpdateCaseResponse(_message.Message):
    __slots__ = ("pseudonym", "version", "recorded_at", "replaced_codes", "code_releases")
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    REPLACED_CODES_FIELD_NUMBER: _ClassVar[int]
    CODE_RELEASES_FIELD_NUMBER: _ClassVar[int]
    pseudonym: str
    version: int
    recorded_at: _timestamp_pb2.Timestamp
    replaced_codes: _containers.RepeatedCompositeFieldContainer[CodeReplacement]
    code_releases: str
    def __init__(self, pseudonym: _Optional[str] = ..., version: _Optional[int] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replaced_codes: _Optional[_Iterable[_Union[CodeReplacement, _Mapping]]] = ..., code_releases: _Optional[str] = ...) -> None: ...
