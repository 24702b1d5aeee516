import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dimension(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIMENSION_UNSPECIFIED: _ClassVar[Dimension]
    DIMENSION_DIAGNOSIS: _ClassVar[Dimension]
    DIMENSION_SEX: _ClassVar[Dimension]
    DIMENSION_ONSET_AGE_BAND: _ClassVar[Dimension]
    DIMENSION_DIAGNOSIS_AGE_BAND: _ClassVar[Dimension]
    DIMENSION_COUNTRY: _ClassVar[Dimension]
    DIMENSION_CENTRE: _ClassVar[Dimension]
    DIMENSION_DIAGNOSIS_YEAR: _ClassVar[Dimension]
    DIMENSION_PATIENT_STATUS: _ClassVar[Dimension]
    DIMENSION_GENE: _ClassVar[Dimension]
    DIMENSION_PHENOTYPE: _ClassVar[Dimension]
DIMENSION_UNSPECIFIED: Dimension
DIMENSION_DIAGNOSIS: Dimension
DIMENSION_SEX: Dimension
DIMENSION_ONSET_AGE_BAND: Dimension
DIMENSION_DIAGNOSIS_AGE_BAND: Dimension
DIMENSION_COUNTRY: Dimension
DIMENSION_CENTRE: Dimension
DIMENSION_DIAGNOSIS_YEAR: Dimension
DIMENSION_PATIENT_STATUS: Dimension
DIMENSION_GENE: Dimension
DIMENSION_PHENOTYPE: Dimension

class Filter(_message.Message):
    __slots__ = ("dimension", "values", "include_descendants")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DESCENDANTS_FIELD_NUMBER: _ClassVar[int]
    dimension: Dimension
    values: _containers.RepeatedScalarFieldContainer[str]
    include_descendants: bool
    def __init__(self, dimension: _Optional[_Union[Dimension, str]] = ..., values: _Optional[_Iterable[str]] = ..., include_descendants: _Optional[bool] = ...) -> None: ...

class CodeName(_message.Message):
    __slots__ = ("code", "name")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    code: str
    name: str
    def __init__(self, code: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Cell(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class CountPatientsRequest(_message.Message):
    __slots__ = ("registry", "group_by", "filters")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    registry: str
    group_by: _containers.RepeatedScalarFieldContainer[Dimension]
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    def __init__(self, registry: _Optional[str] = ..., group_by: _Optional[_Iterable[_Union[Dimension, str]]] = ..., filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ...) -> None: ...

class CountTable(_message.Message):
    __slots__ = ("registry", "min_cell_count", "unit", "row_dimension", "column_dimensions", "columns", "rows", "column_totals", "grand_total", "suppressed", "as_of", "protection_level", "names")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    MIN_CELL_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ROW_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    COLUMN_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMN_TOTALS_FIELD_NUMBER: _ClassVar[int]
    GRAND_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_LEVEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    registry: str
    min_cell_count: int
    unit: str
    row_dimension: Dimension
    column_dimensions: _containers.RepeatedScalarFieldContainer[Dimension]
    columns: _containers.RepeatedCompositeFieldContainer[ColumnKey]
    rows: _containers.RepeatedCompositeFieldContainer[TableRow]
    column_totals: _containers.RepeatedCompositeFieldContainer[Cell]
    grand_total: Cell
    suppressed: int
    as_of: _timestamp_pb2.Timestamp
    protection_level: int
    names: _containers.RepeatedCompositeFieldContainer[CodeName]
    def __init__(self, registry: _Optional[str] = ..., min_cell_count: _Optional[int] = ..., unit: _Optional[str] = ..., row_dimension: _Optional[_Union[Dimension, str]] = ..., column_dimensions: _Optional[_Iterable[_Union[Dimension, str]]] = ..., columns: _Optional[_Iterable[_Union[ColumnKey, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[TableRow, _Mapping]]] = ..., column_totals: _Optional[_Iterable[_Union[Cell, _Mapping]]] = ..., grand_total: _Optional[_Union[Cell, _Mapping]] = ..., suppressed: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., protection_level: _Optional[int] = ..., names: _Optional[_Iterable[_Union[CodeName, _Mapping]]] = ...) -> None: ...

class ColumnKey(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class TableRow(_message.Message):
    __slots__ = ("label", "cells", "total")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    label: str
    cells: _containers.RepeatedCompositeFieldContainer[Cell]
    total: Cell
    def __init__(self, label: _Optional[str] = ..., cells: _Optional[_Iterable[_Union[Cell, _Mapping]]] = ..., total: _Optional[_Union[Cell, _Mapping]] = ...) -> None: ...

class DiagnosticDelayRequest(_message.Message):
    __slots__ = ("registry", "group_by", "filters")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    registry: str
    group_by: _containers.RepeatedScalarFieldContainer[Dimension]
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    def __init__(self, registry: _Optional[str] = ..., group_by: _Optional[_Iterable[_Union[Dimension, str]]] = ..., filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ...) -> None: ...

class DiagnosticDelayResponse(_message.Message):
    __slots__ = ("registry", "min_cell_count", "group_by", "bands", "groups", "band_totals", "grand_total", "overall", "suppressed", "as_of", "protection_level", "names", "unit")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    MIN_CELL_COUNT_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    BANDS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    BAND_TOTALS_FIELD_NUMBER: _ClassVar[int]
    GRAND_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OVERALL_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_LEVEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    registry: str
    min_cell_count: int
    group_by: _containers.RepeatedScalarFieldContainer[Dimension]
    bands: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedCompositeFieldContainer[DelayGroup]
    band_totals: _containers.RepeatedCompositeFieldContainer[Cell]
    grand_total: Cell
    overall: DelayQuantiles
    suppressed: int
    as_of: _timestamp_pb2.Timestamp
    protection_level: int
    names: _containers.RepeatedCompositeFieldContainer[CodeName]
    unit: str
    def __init__(self, registry: _Optional[str] = ..., min_cell_count: _Optional[int] = ..., group_by: _Optional[_Iterable[_Union[Dimension, str]]] = ..., bands: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[_Union[DelayGroup, _Mapping]]] = ..., band_totals: _Optional[_Iterable[_Union[Cell, _Mapping]]] = ..., grand_total: _Optional[_Union[Cell, _Mapping]] = ..., overall: _Optional[_Union[DelayQuantiles, _Mapping]] = ..., suppressed: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., protection_level: _Optional[int] = ..., names: _Optional[_Iterable[_Union[CodeName, _Mapping]]] = ..., unit: _Optional[str] = ...) -> None: ...

class DelayGroup(_message.Message):
    __slots__ = ("labels", "bands", "total", "quantiles")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BANDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    bands: _containers.RepeatedCompositeFieldContainer[Cell]
    total: Cell
    quantiles: DelayQuantiles
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., bands: _Optional[_Iterable[_Union[Cell, _Mapping]]] = ..., total: _Optional[_Union[Cell, _Mapping]] = ..., quantiles: _Optional[_Union[DelayQuantiles, _Mapping]] = ...) -> None: ...

class DelayQuantiles(_message.Message):
    __slots__ = ("p25_years", "median_years", "p75_years", "p90_years")
    P25_YEARS_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_YEARS_FIELD_NUMBER: _ClassVar[int]
    P75_YEARS_FIELD_NUMBER: _ClassVar[int]
    P90_YEARS_FIELD_NUMBER: _ClassVar[int]
    p25_years: float
    median_years: float
    p75_years: float
    p90_years: float
    def __init__(self, p25_years: _Optional[float] = ..., median_years: _Optional[float] = ..., p75_years: _Optional[float] = ..., p90_years: _Optional[float] = ...) -> None: ...

class FindExpertiseRequest(_message.Message):
    __slots__ = ("orphacodes", "countries", "registries", "disease_name_prefix")
    ORPHACODES_FIELD_NUMBER: _ClassVar[int]
    COUNTRIES_FIELD_NUMBER: _ClassVar[int]
    REGISTRIES_FIELD_NUMBER: _ClassVar[int]
    DISEASE_NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    orphacodes: _containers.RepeatedScalarFieldContainer[str]
    countries: _containers.RepeatedScalarFieldContainer[str]
    registries: _containers.RepeatedScalarFieldContainer[str]
    disease_name_prefix: str
    def __init__(self, orphacodes: _Optional[_Iterable[str]] = ..., countries: _Optional[_Iterable[str]] = ..., registries: _Optional[_Iterable[str]] = ..., disease_name_prefix: _Optional[str] = ...) -> None: ...

class FindExpertiseResponse(_message.Message):
    __slots__ = ("centres", "registries", "as_of", "diseases")
    CENTRES_FIELD_NUMBER: _ClassVar[int]
    REGISTRIES_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    DISEASES_FIELD_NUMBER: _ClassVar[int]
    centres: _containers.RepeatedCompositeFieldContainer[ExpertiseCentre]
    registries: _containers.RepeatedScalarFieldContainer[str]
    as_of: _timestamp_pb2.Timestamp
    diseases: _containers.RepeatedCompositeFieldContainer[CodeName]
    def __init__(self, centres: _Optional[_Iterable[_Union[ExpertiseCentre, _Mapping]]] = ..., registries: _Optional[_Iterable[str]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., diseases: _Optional[_Iterable[_Union[CodeName, _Mapping]]] = ...) -> None: ...

class ExpertiseCentre(_message.Message):
    __slots__ = ("centre_code", "centre_name", "country", "registry", "volume")
    CENTRE_CODE_FIELD_NUMBER: _ClassVar[int]
    CENTRE_NAME_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    centre_code: str
    centre_name: str
    country: str
    registry: str
    volume: VolumeBand
    def __init__(self, centre_code: _Optional[str] = ..., centre_name: _Optional[str] = ..., country: _Optional[str] = ..., registry: _Optional[str] = ..., volume: _Optional[_Union[VolumeBand, _Mapping]] = ...) -> None: ...

class VolumeBand(_message.Message):
    __slots__ = ("min", "max", "label")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    min: int
    max: int
    label: str
    def __init__(self, min: _Optional[int] = ..., max: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...
