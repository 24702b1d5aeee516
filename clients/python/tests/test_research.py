"""Researchers' calls against a real server filled with demo data."""

import datetime as dt

import pandas as pd
import pytest

import ern_registry
from ern_registry import Client


@pytest.fixture(scope="module")
def researcher(demo_server):
    with Client(demo_server.address, api_key=demo_server.keys["dr-visser"]) as client:
        yield client


def test_count_by_country_and_sex_is_a_table_with_missing_suppressed_cells(researcher):
    df = researcher.count_patients("ERN-LUNG", group_by=["country", "sex"])
    assert df.index.name == "country"
    assert df.columns.name == "sex"
    assert df.index[-1] == "total" and df.columns[-1] == "total"
    assert {"female", "male"} <= set(df.columns)
    assert all(str(dtype) == "Int64" for dtype in df.dtypes)
    mask = df.ern.mask
    assert mask.shape == df.shape
    # The mask is exactly the missing cells, and counts every suppressed cell and total.
    assert (mask == df.isna()).all().all()
    assert int(mask.sum().sum()) == df.ern.suppressed > 0
    k = df.ern.k
    assert k == 5
    published = df.stack().dropna()
    assert all(v == 0 or v >= k for v in published)
    assert isinstance(df.ern.as_of, dt.datetime) and df.ern.as_of.tzinfo is not None
    assert df.attrs["registry"] == "ERN-LUNG"
    assert df.ern.unit == "patients"
    # Published totals add up where nothing in a row is hidden.
    for country, row in df.iterrows():
        if not row.isna().any():
            assert row.drop("total").sum() == row["total"], country


def test_a_one_way_count_has_one_column_and_a_total(researcher):
    df = researcher.count_patients("ERN-LUNG", group_by=["sex"])
    assert list(df.columns) == ["count"]
    assert df.index[-1] == "total"
    total = df.loc["total", "count"]
    assert total > 0
    if not df["count"].isna().any():
        assert df["count"].drop("total").sum() == total


def test_filters_narrow_the_count(researcher):
    everyone = researcher.count_patients("ERN-LUNG")
    assert list(everyone.index) == ["total"]
    women = researcher.count_patients("ERN-LUNG", filters={"sex": "female"})
    assert 0 < women.loc["total", "count"] < everyone.loc["total", "count"]


def test_diagnostic_delay_has_bands_totals_and_quantiles(researcher):
    df = researcher.diagnostic_delay("ERN-LUNG", group_by=["onset_age_band"])
    bands = ["<1y", "1-5y", "5-10y", "10-20y", ">20y"]
    assert list(df.columns) == bands + ["total", "p25_years", "median_years", "p75_years", "p90_years"]
    assert df.index.name == "onset_age_band"
    assert df.index[-1] == "total"
    mask = df.ern.mask
    assert not mask[["median_years"]].any().any()
    assert int(mask.sum().sum()) == df.ern.suppressed
    for label, row in df.iterrows():
        counts_published = not row[bands + ["total"]].isna().any()
        # Quantiles only where every count of the row is published.
        if not counts_published:
            assert pd.isna(row["median_years"]), label
        if counts_published and row["total"] > 0:
            assert sum(row[bands]) == row["total"]
    overall = df.loc["total"]
    assert overall["total"] > 0
    # Overall quantiles only when no count of the table is suppressed.
    if mask[bands + ["total"]].any().any():
        assert pd.isna(overall["median_years"])
    else:
        assert overall["p25_years"] <= overall["median_years"] <= overall["p90_years"]


def test_find_expertise_lists_centres_by_volume_band(researcher):
    df = researcher.find_expertise(["ORPHA:586"])
    assert list(df.columns) == [
        "centre_code", "centre_name", "country", "registry", "volume", "volume_min", "volume_max",
    ]
    assert len(df) > 0
    assert set(df["registry"]) == {"ERN-LUNG"}
    closed = df.dropna(subset=["volume_max"])
    assert (closed["volume_min"] < closed["volume_max"]).all()
    assert df.attrs["registries"] == ["ERN-LUNG"]


def test_a_registry_of_another_ern_is_permission_denied(researcher):
    with pytest.raises(ern_registry.PermissionDenied) as raised:
        researcher.count_patients("ERN-EYE")
    assert raised.value.code.name == "PERMISSION_DENIED"


def test_a_malformed_request_names_its_fields(researcher):
    with pytest.raises(ern_registry.InvalidArgument) as raised:
        researcher.count_patients("not a registry")
    fields = [v.field for v in raised.value.field_violations]
    assert fields == ["registry"]
    assert raised.value.field_violations[0].description


def test_an_unknown_dimension_is_refused_before_sending(researcher):
    with pytest.raises(ValueError, match="unknown dimension"):
        researcher.count_patients("ERN-LUNG", group_by=["shoe_size"])


def test_a_wrong_key_is_unauthenticated(demo_server):
    with Client(demo_server.address, api_key="ern_wrong.key") as client:
        with pytest.raises(ern_registry.Unauthenticated):
            client.count_patients("ERN-LUNG")


def test_the_key_comes_from_the_environment(demo_server, monkeypatch):
    monkeypatch.setenv("ERN_API_KEY", demo_server.keys["dr-visser"])
    with Client(f"http://{demo_server.address}") as client:
        assert client.count_patients("ERN-LUNG").loc["total", "count"] > 0
    monkeypatch.delenv("ERN_API_KEY")
    with pytest.raises(ValueError, match="ERN_API_KEY"):
        Client(demo_server.address)


def test_a_deadline_that_has_passed_fails_the_call(demo_server):
    with Client(demo_server.address, api_key=demo_server.keys["dr-visser"]) as client:
        with pytest.raises(ern_registry.DeadlineExceeded):
            client.count_patients("ERN-LUNG", group_by=["country", "sex"], timeout=0.0)


def test_the_delay_plot_draws_one_bar_per_group(researcher, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    df = researcher.diagnostic_delay("ERN-LUNG", group_by=["onset_age_band"])
    ax = ern_registry.plot_diagnostic_delay(df)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [str(k) for k in df.index]
    ax.figure.savefig(tmp_path / "delay.png")
    assert (tmp_path / "delay.png").stat().st_size > 0
