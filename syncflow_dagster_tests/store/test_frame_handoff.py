"""The frame IO manager's hand-off: in-process stages get the stored frame without reading it back,
and a frame is in Postgres before its step reports success, so a downstream step in another process
never reads an earlier run's frame."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from syncflow_dagster.store.frames import stream
from syncflow_dagster.store.frames.codec import PARTITION_COLUMN
from syncflow_dagster.store.frames.io_manager import (
    FrameSlice,
    PostgresFrameClient,
    PostgresFrameIOManager,
)

DAY = dt.date(2026, 11, 28)
ROWS = 50_010  # a large frame (the writes of 50 000 rows and more used to go to a background thread)


def _assets() -> list[dg.AssetsDefinition]:
    partitions = dg.MultiPartitionsDefinition(
        {
            "entity": dg.StaticPartitionsDefinition(["items"]),
            "date": dg.DailyPartitionsDefinition("2026-11-01"),
        }
    )

    @dg.asset(partitions_def=partitions, io_manager_key="frames")
    def big_upstream() -> pa.Table:
        numbers = np.arange(ROWS, dtype=np.int64)
        return pa.table({"n": pa.array(numbers), "text": pc.cast(pa.array(numbers), pa.string())})

    @dg.asset(partitions_def=partitions, io_manager_key="frames")
    def small_downstream(big_upstream: pa.Table) -> pa.Table:
        return pa.table({"rows": [big_upstream.num_rows], "total": [pc.sum(big_upstream["n"]).as_py()]})

    return [big_upstream, small_downstream]


class DecodeCounter:
    """Counts the stored chunks decoded (every read from Postgres decodes each chunk it reads)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = stream.decode

        def counting(blob: Any, columns: Any = None) -> pa.Table:
            self.count += 1
            return real(blob, columns)

        monkeypatch.setattr(stream, "decode", counting)


def test_in_process_stage_reads_the_handed_frame_and_postgres_holds_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = DecodeCounter(monkeypatch)
    manager = PostgresFrameIOManager(database_url=database_url, schema_name="syncflow_stage_handoff")
    key = dg.MultiPartitionKey({"entity": "items", "date": DAY.isoformat()})
    result = dg.materialize(_assets(), partition_key=key, resources={"frames": manager})
    assert result.success
    assert decodes.count == 0, "a frame handed over in this process was read back from Postgres"
    monkeypatch.undo()

    with PostgresFrameClient(database_url, "syncflow_stage_handoff") as client:
        upstream = client.select_slice(FrameSlice("big_upstream__items", "items", (DAY,)))
        downstream = client.select_slice(FrameSlice("small_downstream__items", "items", (DAY,)))
    assert upstream is not None
    assert downstream is not None
    assert upstream.num_rows == ROWS
    assert pc.sum(upstream["n"]).as_py() == ROWS * (ROWS - 1) // 2
    assert downstream.to_pylist()[0]["rows"] == ROWS
    assert downstream.to_pylist()[0]["total"] == ROWS * (ROWS - 1) // 2


@pytest.fixture
def clear_client(database_url: str) -> Iterator[PostgresFrameClient]:
    with PostgresFrameClient(database_url, "syncflow_stage_handoff_clear") as client:
        yield client


def test_replacing_the_only_stored_date_truncates_and_other_dates_survive(
    clear_client: PostgresFrameClient,
) -> None:
    client = clear_client
    other = DAY - dt.timedelta(days=1)

    def frame(day: dt.date, n: int) -> pa.Table:
        return pa.table(
            {"n": pa.array(range(n), pa.int64()), PARTITION_COLUMN: pa.array([day] * n, pa.date32())}
        )

    only = FrameSlice("clear__items", "items", (DAY,))
    client.replace_slice(only, frame(DAY, 5))
    client.replace_slice(only, frame(DAY, 3))  # the table holds only DAY: the TRUNCATE path
    again = client.select_slice(only)
    assert again is not None
    assert again.num_rows == 3
    client.replace_slice(FrameSlice("clear__items", "items", (other,)), frame(other, 2))
    client.replace_slice(only, frame(DAY, 4))  # another date is stored: the DELETE path
    kept = client.select_slice(FrameSlice("clear__items", "items", (other, DAY)))
    assert kept is not None
    assert sorted(str(d) for d in kept[PARTITION_COLUMN].to_pylist()) == [str(other)] * 2 + [str(DAY)] * 4


