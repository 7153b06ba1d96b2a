"""Fuzzing: the engine only ever rejects (never raises) on arbitrary text, and garbage pages never crash.

Hypothesis feeds every source column of an entity arbitrary text; normalize
must account for each row exactly once (kept or rejected with a reason). The
APISmith stand-in's garbage pages are re-fetched by the client, and when they
never stop the error names the entity and the page, not a parser's internals.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.clients.apismith import ApiSmithPageError
from syncflow_dagster.defs import stages
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster_tests.reliability_harness import faults_served, put_faults
from syncflow_dagster_tests.sync_harness import deployment

CATALOG = default_catalog()
WORK_ORDERS = CATALOG.entity("work_orders")
TEXT = st.one_of(
    st.none(), st.text(max_size=40), st.sampled_from(["", " ", "-0", "1e309", "NaN", "\x1f", "\x00"])
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(*[TEXT for _ in WORK_ORDERS.fields]), min_size=1, max_size=8))
def test_normalize_never_raises_on_arbitrary_text_only_rejects(values: list[tuple[str | None, ...]]) -> None:
    columns = {
        spec.source: pa.array([row[i] for row in values], pa.string())
        for i, spec in enumerate(WORK_ORDERS.fields)
    }
    columns["RowVersion"] = pa.array([str(i + 1) for i in range(len(values))], pa.string())
    columns["ModifiedAt"] = pa.array(["2024-05-01T10:00:00+00:00"] * len(values), pa.string())
    result = normalize(WORK_ORDERS, pa.table(columns))
    rejected_rows = (
        set(result.rejected.column("business_key").to_pylist()) if result.rejected.num_rows else set()
    )
    kept = result.rows.num_rows
    assert kept <= len(values)
    # Each input row is kept or has at least one rejected value with a reason.
    assert result.rejected.num_rows >= len(values) - kept
    assert all(r for r in result.rejected.column("reason").to_pylist())
    assert len(rejected_rows) <= len(values)
    if kept:
        identified = add_identity(WORK_ORDERS, result.rows)  # kept rows always get an identity
        assert identified.column("_bk").null_count == 0


def test_garbage_pages_are_refetched_then_named_when_they_never_stop(fresh_database_url: str) -> None:
    day = (dt.datetime.now(dt.UTC).date(),)
    entity = CATALOG.entity("sites")
    with deployment(fresh_database_url, rows=100, seed=41) as env:
        put_faults(env.apismith_url, garbage_page_probability=1.0, max_faults=2, seed=1)
        fetched = stages.fetch_stage(env.resources["apismith"].client(), entity, day)
        assert fetched.counts["fetched"] > 0
        assert faults_served(env.apismith_url) == {"garbage_page": 2}
        put_faults(env.apismith_url, garbage_page_probability=1.0, seed=2)
        with pytest.raises(ApiSmithPageError, match=r"APISmith entity 'Sites' .*page") as caught:
            stages.fetch_stage(env.resources["apismith"].client(), entity, day)
        assert "Traceback" not in str(caught.value)
