"""Streaming is exact: the same source through the stage assets with SYNCFLOW_CHUNK_SIZE 1, 7 and the
default leaves the same ScheduleHub contents and the same committed state, equal to the source.

The stages read their input and write their output chunk by chunk (defs/streamed.py). Each chunk size
runs on a database and stand-ins of its own: one run over every entity (parents in earlier entities of
the same run, a rejected value), then changes (updates, inserts, deletes, a key deleted and created
again, so a tombstone and a live row of one key meet in one batch) and a second run that reads them.
The data is small so that a chunk of one row stays quick.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
import sqlalchemy as sa

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.defs import streamed
from syncflow_dagster.defs.assets import CATALOG, STAGE_ASSETS
from syncflow_dagster.defs.resources import SyncTuning
from syncflow_dagster.defs.runner import report_of
from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE
from syncflow_dagster.simulators.datagen import generate_dataset
from syncflow_dagster.store.frames.handoff import HandedSlices
from syncflow_dagster.store.frames.stream import SliceReader
from syncflow_dagster.store.schema import entity_state
from syncflow_dagster_tests.isolation import scratch_database
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import canonical_rows, fetch_snapshot, verify_deployment

ORDER = list(CATALOG.topological_order)
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
ROWS = 90
SEED = 23


def _run_everything(env: Deployment, day: dt.date) -> dg.ExecuteInProcessResult:
    """One run over every entity of `day` (a backfill's range run), parents first."""
    result = dg.materialize(
        [*STAGE_ASSETS],
        resources=env.resources,
        tags={RANGE_START: f"{day.isoformat()}|{ORDER[0]}", RANGE_END: f"{day.isoformat()}|{ORDER[-1]}"},
    )
    assert result.success
    return result


def _delete_and_recreate(env: Deployment, entity_name: str, now: dt.datetime) -> None:
    """Delete one record, then create it again: its tombstone and its new row are read by one run."""
    entity = CATALOG.entity(entity_name)
    record = fetch_snapshot(env.apismith_url, entity.source).slice(0, 1).to_pylist()[0]
    sources = [f.source for f in entity.fields]
    keys = [f.source for f in entity.fields if f.target in entity.business_key]
    deleted_at = (now + dt.timedelta(seconds=2)).isoformat()
    env.apply_changes(deletes={entity.source: [{k: record[k] for k in keys}]}, changed_at=deleted_at)
    upsert = {k: (None if record.get(k) is None else str(record[k])) for k in sources}
    env.apply_changes(
        upserts={entity.source: [upsert]}, changed_at=(now + dt.timedelta(seconds=3)).isoformat()
    )


def _outcome(env: Deployment) -> dict[str, Any]:
    """ScheduleHub's records per entity (canonical text, its ids aside) and the committed state."""
    hub = {name: canonical_rows(env.schedulehub_records(CATALOG.entity(name).resource)) for name in ORDER}
    engine = env.resources["database"].engine
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                entity_state.c.entity, entity_state.c.bk, entity_state.c.data_hash, entity_state.c.rowversion
            )
        ).all()
    state = sorted((r.entity, r.bk, bytes(r.data_hash).hex(), int(r.rowversion)) for r in rows)
    return {"schedulehub": hub, "state": state}


def _sync_with_chunks(
    pg_server_url: str, size: int, now: dt.datetime, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    monkeypatch.setenv("SYNCFLOW_CHUNK_SIZE", str(size))
    # Initial loads of several chunks take the first-load path (store/first_load.py), as a large one does.
    monkeypatch.setattr(streamed, "FIRST_LOAD_MIN_ROWS", 0)
    today = now.date()
    # The same data for every chunk size: generated values depend on the time they are drawn around.
    source = generate_dataset(default_catalog(), ROWS, SEED, as_of=now, bad_row_fraction=0.03)
    with scratch_database(pg_server_url) as url, deployment(url, dataset=source) as env:
        first = report_of(_run_everything(env, today))
        assert first["rejected"] >= 1, "the source should hold a value normalize refuses"
        changed_at = (now + dt.timedelta(seconds=1)).isoformat()
        env.apply_changes(updated_pct=20, inserted_pct=10, deleted_pct=10, seed=5, changed_at=changed_at)
        _delete_and_recreate(env, ORDER[-1], now)
        second = report_of(_run_everything(env, today))
        assert second["fetched"] > 0
        assert second["tombstones"] > 0
        verification = verify_deployment(env)
        assert verification.equal, verification.describe()
        outcome = _outcome(env)
        outcome["counts"] = {
            key: (first.get(key), second.get(key))
            for key in (
                "fetched",
                "tombstones",
                "rejected",
                "insert",
                "update",
                "delete",
                "committed",
                "pending",
            )
        }
        return outcome


# Three whole-catalog syncs with changes, one of them a row per chunk: the lane's longest test by far
# (docs/testing.md), so `make test` runs it and `make test-fast` does not. Six syncs of which two move
# one row per chunk: it overran the suite's 600 s under a CI with the machine's load at 15, so it gets
# the soak's budget.
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chunk_sizes_one_seven_and_the_default_give_the_same_schedulehub_and_state(
    pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    outcomes = {
        size: _sync_with_chunks(pg_server_url, size, now, monkeypatch) for size in (DEFAULT_CHUNK_SIZE, 7, 1)
    }
    reference = outcomes[DEFAULT_CHUNK_SIZE]
    assert any(reference["schedulehub"].values())
    assert reference["state"]
    for size in (7, 1):
        assert outcomes[size]["counts"] == reference["counts"], size
        assert outcomes[size]["state"] == reference["state"], size
        assert outcomes[size]["schedulehub"] == reference["schedulehub"], size


def test_the_chunk_size_reaches_every_stage_as_the_tuning_resources_config(
    pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SYNCFLOW_CHUNK_SIZE becomes the `tuning` resource's `chunk_size`, and every stage reads its input
    slice by the resource's value (a run's override here), never by the variable, and the hand-off keeps
    slices of at most two such chunks: no stage reads the environment itself."""
    sizes: list[int] = []
    bounds: list[int] = []
    read_chunks = SliceReader.chunks
    bound = HandedSlices.bound

    def spy(self: SliceReader, size: int, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        sizes.append(size)
        return read_chunks(self, size, columns)

    def spy_bound(self: HandedSlices, max_rows: int) -> None:
        bounds.append(max_rows)
        bound(self, max_rows)

    monkeypatch.setattr(SliceReader, "chunks", spy)
    monkeypatch.setattr(HandedSlices, "bound", spy_bound)
    monkeypatch.setenv("SYNCFLOW_CHUNK_SIZE", "7")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    source = generate_dataset(default_catalog(), 30, SEED, as_of=now, bad_row_fraction=0.0)
    with scratch_database(pg_server_url) as url, deployment(url, dataset=source) as env:
        assert env.resources["tuning"].chunk_size == 7
        env.resources["tuning"] = SyncTuning(chunk_size=5)
        report = report_of(_run_everything(env, now.date()))
        assert report["committed"] > 7, "the data should span several chunks"
        assert verify_deployment(env).equal
    assert sizes, "the stages read their inputs in chunks"
    assert set(sizes) == {5}
    assert set(bounds) == {10}, "every stage's writer bounds the hand-off by two of the run's chunks"
