"""`syncflow frame show`: look at a stage frame the IO manager keeps in Postgres.

Stage frames are stored as Arrow IPC chunks (store/frame_io_manager.py), which
SQL cannot browse; this command reads one partition's frame back with its
exact types, prints its first rows, and can write the whole frame to Parquet
for a closer look in any tool.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from syncflow_dagster.cli.ops import Limit, _engine, _known_entity, _settings

console = Console()
frame_app = typer.Typer(help="Stage frames kept in Postgres (schema syncflow_stage).", no_args_is_help=True)

# Cells longer than this are cut in the printed table (the Parquet file keeps them whole).
_CELL = 40


def _stage_names() -> list[str]:
    from syncflow_dagster.defs.assets import STAGE_ASSETS

    return [asset.key.path[-1] for asset in STAGE_ASSETS]


def _cell(value: object) -> str:
    text = "∅" if value is None else value.hex() if isinstance(value, bytes) else str(value)
    return text if len(text) <= _CELL else text[: _CELL - 1] + "…"


@frame_app.command("show")
def frame_show(
    asset: Annotated[str, typer.Argument(help="Stage asset: extracted, normalized, identified, ...")],
    entity: Annotated[str, typer.Argument(help="Catalog entity, e.g. work_orders.")],
    day: Annotated[dt.datetime, typer.Argument(formats=["%Y-%m-%d"], help="Partition date, YYYY-MM-DD.")],
    limit: Limit = 20,
    parquet: Annotated[
        Path | None, typer.Option(help="Also write the whole frame to this Parquet file.")
    ] = None,
) -> None:
    """One partition's stage frame: row count, columns and types, the first rows."""
    from syncflow_dagster.store.frame_io_manager import (
        FrameSlice,
        FrameStoreError,
        PostgresFrameClient,
        stage_table_name,
    )

    stages = _stage_names()
    if asset not in stages:
        raise ValueError(f"unknown stage asset {asset!r}; the stages are {', '.join(stages)}")
    _known_entity(entity)
    engine = _engine()
    try:
        with engine.connect():  # an unreachable database fails here, with the usual one line
            pass
    finally:
        engine.dispose()
    table_name = stage_table_name(asset, entity)
    where = FrameSlice(table_name, entity, (day.date(),))
    with PostgresFrameClient(_settings().database_url.get_secret_value()) as client:
        try:
            frame = client.select_slice(where)
        except FrameStoreError as exc:
            raise ValueError(str(exc)) from None
        if frame is None:
            raise ValueError(
                f"{asset} has never been materialized for {entity} (no table {client.schema}.{table_name})"
            )
        written = client.written_slices(where).get(day.date())
    if written is None and frame.num_rows == 0:
        # An empty frame of a date nobody wrote is not an empty stage: say which it is.
        raise ValueError(
            f"{asset} × {entity} × {day.date()} is not kept: never materialized for that date, or older "
            "than the stage retention (SYNCFLOW_STAGE_RETENTION_DAYS); other dates of it are"
        )
    when = f", materialized {written[1]:%Y-%m-%d %H:%M:%S %Z}" if written is not None else ""
    empty = ": the stage kept no rows for this date" if frame.num_rows == 0 else ""
    title = (
        f"{asset} × {entity} × {day.date()}: {frame.num_rows} rows, {frame.num_columns} columns "
        f"({client.schema}.{table_name}{when}){empty}"
    )
    shown = Table(title=title)
    for field in frame.schema:
        shown.add_column(f"{field.name}\n{field.type}", overflow="fold")
    for row in frame.slice(0, limit).to_pylist():
        shown.add_row(*(_cell(row[name]) for name in frame.column_names))
    console.print(shown)
    if parquet is not None:
        import pyarrow.parquet as pq

        pq.write_table(frame, parquet)
        console.print(f"wrote {frame.num_rows} rows to {parquet}")
