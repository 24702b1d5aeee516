import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sex(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEX_UNSPECIFIED: _ClassVar[Sex]
    SEX_FEMALE: _ClassVar[Sex]
    SEX_MALE: _ClassVar[Sex]
    SEX_UNDETERMINED: _ClassVar[Sex]
    SEX_UNKNOWN: _ClassVar[Sex]

class PatientStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PATIENT_STATUS_UNSPECIFIED: _ClassVar[PatientStatus]
    PATIENT_STATUS_ALIVE: _ClassVar[PatientStatus]
    PATIENT_STATUS_DECEASED: _ClassVar[PatientStatus]
    PATIENT_STATUS_LOST_TO_FOLLOW_UP: _ClassVar[PatientStatus]
    PATIENT_STATUS_OPTED_OUT: _ClassVar[PatientStatus]

class OnsetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ONSET_KIND_UNSPECIFIED: _ClassVar[OnsetKind]
    ONSET_KIND_ANTENATAL: _ClassVar[OnsetKind]
    ONSET_KIND_AT_BIRTH: _ClassVar[OnsetKind]
    ONSET_KIND_DATE: _ClassVar[OnsetKind]
    ONSET_KIND_UNKNOWN: _ClassVar[OnsetKind]

class ConsentScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSENT_SCOPE_UNSPECIFIED: _ClassVar[ConsentScope]
    CONSENT_SCOPE_REGISTRY_INCLUSION: _ClassVar[ConsentScope]
    CONSENT_SCOPE_RESEARCH_USE: _ClassVar[ConsentScope]
    CONSENT_SCOPE_RECONTACT: _ClassVar[ConsentScope]

class ConsentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSENT_STATE_UNSPECIFIED: _ClassVar[ConsentState]
    CONSENT_STATE_GRANTED: _ClassVar[ConsentState]
    CONSENT_STATE_REFUSED: _ClassVar[ConsentState]
    CONSENT_STATE_WITHDRAWN: _ClassVar[ConsentState]
SEX_UNSPECIFIED: Sex
SEX_FEMALE: Sex
SEX_MALE: Sex
SEX_UNDETERMINED: Sex
SEX_UNKNOWN: Sex
PATIENT_STATUS_UNSPECIFIED: PatientStatus
PATIENT_STATUS_ALIVE: PatientStatus
PATIENT_STATUS_DECEASED: PatientStatus
PATIENT_STATUS_LOST_TO_FOLLOW_UP: PatientStatus
PATIENT_STATUS_OPTED_OUT: PatientStatus
ONSET_KIND_UNSPECIFIED: OnsetKind
ONSET_KIND_ANTENATAL: OnsetKind
ONSET_KIND_AT_BIRTH: OnsetKind
ONSET_KIND_DATE: OnsetKind
ONSET_KIND_UNKNOWN: OnsetKind
CONSENT_SCOPE_UNSPECIFIED: ConsentScope
CONSENT_SCOPE_REGISTRY_INCLUSION: ConsentScope
CONSENT_SCOPE_RESEARCH_USE: ConsentScope
CONSENT_SCOPE_RECONTACT: ConsentScope
CONSENT_STATE_UNSPECIFIED: ConsentState
CONSENT_STATE_GRANTED: ConsentState
CONSENT_STATE_REFUSED: ConsentState
CONSENT_STATE_WITHDRAWN: ConsentState

class PatientIdentifiers(_message.Message):
    __slots__ = ("national", "demographic")
    NATIONAL_FIELD_NUMBER: _ClassVar[int]
    DEMOGRAPHIC_FIELD_NUMBER: _ClassVar[int]
    national: NationalIdentifier
    demographic: DemographicIdentifiers
    def __init__(self, national: _Optional[_Union[NationalIdentifier, _Mapping]] = ..., demographic: _Optional[_Union[DemographicIdentifiers, _Mapping]] = ...) -> None: ...

class NationalIdentifier(_message.Message):
    __slots__ = ("issuing_country", "value")
    ISSUING_COUNTRY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    issuing_country: str
    value: str
    def __init__(self, issuing_country: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class DemographicIdentifiers(_message.Message):
    __slots__ = ("given_names", "family_name", "date_of_birth", "sex_at_birth", "place_of_birth", "country_of_birth")
    GIVEN_NAMES_FIELD_NUMBER: _ClassVar[int]
    FAMILY_NAME_FIELD_NUMBER: _ClassVar[int]
    DATE_OF_BIRTH_FIELD_NUMBER: _ClassVar[int]
    SEX_AT_BIRTH_FIELD_NUMBER: _ClassVar[int]
    PLACE_OF_BIRTH_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_OF_BIRTH_FIELD_NUMBER: _ClassVar[int]
    given_names: str
    family_name: str
    date_of_birth: str
    sex_at_birth: Sex
    place_of_birth: str
    country_of_birth: str
    def __init__(self, given_names: _Optional[str] = ..., family_name: _Optional[str] = ..., date_of_birth: _Optional[str] = ..., sex_at_birth: _Optional[_Union[Sex, str]] = ..., place_of_birth: _Optional[str] = ..., country_of_birth: _Optional[str] = ...) -> None: ...

class ScopeConsent(_message.Message):
    __slots__ = ("scope", "state", "given_at", "form_version", "expires_at")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GIVEN_AT_FIELD_NUMBER: _ClassVar[int]
    FORM_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    scope: ConsentScope
    state: ConsentState
    given_at: _timestamp_pb2.Timestamp
    form_version: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, scope: _Optional[_Union[ConsentScope, str]] = ..., state: _Optional[_Union[ConsentState, str]] = ..., given_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., form_version: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
