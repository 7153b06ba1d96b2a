"""Bad input: malformed records, wrong types, oversized values and schema drift from APISmith.

Row-level problems become failed records (`invalid_value`, permanent) whose
detail names the entity, the key, the field and the value, and the run goes
on. A change of the source's shape is decided per case (docs/reliability.md):
a new column is ignored, a missing optional column is null, a missing
required column fails the run early with `SchemaDriftError`, a renamed column
is a missing one plus a new one, and a changed type is re-coerced when the
value still reads as the declared type and rejected otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.clients.apismith import ApiSmithClient, ChangePage
from syncflow_dagster.defs.runner import materialize_sync, report_of
from syncflow_dagster.engine.normalize import SchemaDriftError, normalize
from syncflow_dagster_tests.reliability_harness import clear_faults, put_faults
from syncflow_dagster_tests.sync_harness import deployment

CATALOG = default_catalog()
TODAY = dt.datetime.now(dt.UTC).date()
SITES = CATALOG.entity("sites")
ITEMS = CATALOG.entity("items")


def _sites(**columns: list[str | None] | None) -> pa.Table:
    """Two good sites rows; a column given as None is left out (the source no longer sends it)."""
    base: dict[str, list[str | None] | None] = {
        "SiteCode": ["S1", "S2"],
        "SiteName": ["Plant one", "Plant two"],
        "Country": ["de", "fr"],
        "TimeZone": ["Europe/Berlin", "Europe/Paris"],
        "Active": ["true", "false"],
        "RowVersion": ["1", "2"],
        "ModifiedAt": ["2024-05-01T10:00:00+00:00", "2024-05-01T11:00:00+00:00"],
    }
    base.update(columns)
    return pa.table({k: pa.array(v, pa.string()) for k, v in base.items() if v is not None})


def test_malformed_rows_become_failed_records_naming_entity_key_field_value(fresh_database_url: str) -> None:
    with deployment(fresh_database_url, rows=100, seed=31) as env:
        put_faults(env.apismith_url, malformed_row_probability=0.4, seed=1)
        result = materialize_sync("work_centers", TODAY, resources=env.resources)
        clear_faults(env.apismith_url)
        assert result.success  # the run goes on
        report = report_of(result)
        assert report["rejected"] > 0
        failures = env.resources["database"].failures().list_failures("work_centers", "invalid_value")
        assert len(failures) == report["rejected"]
        for failure in failures:
            assert failure.reason_class == "permanent"
            assert f"entity work_centers, key {failure.bk!r}, field " in failure.detail
            assert "(value '" in failure.detail
        # Every rejected row is recorded, none silently dropped: the rest were handled (pending here).
        assert report["pending"] + report["rejected"] == report["fetched"]


def test_wrong_types_and_oversized_values_are_rejected_with_reasons() -> None:
    raw = _sites(
        SiteCode=["S1", "S2", "S3"],
        SiteName=["ok", "N" * 500, "ok"],  # max_length 120
        Country=["de", "fr", "it"],
        TimeZone=["Europe/Berlin", None, None],
        Active=["true", "maybe", "7"],  # not a bool spelling
        RowVersion=["1", "2", "3"],
        ModifiedAt=["2024-05-01T10:00:00+00:00"] * 3,
    )
    result = normalize(SITES, raw)
    assert result.rows.column("site_code").to_pylist() == ["S1"]
    rejected = result.rejected.to_pylist()
    assert {(r["business_key"], r["field"]) for r in rejected} == {
        ("S2", "SiteName"),
        ("S2", "Active"),
        ("S3", "Active"),
    }
    assert all(r["entity"] == "sites" and r["raw_value"] and r["reason"] for r in rejected)


def test_schema_drift_new_column_is_ignored() -> None:
    plain = normalize(SITES, _sites())
    drifted = normalize(SITES, _sites(Region=["EU", "EU"]))
    assert drifted.rows.equals(plain.rows)
    assert drifted.rejected.num_rows == 0


def test_schema_drift_missing_optional_column_is_null() -> None:
    result = normalize(SITES, _sites(TimeZone=None))
    assert result.rows.column("time_zone").to_pylist() == [None, None]
    assert result.rejected.num_rows == 0


def test_schema_drift_missing_required_column_fails_early_with_a_clear_message() -> None:
    with pytest.raises(SchemaDriftError, match=r"entity 'sites': required source column 'SiteName'"):
        normalize(SITES, _sites(SiteName=None))
    with pytest.raises(SchemaDriftError, match=r"rowversion column 'RowVersion' is missing"):
        normalize(SITES, _sites(RowVersion=None))


def test_schema_drift_renamed_column_is_missing_plus_new() -> None:
    # Renamed optional column: the old name is missing (null), the new one ignored.
    renamed = _sites(TimeZone=None, TZ=["Europe/Berlin", "Europe/Paris"])
    assert normalize(SITES, renamed).rows.column("time_zone").to_pylist() == [None, None]
    # Renamed required column: the run fails early.
    with pytest.raises(SchemaDriftError, match="SiteName"):
        normalize(SITES, _sites(SiteName=None, SiteTitle=["a", "b"]))


def test_schema_drift_changed_type_is_recoerced_or_rejected() -> None:
    raw = pa.table(
        {
            "ItemNo": ["I1", "I2", "I3"],
            "LeadTimeDays": pa.array([5.0, 7.5, None], pa.float64()),  # int column now sent as float
            "StdCost": pa.array([1.5, 2.25, 3.0], pa.float64()),  # decimal as a JSON number
            "Blocked": pa.array([True, False, True]),  # bool as a real boolean
            "RowVersion": pa.array([1, 2, 3], pa.int64()),
            "ModifiedAt": ["2024-05-01T10:00:00+00:00"] * 3,
        }
    )
    result = normalize(ITEMS, raw)
    assert result.rows.column("item_no").to_pylist() == ["I1", "I3"]
    assert result.rows.column("lead_time_days").to_pylist() == [5, None]
    assert [str(v) for v in result.rows.column("standard_cost").to_pylist()] == ["1.5000", "3.0000"]
    assert result.rows.column("blocked").to_pylist() == [True, True]
    (bad,) = result.rejected.to_pylist()
    assert (bad["business_key"], bad["field"], bad["raw_value"]) == ("I2", "LeadTimeDays", "7.5")


def test_schema_drift_through_dagster_fails_the_run_at_normalize_and_delivers_nothing(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # APISmith stops sending a required column (the stand-in refuses such data, so the drift is
    # applied to what the client receives).
    # The fetch stage reads page by page (and writes each page as it arrives).
    original = ApiSmithClient.iter_change_pages

    async def without_site_name(
        self: ApiSmithClient, source: str, *args: Any, **kwargs: Any
    ) -> AsyncIterator[ChangePage]:
        async for page in original(self, source, *args, **kwargs):
            if source == "Sites" and "SiteName" in page.rows.column_names:
                page = dataclasses.replace(page, rows=page.rows.drop_columns(["SiteName"]))
            yield page

    monkeypatch.setattr(ApiSmithClient, "iter_change_pages", without_site_name)
    with deployment(fresh_database_url, rows=100, seed=32) as env:
        result = materialize_sync("sites", TODAY, resources=env.resources, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert failure.step_key == "normalized"
        assert "SchemaDriftError" in repr(failure.event_specific_data)
        assert "required source column 'SiteName'" in repr(failure.event_specific_data)
        # Nothing delivered and nothing marked synced: the next good run starts from scratch.
        assert env.schedulehub_records("sites").num_rows == 0
        assert env.resources["database"].state().count("sites") == 0
