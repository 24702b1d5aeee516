"""Research answers as pandas DataFrames.

Counts are ``Int64`` (nullable) columns: a suppressed cell is ``pd.NA``, never a number.
A published count is never missing, so the suppression mask is exactly the missing
values of the count columns: ``df.ern.mask`` (a boolean DataFrame of the frame's shape,
True where a count is suppressed). The answer's metadata is in ``df.attrs`` and on the
accessor: ``df.ern.k`` (the registry's minimum cell count), ``df.ern.suppressed`` (how
many cells and totals are suppressed), ``df.ern.as_of`` (the instant whose consent state
was counted), ``df.ern.protection_level``, ``df.ern.unit``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterable, Sequence

import pandas as pd

from .v1 import research_pb2

TOTAL = "total"
QUANTILES = ("p25_years", "median_years", "p75_years", "p90_years")


def dimension_name(value: int) -> str:
    """``DIMENSION_ONSET_AGE_BAND`` (or its number) as ``onset_age_band``."""
    return research_pb2.Dimension.Name(value).removeprefix("DIMENSION_").lower()


def dimension_value(dimension: str | int) -> int:
    """A dimension from ``"country"``, ``"DIMENSION_COUNTRY"`` or the enum number."""
    if isinstance(dimension, int):
        research_pb2.Dimension.Name(dimension)  # raises ValueError if unknown
        return dimension
    name = dimension.strip().upper()
    if not name.startswith("DIMENSION_"):
        name = "DIMENSION_" + name
    try:
        return research_pb2.Dimension.Value(name)
    except ValueError:
        known = ", ".join(
            dimension_name(v) for v in research_pb2.Dimension.values() if v != 0
        )
        raise ValueError(f"unknown dimension {dimension!r}; one of {known}") from None


def _count(cell: research_pb2.Cell) -> Any:
    return cell.count if cell.HasField("count") else pd.NA


def _as_of(ts: Any) -> _dt.datetime | None:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=_dt.timezone.utc)


def _key(values: Sequence[str], width: int) -> Any:
    """A label for an index of ``width`` levels."""
    if width <= 1:
        return values[0] if values else ""
    return tuple(values) + ("",) * (width - len(values))


def _index(keys: list[Any], names: list[str]) -> pd.Index:
    if len(names) > 1:
        return pd.MultiIndex.from_tuples(keys, names=names)
    return pd.Index(keys, name=names[0] if names else None, dtype=object)


def _attrs(answer: Any, count_columns: Iterable[Any], dimensions: list[str], **more: Any) -> dict:
    attrs = {
        "registry": answer.registry,
        "min_cell_count": answer.min_cell_count,
        "protection_level": answer.protection_level,
        "suppressed": answer.suppressed,
        "as_of": _as_of(answer.as_of if answer.HasField("as_of") else None),
        "dimensions": dimensions,
        "count_columns": list(count_columns),
    }
    attrs.update(more)
    return attrs


def count_table(table: research_pb2.CountTable) -> pd.DataFrame:
    """A CountTable as a DataFrame: one row per value of the row dimension and a
    ``total`` row; one column per combination of the column dimensions' values and a
    ``total`` column (a one-way table has the single column ``count``; a table without
    dimensions the single row ``total``)."""
    row_dims = [dimension_name(table.row_dimension)] if table.row_dimension else []
    col_dims = [dimension_name(d) for d in table.column_dimensions]
    if not col_dims:
        labels = [row.label for row in table.rows] if row_dims else []
        values = [_count(row.cells[0]) if row.cells else pd.NA for row in table.rows] if row_dims else []
        labels.append(TOTAL)
        values.append(_count(table.grand_total))
        frame = pd.DataFrame(
            {"count": pd.array(values, dtype="Int64")},
            index=pd.Index(labels, name=row_dims[0] if row_dims else None, dtype=object),
        )
    else:
        width = len(col_dims)
        columns = [_key(list(c.values), width) for c in table.columns] + [_key([TOTAL], width)]
        data = []
        for row in table.rows:
            data.append([_count(c) for c in row.cells] + [_count(row.total)])
        data.append([_count(c) for c in table.column_totals] + [_count(table.grand_total)])
        index = pd.Index([row.label for row in table.rows] + [TOTAL], name=row_dims[0], dtype=object)
        frame = pd.DataFrame(data, index=index, columns=_index(columns, col_dims), dtype="Int64")
    frame.attrs = _attrs(table, frame.columns, row_dims + col_dims, unit=table.unit)
    return frame


def delay_table(answer: research_pb2.DiagnosticDelayResponse) -> pd.DataFrame:
    """A DiagnosticDelayResponse as a DataFrame: one row per group and a ``total`` row;
    a column per delay band, ``total``, and the quantiles in years (``p25_years``,
    ``median_years``, ``p75_years``, ``p90_years``; NaN where the server gives none:
    it gives them only for groups whose counts are all published, and for the ``total``
    row only when every count of the table is published)."""
    dims = [dimension_name(d) for d in answer.group_by]
    bands = list(answer.bands)
    width = len(dims)
    keys: list[Any] = []
    counts: list[list[Any]] = []
    quantiles: list[list[float]] = []

    def quantile_row(q: research_pb2.DelayQuantiles | None) -> list[float]:
        if q is None:
            return [float("nan")] * len(QUANTILES)
        return [q.p25_years, q.median_years, q.p75_years, q.p90_years]

    if dims:
        for group in answer.groups:
            keys.append(_key(list(group.labels), width))
            counts.append([_count(c) for c in group.bands] + [_count(group.total)])
            quantiles.append(quantile_row(group.quantiles if group.HasField("quantiles") else None))
    keys.append(_key([TOTAL], width))
    # A table whose every count is suppressed lists no band total (docs/privacy.md).
    band_totals = [_count(c) for c in answer.band_totals] or [pd.NA] * len(bands)
    counts.append(band_totals + [_count(answer.grand_total)])
    quantiles.append(quantile_row(answer.overall if answer.HasField("overall") else None))
    index = _index(keys, dims) if dims else pd.Index(keys, dtype=object)
    frame = pd.DataFrame(counts, index=index, columns=bands + [TOTAL], dtype="Int64")
    for at, name in enumerate(QUANTILES):
        frame[name] = pd.array([q[at] for q in quantiles], dtype="float64")
    frame.attrs = _attrs(answer, bands + [TOTAL], dims, bands=bands)
    return frame


def expertise_table(answer: research_pb2.FindExpertiseResponse) -> pd.DataFrame:
    """FindExpertise's centres, in the server's ranking: ``centre_code``,
    ``centre_name``, ``country``, ``registry``, ``volume`` (the band's label),
    ``volume_min`` and ``volume_max`` (missing for the open top band)."""
    rows = [
        {
            "centre_code": c.centre_code,
            "centre_name": c.centre_name,
            "country": c.country,
            "registry": c.registry,
            "volume": c.volume.label,
            "volume_min": c.volume.min,
            "volume_max": c.volume.max if c.volume.HasField("max") else pd.NA,
        }
        for c in answer.centres
    ]
    columns = ["centre_code", "centre_name", "country", "registry", "volume", "volume_min", "volume_max"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["volume_min"] = frame["volume_min"].astype("Int64")
    frame["volume_max"] = frame["volume_max"].astype("Int64")
    frame.attrs = {
        "registries": list(answer.registries),
        "as_of": _as_of(answer.as_of if answer.HasField("as_of") else None),
        "count_columns": [],
    }
    return frame


def suppression_mask(frame: pd.DataFrame) -> pd.DataFrame:
    """True where a count cell is suppressed (its value is missing), False elsewhere,
    quantile and label columns included."""
    count_columns = [c for c in frame.attrs.get("count_columns", []) if c in frame.columns]
    mask = pd.DataFrame(False, index=frame.index, columns=frame.columns)
    for column in count_columns:
        mask[column] = frame[column].isna().to_numpy()
    return mask


@pd.api.extensions.register_dataframe_accessor("ern")
class RegistryAccessor:
    """``df.ern``: the suppression mask and the metadata of a research answer."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame

    @property
    def mask(self) -> pd.DataFrame:
        return suppression_mask(self._frame)

    @property
    def k(self) -> int | None:
        return self._frame.attrs.get("min_cell_count")

    @property
    def suppressed(self) -> int | None:
        return self._frame.attrs.get("suppressed")

    @property
    def as_of(self) -> _dt.datetime | None:
        return self._frame.attrs.get("as_of")

    @property
    def protection_level(self) -> int | None:
        return self._frame.attrs.get("protection_level")

    @property
    def unit(self) -> str | None:
        return self._frame.attrs.get("unit")
