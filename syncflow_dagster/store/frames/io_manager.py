"""The Postgres frame IO manager: Dagster partitions onto stage-frame slices.

It follows the shape of Dagster's own `DbIOManager` (a client that knows the
database, type handlers that know the frame library) for Postgres, which has
no maintained first-party one. The SQL is in client.py, the chunk codec in
codec.py, the streaming reader and writer in stream.py.

Partitions map onto slices: one (entity, date) key, or a contiguous range of
dates for one entity, so single-run backfills over a date range load and
store exactly that range. A run over several entities (a single-run backfill
of a few days × many entities groups by date) hands over `EntityFrames`, one
frame per entity, and each is stored in and loaded from its entity's own table.

Two ways through it:

* Streaming (every sync stage, the report too): an input annotated
  `EntityStreams` is loaded as one `SliceReader` per entity, nothing read
  yet; the stage writes its output through `writer(...)` (one transaction
  per slice, committed before the stage returns) and returns the
  `StoredFrame` handles in `EntityFrames`, which `handle_output` only
  records.
* Whole frames (`pa.Table`, `pd.DataFrame`, `EntityFrames` of tables):
  `handle_output` writes the frame, committed before the step can report
  success, under every executor. An in-process run (`materialize`,
  `execute_in_process`) keeps every step's output in its result until it
  ends, a whole frame included: that is why the stages hand over handles.

Either way, a slice of a few chunks that a stage committed is handed to its
reader in the same process from memory (handoff.py), when Postgres still
holds that very write.

The IO manager's state is the run's, from `setup_for_execution` to
`teardown_after_execution`: the `HandedSlices`, and the `FrameConnections`
(idle connections, the stage tables checked) that every client it builds
shares. Nothing is kept at module level.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any, Protocol

import dagster as dg
import pandas as pd
import pyarrow as pa
from pydantic import Field, PrivateAttr

from syncflow_dagster.store.frames.client import (
    STAGE_SCHEMA,
    FrameConnections,
    FrameSlice,
    PostgresFrameClient,
    stage_table_name,
)
from syncflow_dagster.store.frames.codec import FrameLostError, FrameStoreError
from syncflow_dagster.store.frames.handoff import HANDOFF_CHUNKS, HandedSlices
from syncflow_dagster.store.frames.stream import (
    EntityFrames,
    EntityStreams,
    SliceReader,
    SliceWriter,
    StoredFrame,
    with_partition_column,
)


class FrameHandler(Protocol):
    """Converts one frame library's objects to and from Arrow (Dagster's type handler role)."""

    supported_types: tuple[type, ...]

    def to_arrow(self, obj: Any) -> pa.Table: ...

    def from_arrow(self, table: pa.Table) -> Any: ...


class ArrowFrameHandler:
    supported_types: tuple[type, ...] = (pa.Table,)

    def to_arrow(self, obj: Any) -> pa.Table:
        return obj

    def from_arrow(self, table: pa.Table) -> Any:
        return table


class PandasFrameHandler:
    supported_types: tuple[type, ...] = (pd.DataFrame,)

    def to_arrow(self, obj: Any) -> pa.Table:
        return pa.Table.from_pandas(obj, preserve_index=False)

    def from_arrow(self, table: pa.Table) -> Any:
        return table.to_pandas(types_mapper=pd.ArrowDtype)


def partition_scopes(keys: Iterable[str]) -> dict[str, tuple[dt.date, ...]]:
    """entity → its dates, for a set of `date|entity` multi-partition keys (entities in first-seen order)."""
    scopes: dict[str, set[dt.date]] = {}
    for key in keys:
        by_dimension = getattr(key, "keys_by_dimension", None)
        if by_dimension is None:
            # Dagster's multi-partition key string holds the values in the
            # alphabetical order of the dimension names: "date|entity".
            day, _, name = str(key).partition("|")
            by_dimension = {"date": day, "entity": name}
        scopes.setdefault(by_dimension["entity"], set()).add(dt.date.fromisoformat(by_dimension["date"]))
    return {entity: tuple(sorted(dates)) for entity, dates in scopes.items()}


def partition_scope(keys: Iterable[str]) -> tuple[str, tuple[dt.date, ...]]:
    """(entity, dates) of a set of `entity|date` multi-partition keys for ONE entity."""
    scopes = partition_scopes(keys)
    if len(scopes) != 1:
        raise FrameStoreError(
            f"a single stage frame covers one entity at a time, this run selects {sorted(scopes)}; "
            "hand over EntityFrames (one frame per entity) for a run over several entities"
        )
    ((entity, dates),) = scopes.items()
    return entity, dates


class PostgresFrameIOManager(dg.ConfigurableIOManager):
    """Stores each stage asset's frame (Arrow or pandas, whole or streamed) in Postgres, per entity × date."""

    database_url: str = Field(description="Postgres URL of SyncFlow's database (SYNCFLOW_DATABASE_URL).")
    schema_name: str = Field(default=STAGE_SCHEMA, description="Schema that holds the stage tables.")
    unlogged: bool = Field(default=True, description="Create stage tables UNLOGGED (they are rebuildable).")
    retention_days: int = Field(
        default=14,
        description="Stage partitions older than this many days are pruned by the maintenance job.",
    )

    # The slices this run's stages committed in this process, for their readers here (handoff.py).
    _handoff: HandedSlices | None = PrivateAttr(default=None)
    # The run's connections to the stage store, shared by every client built for it.
    _connections: FrameConnections | None = PrivateAttr(default=None)

    def _client(self) -> PostgresFrameClient:
        return PostgresFrameClient(self.database_url, self.schema_name, self.unlogged, self.connections)

    @property
    def handoff(self) -> HandedSlices | None:
        """The run's hand-off while the resource is set up for execution; None outside a run."""
        return self._handoff

    @property
    def connections(self) -> FrameConnections:
        """The run's connections while the resource is set up for execution."""
        if self._connections is None:
            raise FrameStoreError(
                "the frame IO manager is not set up for execution: Dagster sets it up for a run "
                "(outside one, use `with PostgresFrameClient(url) as client:`)"
            )
        return self._connections

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._handoff = HandedSlices()
        self._connections = FrameConnections()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        # The run is over in this process: the slices it kept and its idle stage-store connections go.
        if self._handoff is not None:
            self._handoff.clear()
        self._handoff = None
        if self._connections is not None:
            self._connections.close()
        self._connections = None

    def prune(self, older_than: dt.date) -> dict[str, int]:
        """Delete stage frames' rows dated before `older_than` (`PostgresFrameClient.prune`)."""
        return self._client().prune(older_than)

    @staticmethod
    def _handler_for(obj_or_type: Any) -> FrameHandler:
        for handler in (ArrowFrameHandler(), PandasFrameHandler()):
            if isinstance(obj_or_type, type):
                if issubclass(obj_or_type, handler.supported_types):
                    return handler
            elif isinstance(obj_or_type, handler.supported_types):
                return handler
        raise FrameStoreError(
            f"the frame IO manager stores pyarrow.Table or pandas.DataFrame, not {obj_or_type!r}"
        )

    def _slices(self, asset_key: dg.AssetKey, partition_keys: Iterable[str]) -> list[FrameSlice]:
        return [
            FrameSlice(stage_table_name(asset_key.path[-1], entity), entity, dates)
            for entity, dates in partition_scopes(partition_keys).items()
        ]

    def writer(
        self, asset_name: str, entity: str, dates: tuple[dt.date, ...], *, chunk_size: int | None = None
    ) -> SliceWriter:
        """A writer that replaces `asset_name`'s slice of `entity` × `dates` in one transaction.

        A streaming stage writes its output through it and returns the
        `StoredFrame` it leaves (`writer.stored`) for `handle_output` to record.
        `chunk_size` is the rows the run's stages handle at a time (the `tuning`
        resource's): the hand-off then keeps slices of at most `HANDOFF_CHUNKS`
        such chunks, so a run that lowers it to save memory lowers that too.
        """
        if chunk_size is not None and self._handoff is not None:
            self._handoff.bound(HANDOFF_CHUNKS * chunk_size)
        where = FrameSlice(stage_table_name(asset_name, entity), entity, tuple(dates))
        writer: SliceWriter = self._client().writer(where, handoff=self._handoff)
        return writer

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not context.has_asset_partitions:
            raise FrameStoreError(f"{context.asset_key.to_user_string()}: stage frames must be partitioned")
        slices = self._slices(context.asset_key, context.asset_partition_keys)
        name = context.asset_key.to_user_string()
        if isinstance(obj, EntityFrames):
            wanted = {where.entity for where in slices}
            if set(obj) != wanted:
                raise FrameStoreError(
                    f"{name}: the run covers entities {sorted(wanted)}, the frames are for {sorted(obj)}"
                )
            frames = [(where, obj[where.entity]) for where in slices]
        elif len(slices) == 1:
            frames = [(slices[0], obj)]
        else:
            raise FrameStoreError(
                f"{name}: this run covers entities {sorted(w.entity for w in slices)}; "
                "a stage over several entities returns EntityFrames (one frame per entity)"
            )
        stored = [self._store(context, where, frame) for where, frame in frames]
        # The stage's temporaries are gone by now: give their pages back.
        return_freed_memory()
        if len(stored) == 1:
            one = stored[0]
            context.add_output_metadata(
                {
                    "dagster/table_name": f"{self.schema_name}.{one.where.table}",
                    "dagster/row_count": one.num_rows,
                    "dagster/column_schema": _column_schema(one.schema),
                    "partition_dates": ", ".join(d.isoformat() for d in one.where.dates),
                    "table_recreated": one.recreated,
                    # The table holds Arrow IPC chunks: how to look at the rows themselves.
                    "read_back": _read_back(context.asset_key, one.where),
                }
            )
            return
        context.add_output_metadata(
            {
                "dagster/row_count": sum(one.num_rows for one in stored),
                "tables": dg.MetadataValue.json(
                    {
                        one.where.entity: {
                            "table": f"{self.schema_name}.{one.where.table}",
                            "rows": one.num_rows,
                            "dates": [d.isoformat() for d in one.where.dates],
                            "table_recreated": one.recreated,
                        }
                        for one in stored
                    }
                ),
                "read_back": " ; ".join(_read_back(context.asset_key, one.where) for one in stored[:3])
                + (" ; ..." if len(stored) > 3 else ""),
            }
        )

    def _store(self, context: dg.OutputContext, where: FrameSlice, obj: Any) -> StoredFrame:
        """Write one entity's frame into its slice (or check the handle of one a stage streamed there)."""
        if isinstance(obj, StoredFrame):
            if obj.where.table != where.table or obj.where.dates != where.dates:
                raise FrameStoreError(
                    f"{context.asset_key.to_user_string()}: the stage wrote {obj.where.table} for "
                    f"{[d.isoformat() for d in obj.where.dates]}, the output is {where.table} for "
                    f"{[d.isoformat() for d in where.dates]}"
                )
            return obj
        frame = with_partition_column(self._handler_for(obj).to_arrow(obj), where)
        # Written and committed before the step can report success, under every
        # executor: a downstream step in another process (multiprocess, Celery),
        # or a re-execution after this process died, reads exactly this frame.
        recreated = self._client().replace_slice(where, frame, self._handoff)
        return StoredFrame(where, frame.num_rows, frame.schema, recreated)

    def load_input(self, context: dg.InputContext) -> Any:
        if not context.has_asset_partitions:
            raise FrameStoreError(f"{context.asset_key.to_user_string()}: stage frames must be partitioned")
        slices = self._slices(context.asset_key, context.asset_partition_keys)
        expected = context.dagster_type.typing_type if context.dagster_type else pa.Table
        if isinstance(expected, type) and issubclass(expected, EntityStreams):
            return EntityStreams({where.entity: self._open(context, where) for where in slices})
        if isinstance(expected, type) and issubclass(expected, EntityFrames):
            return EntityFrames(
                {where.entity: self._load(context, where, ArrowFrameHandler()) for where in slices}
            )
        if len(slices) != 1:
            raise FrameStoreError(
                f"{context.asset_key.to_user_string()}: this run covers entities "
                f"{sorted(w.entity for w in slices)}; load them as EntityFrames (one frame per entity)"
            )
        handler = self._handler_for(expected if isinstance(expected, type) else pa.Table)
        return self._load(context, slices[0], handler)

    def _open(self, context: dg.InputContext, where: FrameSlice) -> SliceReader:
        """A reader of the stored slice (its row counts checked now, its rows read as the stage goes)."""
        try:
            reader: SliceReader | None = self._client().reader(where, self._handoff)
        except FrameLostError as lost:
            # No retry of this step can bring the rows back: fail it now, with the way out.
            raise dg.Failure(description=str(lost), allow_retries=False) from lost
        if reader is None:
            raise FrameStoreError(
                f"{context.asset_key.to_user_string()} has never been materialized for {where.entity} "
                f"(table {self.schema_name}.{where.table} does not exist); materialize it first"
            )
        return reader

    def _load(self, context: dg.InputContext, where: FrameSlice, handler: FrameHandler) -> Any:
        return handler.from_arrow(self._open(context, where).read_all())


def _read_back(asset_key: dg.AssetKey, where: FrameSlice) -> str:
    """The `syncflow frame show` commands that print a stored slice (its first three dates)."""
    return " ; ".join(
        f"syncflow frame show {asset_key.path[-1]} {where.entity} {day.isoformat()}"
        for day in where.dates[:3]
    ) + (" ; ..." if len(where.dates) > 3 else "")


def return_freed_memory() -> None:
    """Hand the pages Arrow's allocator keeps after frees back to the OS.

    Arrow's pool (mimalloc here) keeps freed pages for reuse, so after a stage
    the process's RSS still counted its temporaries (150 MB after normalising
    and hashing 300 000 rows). Returning them at each stage boundary (about
    10 ms) makes RSS show what is really held.
    """
    pa.default_memory_pool().release_unused()


def _column_schema(schema: pa.Schema) -> dg.TableSchema:
    """A frame's columns as Dagster metadata, built where no frame is in scope.

    Dagster compiles a record class's constructor on its first use in a process
    and keeps a copy of the calling function's locals as that constructor's
    globals. Built inside `handle_output`, the process's first TableSchema kept
    that call's frame (`obj`, `frame`) alive for as long as the process lived.
    """
    return dg.TableSchema(columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in schema])