# ------------------------------------------------------------------------------------------------
# A frame is durable before its step succeeds: a run worker killed after it never leaves a stale frame

STALE_SCHEMA = "syncflow_stage_stale"
STALE_URL_ENV = "SYNCFLOW_TEST_STALE_FRAME_URL"
STALE_VALUE_ENV = "SYNCFLOW_TEST_STALE_FRAME_VALUE"
STALE_MARKER_ENV = "SYNCFLOW_TEST_STALE_FRAME_MARKER"
SLOW_WRITE_S = 4.0


class _SlowFrameClient(PostgresFrameClient):
    """The second run's upstream write takes SLOW_WRITE_S longer (a busy Postgres)."""

    def replace_slice(self, where: FrameSlice, frame: pa.Table, handoff: Any = None) -> bool:
        if where.table.startswith("versioned_upstream") and os.environ.get(STALE_VALUE_ENV) == "2":
            time.sleep(SLOW_WRITE_S)
        return super().replace_slice(where, frame, handoff)


class _SlowFrameIOManager(PostgresFrameIOManager):
    def _client(self) -> PostgresFrameClient:
        return _SlowFrameClient(self.database_url, self.schema_name, self.unlogged, self.connections)


def _versioned_assets() -> list[dg.AssetsDefinition]:
    partitions = dg.MultiPartitionsDefinition(
        {
            "entity": dg.StaticPartitionsDefinition(["items"]),
            "date": dg.DailyPartitionsDefinition("2026-11-01"),
        }
    )

    @dg.asset(partitions_def=partitions, io_manager_key="frames")
    def versioned_upstream() -> pa.Table:
        value = int(os.environ[STALE_VALUE_ENV])
        return pa.table({"n": pa.array(np.full(ROWS, value, dtype=np.int64))})

    @dg.asset(partitions_def=partitions, io_manager_key="frames")
    def versioned_downstream(versioned_upstream: pa.Table) -> pa.Table:
        marker = os.environ.get(STALE_MARKER_ENV)
        if marker:
            # The run worker dies here, after its upstream step reported success (SIGKILL, OOM).
            Path(marker).write_text("upstream step succeeded")
            os._exit(9)
        return pa.table({"seen": pc.unique(versioned_upstream["n"])})

    return [versioned_upstream, versioned_downstream]


def _materialize_versioned() -> None:
    key = dg.MultiPartitionKey({"entity": "items", "date": DAY.isoformat()})
    manager = _SlowFrameIOManager(database_url=os.environ[STALE_URL_ENV], schema_name=STALE_SCHEMA)
    dg.materialize(_versioned_assets(), partition_key=key, resources={"frames": manager})


def test_a_step_that_succeeded_left_its_frame_in_postgres_though_the_worker_died_next(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A re-execution from failure reads the frame the succeeded step produced, never an older one.

    Before, frames of 50 000 rows and more were written by a background thread
    after the step had reported success: a worker killed next lost the write,
    and the re-execution read the previous run's frame as if it were current.
    """
    monkeypatch.setenv(STALE_URL_ENV, database_url)
    monkeypatch.setenv(STALE_VALUE_ENV, "1")
    _materialize_versioned()  # the previous run of the partition: 1s everywhere
    marker = tmp_path / "upstream-succeeded"
    env = {**os.environ, STALE_VALUE_ENV: "2", STALE_MARKER_ENV: str(marker)}
    code = "from syncflow_dagster_tests.store.test_frame_handoff import _materialize_versioned as m; m()"
    died = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert died.returncode == 9, died.stderr.decode()[-2000:]
    assert marker.read_text() == "upstream step succeeded"
    with PostgresFrameClient(database_url, STALE_SCHEMA) as reading:
        stored = reading.select_slice(FrameSlice("versioned_upstream__items", "items", (DAY,)))
    assert stored is not None
    assert stored.num_rows == ROWS
    assert pc.unique(stored["n"]).to_pylist() == [2], (
        "the succeeded step's frame was lost: a stale one is left"
    )
