"""Answers turned into DataFrames without a server: the shapes the server may send."""

import pandas as pd

from ern_registry.frames import count_table, delay_table
from ern_registry.v1 import research_pb2

BANDS = ["<1y", "1-5y", "5-10y", "10-20y", ">20y"]


def test_a_delay_answer_that_lists_nothing_is_one_suppressed_total_row():
    # Every count suppressed: no group, no band total, the grand total hidden.
    answer = research_pb2.DiagnosticDelayResponse(
        registry="ERN-LUNG", min_cell_count=5, bands=BANDS, suppressed=1, unit="patients"
    )
    answer.grand_total.SetInParent()
    frame = delay_table(answer)
    assert list(frame.index) == ["total"]
    assert frame.loc["total", BANDS + ["total"]].isna().all()


def test_a_count_answer_that_lists_nothing_is_one_suppressed_total():
    for group_by in ([research_pb2.DIMENSION_COUNTRY], [research_pb2.DIMENSION_COUNTRY, research_pb2.DIMENSION_SEX]):
        table = research_pb2.CountTable(registry="ERN-LUNG", min_cell_count=5, suppressed=1, unit="patients")
        table.row_dimension = group_by[0]
        table.column_dimensions.extend(group_by[1:])
        table.grand_total.SetInParent()
        frame = count_table(table)
        assert frame.size == 1
        assert pd.isna(frame.iloc[0, 0])
