"""The one pipeline's carriers and its chain: in-memory frames read and written as stored slices are."""

from __future__ import annotations

import pyarrow as pa
import pytest

from syncflow_dagster.defs import pipeline, streamed
from syncflow_dagster.defs.memory_frames import TableReader, TableWriter
from syncflow_dagster.defs.stages import StageResult


def test_a_table_reader_yields_chunks_of_the_size_asked_and_the_columns_asked() -> None:
    table = pa.table({"a": list(range(10)), "b": [str(i) for i in range(10)]})
    reader = TableReader(table)
    assert reader.num_rows == 10
    assert reader.schema == table.schema
    assert [c.num_rows for c in reader.chunks(4)] == [4, 4, 2]
    assert [c.column_names for c in reader.chunks(4, ["b"])] == [["b"]] * 3
    assert pa.concat_tables(reader.chunks(3)).equals(table)
    assert list(TableReader(table.slice(0, 0)).chunks(5)) == []
    with pytest.raises(ValueError, match="at least 1"):
        next(reader.chunks(0))


def test_a_table_writer_joins_chunks_of_other_columns_as_the_frame_store_does() -> None:
    writer = TableWriter()
    with writer:
        writer.write(pa.table({"k": [1, 2], "payload": ["x", "y"]}))
        writer.write(pa.table({"k": [3]}))  # a chunk of tombstones lacks the payload
    assert writer.stored is not None
    assert writer.stored.to_pydict() == {"k": [1, 2, 3], "payload": ["x", "y", None]}


def test_a_table_writer_keeps_nothing_of_a_stage_that_raised() -> None:
    writer = TableWriter()

    def stage() -> None:
        with writer:
            writer.write(pa.table({"k": [1]}))
            raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        stage()
    assert writer.stored is None


def test_a_row_wise_stage_over_memory_runs_once_per_chunk_and_once_on_no_rows() -> None:
    seen: list[int] = []

    def stage(chunk: pa.Table) -> StageResult:
        seen.append(chunk.num_rows)
        return StageResult(chunk, {"rows": chunk.num_rows})

    writer = TableWriter()
    result = streamed.row_wise(TableReader(pa.table({"k": [1, 2, 3]})), writer, stage, 2)
    assert seen == [2, 1]
    assert result.counts == {"rows": 3}
    assert result.frame.to_pydict() == {"k": [1, 2, 3]}
    seen.clear()
    empty = streamed.row_wise(TableReader(pa.table({"k": pa.array([], pa.int64())})), TableWriter(), stage, 2)
    assert seen == [0]
    assert empty.frame.schema.names == ["k"]


def test_run_stages_names_the_stages_it_knows() -> None:
    run = pipeline.EntityRun(None, None, None, None, chunk_size=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no stages from 'fetch'"):
        pipeline.run_stages("fetch", pa.table({}), run)
    with pytest.raises(ValueError, match="no stages from 'persist' to 'deliver'"):
        pipeline.run_stages("persist", pa.table({}), run, last="deliver")
    with pytest.raises(ValueError, match="unknown stage 'report'"):
        pipeline.run_stage("report", run, TableReader(pa.table({})), TableWriter())
    assert pipeline.STAGES[0] == "normalize"
    assert pipeline.STAGES[-1] == "persist"
