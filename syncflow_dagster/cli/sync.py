"""`syncflow sync`: launch sync runs through the Dagster webserver, as POST /sync does, and follow them.

    syncflow sync ENTITY... [--all] [--date D | --dates D1..D2 | --history] [--full-window] [--wait]

It calls the same launcher as the API (service/launch.py): one run per entity,
parents first, dates checked against SYNCFLOW_PARTITIONS_START..today (UTC),
through SYNCFLOW_DAGSTER_URL's GraphQL API. It prints every run id it launched
and every run it could not launch. With --wait it shows a progress bar per run
(stages done of nine, rows fetched, seconds since queued) until every run has
ended, following a run's automatic retry when the daemon retries it, then the
final counts per entity.

Exit codes: 0 every run launched and (with --wait) succeeded; 1 a run failed,
was canceled or could not be launched; 2 a mistake in the command (unknown
entity, a date outside the partitions); 3 Dagster unreachable.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from syncflow_dagster.service import launch
    from syncflow_dagster.service.dagster_gateway import DagsterGateway, RunProgress
    from syncflow_dagster.service.launch import LaunchedRun, LaunchOutcome

console = Console()

EXIT_RUN_FAILED = 1
WAIT_POLL_S = 1.0
# --wait gives up (exit 3) when the webserver has not answered for this long.
UNREACHABLE_GIVE_UP_S = 120.0


def _parse_dates(value: str) -> tuple[dt.date, dt.date]:
    first, sep, last = value.partition("..")
    if not sep:
        raise typer.BadParameter(f"{value!r}: expected D1..D2, e.g. 2025-01-01..2025-01-31")
    try:
        return dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: dates are YYYY-MM-DD, e.g. 2025-01-01..2025-01-31") from None


def _parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: a date is YYYY-MM-DD") from None


def chosen_entities(entities: list[str] | None, all_entities: bool, verb: str) -> list[str]:
    """The entities named on the command line, or none with --all (every entity): one of the two."""
    names = list(entities or [])
    if all_entities == bool(names):
        raise ValueError(f"name the entities to {verb}, or --all (not both)")
    return names


def sync(
    entities: Annotated[
        list[str] | None, typer.Argument(help="Catalog entities to sync (parents are launched first).")
    ] = None,
    all_entities: Annotated[bool, typer.Option("--all", help="Every entity of the catalog.")] = False,
    date: Annotated[
        str | None, typer.Option(help="One partition date, YYYY-MM-DD (default: today UTC).")
    ] = None,
    dates: Annotated[
        str | None, typer.Option(help="A date range D1..D2 (inclusive): one run per entity covers it.")
    ] = None,
    history: Annotated[
        bool,
        typer.Option("--history", help="Every date from SYNCFLOW_PARTITIONS_START to today: a first load."),
    ] = False,
    full_window: Annotated[
        bool, typer.Option("--full-window", help="Re-read the dates' whole window from APISmith.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the runs to their end with a progress bar per run.")
    ] = False,
) -> None:
    """Launch sync runs through the Dagster webserver (SYNCFLOW_DAGSTER_URL), one per entity, parents first."""
    from syncflow_dagster.service import launch

    names = chosen_entities(entities, all_entities, "sync")
    if sum(x is not None and x is not False for x in (date, dates, history)) > 1:
        raise ValueError("give one of --date, --dates or --history")
    request = launch.SyncRequest(
        entities=names,
        date=_parse_date(date) if date else None,
        dates=_parse_dates(dates) if dates else None,
        history=history,
        full_window=full_window,
        trigger="cli",
    )
    launch_and_follow(request, wait=wait)


def launch_and_follow(request: launch.SyncRequest, *, wait: bool) -> None:
    """Plan, launch, print what was launched and (with `wait`) follow the runs; exits non-zero on failure."""
    from syncflow_dagster.catalog import default_catalog
    from syncflow_dagster.service import launch
    from syncflow_dagster.service.dagster_gateway import DagsterGateway
    from syncflow_dagster.service.settings import DagsterSettings

    catalog = default_catalog()
    plan_id, planned = launch.plan_sync(catalog, request)  # SyncRefused is a ValueError: one line, exit 2
    settings = DagsterSettings()
    gateway = DagsterGateway(
        settings.dagster_graphql_url, settings.dagster_location, settings.dagster_timeout_s
    )
    outcome = launch.launch(gateway, plan_id, planned)
    _print_outcome(outcome, gateway.base_url)
    if not outcome.launched:
        unreachable = any(n.unavailable for n in outcome.not_launched)
        sys.exit(3 if unreachable else EXIT_RUN_FAILED)
    failed = bool(outcome.not_launched)
    if wait:
        finals = follow(gateway, outcome.launched)
        _print_finals(finals)
        failed = failed or any(f.status != "SUCCESS" for f in finals)
    if failed:
        sys.exit(EXIT_RUN_FAILED)


def _print_outcome(outcome: LaunchOutcome, base_url: str) -> None:
    for run in outcome.launched:
        console.print(f"launched {run.entity} {run.span}: run {run.run_id}  {base_url}/runs/{run.run_id}")
    for missed in outcome.not_launched:
        console.print(
            f"[red]not launched[/red] {missed.entity} {missed.span}: {missed.reason}", soft_wrap=True
        )
    console.print(
        f"plan {outcome.plan_id}: {len(outcome.launched)} launched, {len(outcome.not_launched)} not"
    )


@dataclass
class FinalRun:
    entity: str
    run_id: str
    status: str
    seconds: float
    counts: dict[str, int]


def follow(gateway: DagsterGateway, runs: list[LaunchedRun]) -> list[FinalRun]:
    """Poll every run until it ended (following automatic retries); a progress bar per run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from syncflow_dagster.engine import stage_table as st
    from syncflow_dagster.service.dagster_gateway import DagsterUnavailable

    stages = [stage.asset for stage in st.STAGES]
    current = {
        run.run_id: run.run_id for run in runs
    }  # launched run id -> the run of its lineage followed now
    done: dict[str, FinalRun] = {}
    # One line per run within 80 columns: the dates are on the "launched" lines above.
    with Progress(
        TextColumn("{task.fields[label]:<17.17}"),
        BarColumn(bar_width=10),
        MofNCompleteColumn(),
        TextColumn("stages {task.fields[rows]:>9} rows {task.fields[elapsed]:>7} {task.fields[status]}"),
        console=console,
        transient=False,
    ) as bar:
        tasks = {
            run.run_id: bar.add_task(
                "", total=len(stages), label=run.entity, rows="-", elapsed="", status="QUEUED"
            )
            for run in runs
        }
        started = {run.run_id: time.monotonic() for run in runs}
        last_answer = time.monotonic()
        while len(done) < len(runs):
            for run in runs:
                if run.run_id in done:
                    continue
                try:
                    progress = gateway.progress(current[run.run_id])
                except DagsterUnavailable:
                    # A busy or restarting webserver: the run goes on; so does waiting, within a bound.
                    if time.monotonic() - last_answer > UNREACHABLE_GIVE_UP_S:
                        raise
                    bar.update(tasks[run.run_id], status="(Dagster not answering)")
                    continue
                last_answer = time.monotonic()
                if progress.retried_by:
                    current[run.run_id] = progress.retried_by
                    progress = gateway.progress(progress.retried_by)
                finished = progress.finished and not progress.retry_pending
                stages_done = sum(1 for s in stages if s in progress.materialized)
                rows = progress.materialized.get(st.FETCH.asset, {}).get("rows_fetched")
                elapsed = _elapsed(progress) or time.monotonic() - started[run.run_id]
                status = progress.status + (" (will retry)" if progress.retry_pending else "")
                bar.update(
                    tasks[run.run_id],
                    completed=stages_done,
                    rows="-" if rows is None else f"{rows:,}",
                    elapsed=f"{elapsed:.1f}s",
                    status=status,
                )
                if finished:
                    report = progress.materialized.get(st.REPORT.asset, {})
                    done[run.run_id] = FinalRun(run.entity, progress.run_id, progress.status, elapsed, report)
            if len(done) < len(runs):
                time.sleep(WAIT_POLL_S)
    return [done[run.run_id] for run in runs]


def _elapsed(progress: RunProgress) -> float | None:
    """Seconds from queued to the end (or to now) as Dagster recorded them."""
    end = progress.ended_at or time.time()
    return max(0.0, end - progress.created_at) if progress.created_at else None


def _print_finals(finals: list[FinalRun]) -> None:
    """Counts per entity, in columns that fold rather than hide anything at 80 columns."""
    from rich import box

    table = Table(title="final counts per entity", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (
        ("entity", "left"),
        ("status", "left"),
        ("fetched", "right"),
        ("insert update delete", "right"),
        ("delivered", "right"),
        ("parked failed", "right"),
        ("s", "right"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for final in finals:
        counts = final.counts

        def count(name: str, counts: dict[str, int] = counts) -> str:
            return str(counts.get(name, "-"))

        table.add_row(
            final.entity,
            final.status if final.status == "SUCCESS" else f"[red]{final.status}[/red]",
            count("fetched"),
            f"{count('insert')} {count('update')} {count('delete')}",
            count("delivered"),
            f"{count('pending')} {count('failed')}",
            f"{final.seconds:.1f}",
        )
    console.print(table)
