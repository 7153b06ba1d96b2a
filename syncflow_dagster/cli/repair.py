"""`syncflow resync`: deliver again what SyncFlow holds as delivered, for a ScheduleHub that lost records.

    syncflow resync ENTITY... [--all] [--date D | --dates D1..D2] [--wait]

The same launcher as `syncflow sync` (one run per entity, parents first,
through SYNCFLOW_DAGSTER_URL) with the run tag `syncflow/resync=true`: each
run reads its dates' whole window from APISmith and sends every row to
ScheduleHub, also those it would skip as already delivered. ScheduleHub
upserts by external key, so a resync is idempotent. Without dates it covers
every date from SYNCFLOW_PARTITIONS_START to today. Exit codes as `syncflow sync`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from syncflow_dagster.cli.sync import _parse_date, _parse_dates, chosen_entities, launch_and_follow


def resync(
    entities: Annotated[
        list[str] | None,
        typer.Argument(help="Catalog entities to deliver again (parents are launched first)."),
    ] = None,
    all_entities: Annotated[bool, typer.Option("--all", help="Every entity of the catalog.")] = False,
    date: Annotated[str | None, typer.Option(help="One partition date, YYYY-MM-DD.")] = None,
    dates: Annotated[
        str | None, typer.Option(help="A date range D1..D2 (inclusive); default: every date.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the runs to their end with a progress bar per run.")
    ] = False,
) -> None:
    """Deliver again to ScheduleHub what SyncFlow holds as delivered (run tag syncflow/resync=true)."""
    from syncflow_dagster.service import launch

    names = chosen_entities(entities, all_entities, "resync")
    if date is not None and dates is not None:
        raise ValueError("give one of --date or --dates")
    request = launch.SyncRequest(
        entities=names,
        date=_parse_date(date) if date else None,
        dates=_parse_dates(dates) if dates else None,
        history=date is None and dates is None,
        resync=True,
        trigger="cli",
    )
    launch_and_follow(request, wait=wait)
